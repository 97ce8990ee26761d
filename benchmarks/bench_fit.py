"""The whole command: `convtrain fit --no-track` against the same fit as a PyTorch script.

Each run is a fresh process, timed from launch to exit (start-up, imports, data, epochs,
evaluation, saving, plots), with its peak RSS and CPU time from os.wait4. The data set is
made once: the real CIFAR-10 images of CONVTRAIN_TEST_DATA/cifar10 (or --data-path), topped
up with horizontally flipped copies of the first ones to --images, written as the .npz
`convtrain fit --data npz` reads (x uint8 (N, 3, 32, 32), y, class_names). Both sides train
the CIFAR reference net of benchmarks/nets.py (5x5x32, 3x3x64 valid, ReLU, FC10, He init) with
SGD (lr, momentum, L2 of nets.py), batch 100, on the same seeded 10% validation split, and do
what fit does after each epoch and at the end (benchmarks/fit_torch.py lists it).

Rounds are interleaved (convtrain --help, import torch, convtrain fit, the PyTorch script, then
again), so load on the machine hits all of them alike; the table shows medians (min-max).

    python benchmarks/bench_fit.py --data-path ../shared/data --rounds 3
    python benchmarks/bench_fit.py --threads 1 --rounds 5 --json fit.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED, VAL_FRACTION = 0, 0.1
# numpy, nets.py and convtrain are imported inside the functions that need them: this file is
# also the small launcher of every timed process (timed_child)


def make_dataset(data_path: Path, images: int, target: Path) -> str:
    """The .npz of `images` CIFAR-10 images (real ones, then flipped copies); returns a summary."""
    import numpy as np

    from convtrain.data.cifar import load_cifar10

    raw = load_cifar10(data_path / "cifar10" if (data_path / "cifar10").is_dir() else data_path)
    x, y = raw.x, raw.y
    copies = []
    while len(x) + sum(len(c) for c in copies) < images:  # flips of the first images, then again
        copies.append(x[:images - len(x) - sum(len(c) for c in copies), :, :, ::-1])
    flipped = sum(len(c) for c in copies)
    x_all = np.concatenate([x[:images], *copies])
    y_all = np.concatenate([y[:images], *[y[:len(c)] for c in copies]])
    np.savez(target, x=np.ascontiguousarray(x_all, dtype=np.uint8), y=y_all.astype(np.int64),
             class_names=np.array(raw.class_names))
    return f"{len(x_all)} images {x_all.shape[1:]} ({len(x_all) - flipped} CIFAR-10, {flipped} flipped copies)"


def reference_net():
    sys.path.insert(0, str(HERE))
    import nets

    return nets


def commands(npz: Path, out: Path, epochs: int, threads: int, torch_passive: bool) -> dict[str, list[str]]:
    nets = reference_net()
    CIFAR, BATCH, LR, MOMENTUM, L2 = nets.NETS["cifar"], nets.BATCH, nets.LR, nets.MOMENTUM, nets.L2
    filters = ",".join(map(str, CIFAR["filters"]))
    kernels = ",".join(map(str, CIFAR["kernel_sizes"]))
    common = ["--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM),
              "--l2", str(L2), "--val-fraction", str(VAL_FRACTION), "--seed", str(SEED), "--threads", str(threads),
              "--filters", filters, "--kernel-sizes", kernels]
    cmds = {
        "convtrain --help": [sys.executable, "-m", "convtrain", "--help"],
        "import torch": [sys.executable, "-c", "import torch"],
        # --train-metrics full: the script re-scores the training set each epoch, as this did
        "convtrain fit": [sys.executable, "-m", "convtrain", "fit", "--no-track", "--train-metrics", "full",
                          "--data", "npz", "--data-path", str(npz), "--out", str(out / "convtrain-fit"), *common],
        "pytorch script": [sys.executable, str(HERE / "fit_torch.py"), str(npz), "--out", str(out / "pytorch-script"),
                           *common],
    }
    if torch_passive:  # the same script with idle OpenMP threads sleeping, as convtrain has them
        cmds["pytorch, passive"] = ["env", "OMP_WAIT_POLICY=PASSIVE", *cmds["pytorch script"][:-len(common) - 2],
                                    "--out", str(out / "pytorch-passive"), *common]
    return cmds


def timed_child(argv: list[str]) -> None:
    """Run argv and print its wall seconds, CPU seconds and peak RSS as JSON. This launcher
    imports nothing heavy on purpose: a child's peak RSS (wait4's ru_maxrss) starts from the
    size of the process that forked it, so the benchmark's own process (numpy, the data set)
    must not be the one that forks the timed commands."""
    started = time.perf_counter()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
                      "exit": process.returncode}))


def run_once(argv: list[str], env: dict, out: Path) -> dict:
    """One fresh process, through timed_child: wall seconds, CPU seconds (user + sys), peak RSS
    in MiB (as /usr/bin/time reports them) and what it printed."""
    shutil.rmtree(out, ignore_errors=True)  # every fit starts without the output folders of the last ones
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        launcher = subprocess.run([sys.executable, __file__, "--timed-child", *argv], env=env, stdout=stdout,
                                  stderr=stderr, check=False)
        stdout.seek(0)
        stderr.seek(0)
        lines = stdout.read().decode(errors="replace").splitlines()
        figures = json.loads(lines[-1]) if launcher.returncode == 0 and lines else {"exit": launcher.returncode}
        if figures["exit"] != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr.read().decode(errors='replace')[-2000:]}")
        return {**figures, "stdout": "\n".join(lines[:-1])}


def measure(cmds: dict, env: dict, out: Path, rounds: int) -> dict[str, list[dict]]:
    results = {name: [] for name in cmds}
    for round_ in range(rounds):
        for name, argv in cmds.items():
            results[name].append(run_once(argv, env, out))
            time.sleep(0.5)  # the previous process's threads gone before the next one starts
        print(f"round {round_ + 1}/{rounds}: " + ", ".join(f"{name} {r[-1]['wall']:.2f} s"
                                                           for name, r in results.items()), flush=True)
    return results


def table(results: dict[str, list[dict]]) -> str:
    def spread(values, fmt):
        return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    lines = [f"{'':<16} {'wall s, median (min-max)':>26} {'CPU s (user+sys)':>24} {'peak RSS MiB':>20}"]
    for name, runs in results.items():
        lines.append(f"{name:<16} {spread([r['wall'] for r in runs], '.2f'):>26} "
                     f"{spread([r['cpu'] for r in runs], '.2f'):>24} {spread([r['rss_mib'] for r in runs], '.0f'):>20}")
    ct = results["convtrain fit"]
    for name in [n for n in results if n.startswith("pytorch")]:
        pt = results[name]
        walls = [p["wall"] / c["wall"] for c, p in zip(ct, pt)]  # per round: the two ran close together
        cpus = [p["cpu"] / c["cpu"] for c, p in zip(ct, pt)]
        rss = statistics.median(r["rss_mib"] for r in ct) / statistics.median(r["rss_mib"] for r in pt)
        lines.append(f"{name} / convtrain: wall {statistics.median(walls):.2f}x (rounds {min(walls):.2f}-"
                     f"{max(walls):.2f}), CPU {statistics.median(cpus):.2f}x ({min(cpus):.2f}-{max(cpus):.2f}); "
                     f"convtrain's peak RSS is {rss:.2f}x its")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, default=os.environ.get("CONVTRAIN_TEST_DATA"),
                        help="the folder holding cifar10/ (or cifar-10-batches-py/); default $CONVTRAIN_TEST_DATA")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-torch-passive", action="store_true",
                        help="skip the third fit: the PyTorch script with OMP_WAIT_POLICY=PASSIVE (convtrain "
                             "sets it for itself; PyTorch's OpenMP threads spin by default, which costs it "
                             "dearly on a busy machine)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--timed-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timed_child:
        timed_child(args.timed_child)
        return 0
    if args.data_path is None:
        parser.error("give --data-path or set CONVTRAIN_TEST_DATA (the folder holding cifar10/)")

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_fit."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        npz = work / "cifar.npz"
        print(f"data: {make_dataset(args.data_path, args.images, npz)} -> {npz}")
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        cmds = commands(npz, work / "runs", args.epochs, args.threads, not args.no_torch_passive)
        nets = reference_net()
        print(f"{args.epochs} epochs, batch {nets.BATCH}, {args.threads} threads, CIFAR net "
              f"{nets.NETS['cifar']['filters']} {nets.NETS['cifar']['kernel_sizes']}; {args.rounds} rounds interleaved; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for name in [n for n in cmds if n not in ("convtrain --help", "import torch")]:
            print(f"  {name}: {' '.join(cmds[name][1:])}")
        results = measure(cmds, env, work / "runs", args.rounds)
        print(f"\n{table(results)}\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        for name in [n for n in cmds if n not in ("convtrain --help", "import torch")]:
            final = [line for line in results[name][-1]["stdout"].splitlines() if line.strip()]
            print(f"{name}, last round's epoch lines:\n  " + "\n  ".join(l for l in final if l.startswith("epoch ")))
        if args.json:
            args.json.write_text(json.dumps({k: [{m: v for m, v in r.items() if m != "stdout"} for r in runs]
                                             for k, runs in results.items()}, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
