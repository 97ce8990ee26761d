"""What one convtrain training step costs the process: wall time, CPU time split into user and
system, and page faults, per step, on the reference nets of benchmarks/nets.py.

System time and page faults are what memory churn costs (arrays handed back to the kernel
and faulted in again every step); they should stay near zero in a steady state.

    python benchmarks/step_cost.py --nets mnist --threads 2 --steps 60
    CONVTRAIN_MALLOC_DEFAULTS=1 python benchmarks/step_cost.py   # glibc's own malloc behaviour
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import convtrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import convtrain_runner  # noqa: E402
from nets import BATCH, NETS  # noqa: E402


def step_cost(net: str, threads: int, steps: int) -> dict:
    convtrain.set_num_threads(threads)
    run = convtrain_runner(NETS[net])
    run(4)  # warm-up: allocations, thread pools
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run(steps)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": seconds / steps * 1e3, "images_per_s": steps * BATCH / seconds,
            "user_ms": (after.ru_utime - before.ru_utime) / steps * 1e3,
            "sys_ms": (after.ru_stime - before.ru_stime) / steps * 1e3,
            "faults": (after.ru_minflt - before.ru_minflt) / steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="digits,mnist,cifar")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"{'net':<7} {'thr':>3} {'ms/step':>8} {'img/s':>9} {'user ms':>8} {'sys ms':>7} {'faults':>7}")
    for net in args.nets.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            steps = args.steps * (25 if net == "digits" else 1)
            c = step_cost(net, threads, steps)
            print(f"{net:<7} {threads:>3} {c['ms']:>8.2f} {c['images_per_s']:>9,.0f} {c['user_ms']:>8.2f} "
                  f"{c['sys_ms']:>7.2f} {c['faults']:>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
