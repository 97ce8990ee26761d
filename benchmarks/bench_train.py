"""End-to-end training throughput: convtrain vs PyTorch CPU vs a pure-numpy im2col baseline.

One "step" is a full training update on a batch: forward, softmax cross-entropy, backward,
L2 gradient, SGD momentum update (Trainer.train_step for convtrain), on the three reference
nets of benchmarks/nets.py (DIGITS, MNIST, CIFAR: two valid convolutions with ReLU, FC10,
float32, batch 100; CIFAR-BN: the CIFAR net with batch norm after each conv, before its ReLU;
torch: nn.BatchNorm2d; RESNET8: three basic blocks of 16/32/64 filters on CIFAR, torch: the
module to_torch_module makes, whose blocks add and ReLU in place as torchvision's BasicBlock). CIFAR-BN's rounds each run right beside a round of CIFAR, in every
implementation, and the cost of batch norm is the median of those rounds' step-time ratios:
this machine has slower and faster spells seconds long, in which memory-bound passes such as
batch norm's slow down most, and a ratio of two medians taken minutes apart mixes them.

The numpy baseline is convtrain's own engine with benchmarks/numpy_conv.py (im2col by strided
views, numpy GEMMs) in place of the compiled kernels. Every implementation starts from the
same He-initialized weights (exported to torch with convtrain.nn.torch_compat) and runs the
same optimizer. Rounds are interleaved across
implementations so that background load hits all of them alike, each implementation in a
process of its own (as it would run for a user; two OpenMP runtimes in one process slow
each other down); the table shows the median images/s over rounds (and min-max), and the
ratios of medians.

    python benchmarks/bench_train.py                      # everything, 1 and 2 threads
    python benchmarks/bench_train.py --nets mnist --threads 2 --rounds 7
    python benchmarks/bench_train.py --clock cpu --threads 1   # images per CPU-second
    python benchmarks/bench_train.py --isa baseline --no-torch --no-numpy   # vs the portable build
    python benchmarks/bench_train.py --conv-algo im2col   # conv_algo auto (the default) vs im2col

After the throughput table: peak RSS per implementation (each in a fresh process), then
convtrain's per-phase profile (benchmarks/profile_step.py).

    python benchmarks/bench_train.py --nets cifar,resnet8 --threads 2 --augment crop=4,crop_padding=reflect,flip=1

adds augmentation's share of convtrain's step: the trainer's step with the batch augmented as
the plan says (convtrain.data.augment, the same calls the Trainer makes), the augmentation
timed inside each step; per round, augmentation time / step time including it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import convtrain
from convtrain.nn import layers as convtrain_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy_conv  # noqa: E402  the shared pure-numpy im2col baseline, same API as convtrain.nn.kernels
import profile_step  # noqa: E402
from nets import BATCH, L2, LR, MOMENTUM, NETS, batches, build_network, trainer_for  # noqa: E402

# PyTorch 2.13 CPU at 2 threads on the Xeon of docs/performance.md, measured once as a fixed
# reference (the run's own PyTorch column is the one to compare with).
PYTORCH_REFERENCE_2T = {"digits": 86_000, "mnist": 1_460, "cifar": 1_530}


class NumpyKernels:
    """numpy_conv behind the whole kernels API the layers call (the fused conv+ReLU entry
    points are composed from numpy_conv's separate passes, dense layers are plain numpy
    GEMMs, as a numpy implementation would have them)."""

    def __getattr__(self, name):
        return getattr(numpy_conv, name)

    @staticmethod
    def conv2d_forward(x, w, b, stride=1, padding=0, relu=False, algo="im2col"):
        out = numpy_conv.conv2d_forward(x, w, b, stride, padding)
        return np.maximum(out, 0, out=out) if relu else out

    @staticmethod
    def conv2d_backward(x, dout, w, stride=1, padding=0, relu_out=None, input_grad=True,
                        algo="im2col"):
        if relu_out is not None:
            np.multiply(dout, relu_out > 0, out=dout)
        dw, db = numpy_conv.conv2d_backward_filter(x, dout, w.shape[2:], stride, padding)
        dx = numpy_conv.conv2d_backward_input(dout, w, x.shape, stride, padding) if input_grad else None
        return dx, dw, db

    @staticmethod
    def dense_forward(x, w, b):
        out = x @ w.T
        out += b
        return out

    @staticmethod
    def dense_backward(dout, x, w, input_grad=True):
        return (dout @ w if input_grad else None), dout.T @ x, dout.sum(axis=0)

    @staticmethod
    def relu_(a):
        return np.maximum(a, 0, out=a)

    @staticmethod
    def relu_backward_(dout, out):
        return np.multiply(dout, out > 0, out=dout)


# ---- one implementation = a function that runs k steps ----------------------------------------

def convtrain_runner(spec, kernels_module=None, algo="auto"):
    """convtrain's trainer with conv_algo `algo` (auto: as `convtrain fit` runs by default)."""
    network = build_network(spec)
    network.set_conv_algo(algo if kernels_module is None else "im2col")
    trainer = trainer_for(network)
    xs, ys = batches(spec)

    def run(steps):
        saved = convtrain_layers.kernels
        if kernels_module is not None:
            convtrain_layers.kernels = kernels_module
        try:
            for i in range(steps):
                trainer.train_step(xs[i % len(xs)], ys[i % len(ys)], LR)
        finally:
            convtrain_layers.kernels = saved
    return run


def isa_runner(spec, isa):
    """convtrain on another build of the kernels (convtrain/nn/backend.py), e.g. "baseline"."""
    from convtrain.nn import backend, kernels, norm
    module, norm_module = backend.load_build(isa), backend.load_build(isa, "_norm")
    run_default = convtrain_runner(spec)

    def run(steps):
        saved = kernels._conv, norm._kernels()
        kernels._conv, norm._norm = module, norm_module
        module.set_num_threads(convtrain.get_num_threads())
        try:  # this build has no BLAS pinning registered: pin from Python (once per round)
            with threadpool_limits(1, user_api="blas"):
                run_default(steps)
        finally:
            kernels._conv, norm._norm = saved
    return run


def torch_runner(spec):
    import torch

    from convtrain.nn.torch_compat import to_torch_module

    model = to_torch_module(build_network(spec))
    weights = [p for n, p in model.named_parameters() if n.endswith(".weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    # L2 on weights only, as in convtrain's cost: d(l2*||W||^2)/dW = 2*l2*W
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": 2 * L2}, {"params": biases}],
                                lr=LR, momentum=MOMENTUM)
    xs, ys = batches(spec)
    xs = [torch.from_numpy(x) for x in xs]
    ys = [torch.from_numpy(y) for y in ys]

    def run(steps):
        for i in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)])
            loss.backward()
            optimizer.step()
    return run


def set_threads(threads):
    convtrain.set_num_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass


RUNNERS = {"convtrain": convtrain_runner, "pytorch": torch_runner,
           "numpy": lambda spec: convtrain_runner(spec, NumpyKernels())}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SETTLE_SECONDS = 0.3


def _runner(name, spec):
    if name.startswith("convtrain(") and name.endswith(")"):
        return convtrain_runner(spec, algo=name[len("convtrain("):-1])
    if name.startswith("convtrain[") and name.endswith("]"):
        return isa_runner(spec, name[len("convtrain["):-1])
    return RUNNERS[name](spec)


def _round_worker(name, net, threads, clock, connection):
    """One implementation in its own process: warm up, then time `steps` on each request.
    Separate processes, because two OpenMP runtimes in one process slow each other down
    (PyTorch ships its own libgomp: DIGITS at 2 threads, convtrain alone 120k images/s, 99k
    with PyTorch's pool in the same process), and because each should run as a user runs it,
    with its own allocator state."""
    spec = NETS[net]
    set_threads(threads)
    timer = CLOCKS[clock]
    with threadpool_limits(threads, user_api="blas"):
        run = _runner(name, spec)
        run(2)  # warm-up: allocations, BLAS and OpenMP thread pools
        connection.send("ready")
        while (steps := connection.recv()) is not None:
            started = timer()
            run(steps)
            connection.send(timer() - started)


def measure(net, threads, rounds, with_torch, with_numpy, clock="wall", isas=(), algos=(), paired_net=None):
    """{implementation: [images/s per round]}; every implementation in its own process, the
    rounds interleaved so that load on the machine hits them alike. With `paired_net`,
    convtrain and PyTorch also run that net, each right after its own round on `net`, as
    "convtrain@<paired_net>" and "pytorch@<paired_net>": per-round pairs whose ratio the
    machine's slower and faster spells (seconds long, on a shared host) hit alike."""
    import multiprocessing

    steps = NETS[net]["steps"]
    names = (["convtrain"] + ["pytorch"] * with_torch + ["numpy"] * with_numpy + [f"convtrain[{i}]" for i in isas]
             + [f"convtrain({a})" for a in algos])
    workers = [(name, net) for name in names]
    if paired_net:
        for name in ("pytorch", "convtrain"):
            if name in names:
                workers.insert(names.index(name) + 1, (f"{name}@{paired_net}", paired_net))
    context = multiprocessing.get_context("spawn")
    processes = {}
    try:
        for key, worker_net in workers:
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_round_worker, args=(key.split("@")[0], worker_net, threads, clock,
                                                                  child_end), daemon=True)
            process.start()
            processes[key] = (process, parent_end)
        for _, connection in processes.values():
            assert connection.recv() == "ready"
        rates = {key: [] for key in processes}
        for _ in range(rounds):
            for key, (_, connection) in processes.items():
                # let the previous implementation's thread pools park first (OpenBLAS's
                # threads spin ~0.1 s after a call and would take a core from the next one)
                time.sleep(SETTLE_SECONDS)
                connection.send(steps)
                rates[key].append(steps * BATCH / connection.recv())
        return rates
    finally:
        for process, connection in processes.values():
            try:
                connection.send(None)
            except OSError:
                pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def paired_step_cost(rates, name, paired_net):
    """How much longer `name`'s step is than on `paired_net`: the median over rounds of the
    round's ratio, and the range, or None when the pair was not run."""
    other = rates.get(f"{name}@{paired_net}")
    if other is None or name not in rates:
        return None
    ratios = sorted(plain / with_bn for with_bn, plain in zip(rates[name], other))  # images/s: inverse times
    return {"median": statistics.median(ratios) - 1, "min": ratios[0] - 1, "max": ratios[-1] - 1}


def _rss_mib(field):
    """VmRSS (now) or VmHWM (peak) of this process, from /proc, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(name, net, threads):
    """In a fresh process: RSS after imports and set-up, and peak RSS after a round of steps."""
    spec = NETS[net]
    set_threads(threads)
    with threadpool_limits(threads, user_api="blas"):
        run = RUNNERS[name](spec)
        base = _rss_mib("VmRSS")
        run(spec["steps"])
    print(json.dumps({"base_mib": base, "peak_mib": _rss_mib("VmHWM")}))


def peak_rss(name, net, threads):
    """{'base_mib', 'peak_mib'} of one implementation, measured in its own process."""
    import subprocess
    result = subprocess.run([sys.executable, __file__, "--rss-child", name, net, str(threads)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_row(net, threads, rates, medians):
    def cell(name):
        if name not in rates:
            return f"{'-':>22}"
        return f"{medians[name]:>9,.0f} ({min(rates[name]):,.0f}-{max(rates[name]):,.0f})".rjust(22)

    def ratio(name):
        return f"{medians['convtrain'] / medians[name]:>8.2f}x" if name in medians else f"{'-':>9}"

    return (f"{net:<7} {threads:>3} {cell('convtrain')} {cell('pytorch')} {cell('numpy')} "
            f"{ratio('pytorch')} {ratio('numpy')}")


def parse_plan(text: str):
    """An AugmentPlan from 'crop=4,crop_padding=reflect,flip=1,cutout=8,mixup=0.2'."""
    from dataclasses import fields

    from convtrain.data.augment import AugmentPlan

    kinds = {f.name: type(f.default) for f in fields(AugmentPlan)}
    values = dict(item.split("=", 1) for item in text.split(",") if item)
    unknown = set(values) - set(kinds)
    if unknown:
        raise SystemExit(f"error: --augment: unknown setting {sorted(unknown)[0]!r}, expected {', '.join(kinds)}")
    return AugmentPlan(**{k: kinds[k](v) if kinds[k] is not bool else v.lower() in ("1", "true", "yes")
                          for k, v in values.items()})


def augmentation_share(net, threads, rounds, plan, clock="wall") -> list[float]:
    """Per round: the time augmenting batches took / the time of the steps including it, for
    convtrain's step on `net` (in this process, like the profile)."""
    from convtrain.data.augment import augment_images, blend

    spec = NETS[net]
    set_threads(threads)
    timer = CLOCKS[clock]
    with threadpool_limits(threads, user_api="blas"):
        trainer = trainer_for(build_network(spec))
        xs, ys = batches(spec)
        rng = np.random.default_rng(0)

        def step(i) -> float:
            x, y, mixed = xs[i % len(xs)], ys[i % len(ys)], None
            started = timer()
            x = augment_images(x, plan, rng)
            if plan.mixes:
                x, partner, lam = blend(x, plan, rng)
                mixed = (y[partner], lam)
            spent = timer() - started
            trainer.train_step(x, y, LR, mixed=mixed)
            return spent

        step(0), step(1)  # warm-up
        shares = []
        for _ in range(rounds):
            started = timer()
            augmenting = sum(step(i) for i in range(spec["steps"]))
            shares.append(augmenting / (timer() - started))
    return shares


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="digits,mnist,cifar,cifar-bn,resnet8",
                        help="comma-separated: digits, mnist, cifar, cifar-bn, resnet8")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation (median reported)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    parser.add_argument("--no-numpy", action="store_true", help="skip the numpy im2col baseline")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (all its threads), "
                             "robust to other load: images per CPU-second, the honest 1-thread "
                             "figure on a shared machine (at 2 threads it measures efficiency)")
    parser.add_argument("--isa", default="", help="comma-separated other builds of the kernels to time "
                        "beside the one this CPU runs (baseline, x86-64-v3, x86-64-v4)")
    parser.add_argument("--conv-algo", default="", help="comma-separated conv_algo values (im2col, winograd) "
                        "to time beside convtrain's default, auto")
    parser.add_argument("--augment", default="", metavar="PLAN", help="also measure augmentation's share of "
                        "convtrain's step with this plan, e.g. crop=4,crop_padding=reflect,flip=1,cutout=8")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-phase profile")
    parser.add_argument("--rss-child", nargs=3, metavar=("IMPL", "NET", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        name, net, threads = args.rss_child
        rss_child(name, net, int(threads))
        return 0

    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
            torch_version = torch.__version__
        except ImportError:
            with_torch, torch_version = False, None
    info = convtrain.build_info()
    print(f"convtrain {convtrain.__version__}: openmp={info.get('openmp')} max_threads={info.get('max_threads')} "
          f"isa={info.get('isa')}; "
          f"numpy {np.__version__}; torch {torch_version if with_torch else 'not used'}")
    print(f"batch {BATCH}, float32, SGD lr {LR} momentum {MOMENTUM}, l2 {L2}; images/s, median (min-max) "
          f"of {args.rounds} rounds, {args.clock} clock; load average {os.getloadavg()[0]:.2f}\n")
    header = f"{'net':<7} {'thr':>3} {'convtrain':>22} {'pytorch':>22} {'numpy':>22} {'ct/torch':>9} {'ct/numpy':>9}"
    print(header)
    print("-" * len(header))
    results = []
    thread_counts = [int(t) for t in args.threads.split(",")]
    for net in args.nets.split(","):
        for threads in thread_counts:
            isas = [isa for isa in args.isa.split(",") if isa]
            algos = [algo for algo in args.conv_algo.split(",") if algo]
            paired_net = NETS[net].get("without_batch_norm")
            rates = measure(net, threads, args.rounds, with_torch, not args.no_numpy, args.clock, isas, algos,
                            paired_net)
            medians = {name: statistics.median(values) for name, values in rates.items()}
            print(format_row(net, threads, rates, medians), flush=True)
            costs = {name: paired_step_cost(rates, name, paired_net) for name in ("convtrain", "pytorch")}
            if costs["convtrain"]:
                print(f"{'':<11} batch norm's step cost, round by round against {paired_net}: "
                      + ", ".join(f"{name} +{c['median']:.1%} ({c['min']:+.1%} to {c['max']:+.1%})"
                                  for name, c in costs.items() if c), flush=True)
            for isa in isas:
                name = f"convtrain[{isa}]"
                print(f"{'':<11} {isa} build: {medians[name]:,.0f} ({min(rates[name]):,.0f}-"
                      f"{max(rates[name]):,.0f}); the {info.get('isa')} build runs "
                      f"{medians['convtrain'] / medians[name]:.2f}x as fast", flush=True)
            for algo in algos:
                name = f"convtrain({algo})"
                print(f"{'':<11} conv_algo {algo}: {medians[name]:,.0f} ({min(rates[name]):,.0f}-"
                      f"{max(rates[name]):,.0f}); auto runs {medians['convtrain'] / medians[name]:.2f}x as fast"
                      + (f", {medians[name] / medians['pytorch']:.2f}x PyTorch" if "pytorch" in medians else ""),
                      flush=True)
            results.append({"net": net, "threads": threads, "rates": rates, "medians": medians,
                            "batch_norm_step_cost": {name: c for name, c in costs.items() if c}})
    print("\nPyTorch reference at 2 threads (a fixed earlier measurement): "
          + ", ".join(f"{k} {v:,}" for k, v in PYTORCH_REFERENCE_2T.items()) + " images/s")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if not args.no_rss:
        names = ["convtrain"] + ["pytorch"] * with_torch + ["numpy"] * (not args.no_numpy)
        print(f"\npeak RSS in MiB, each in its own process at {max(thread_counts)} threads: after "
              f"imports and set-up -> high-water mark after a round of steps (+ training's share)")
        print(f"{'net':<7} " + " ".join(f"{name:>26}" for name in names) + f" {'ct/torch':>9}")
        for net in args.nets.split(","):
            rss = {name: peak_rss(name, net, max(thread_counts)) for name in names}
            cells = " ".join(
                f"{r['base_mib']:.0f} -> {r['peak_mib']:.0f} (+{r['peak_mib'] - r['base_mib']:.0f})".rjust(26)
                for r in rss.values())
            ratio = (f"{rss['convtrain']['peak_mib'] / rss['pytorch']['peak_mib']:9.2f}"
                     if "pytorch" in rss else f"{'-':>9}")
            print(f"{net:<7} {cells} {ratio}", flush=True)
            for result in results:
                if result["net"] == net:
                    result["rss_mib"] = rss
    if args.augment:
        plan = parse_plan(args.augment)
        print(f"\naugmentation's share of convtrain's step ({plan.describe()}), {args.clock} clock: "
              f"median (min-max) of {args.rounds} rounds")
        for net in args.nets.split(","):
            for threads in thread_counts:
                shares = sorted(augmentation_share(net, threads, args.rounds, plan, args.clock))
                print(f"{net:<7} {threads:>3} {statistics.median(shares):7.1%} ({shares[0]:.1%}-{shares[-1]:.1%})",
                      flush=True)
                for result in results:
                    if result["net"] == net and result["threads"] == threads:
                        result["augmentation_share"] = shares
    if not args.no_profile:
        print("\nper-phase profile of convtrain's step (benchmarks/profile_step.py)")
        for net in args.nets.split(","):
            for threads in thread_counts:
                steps = max(5, NETS[net]["steps"] * 3)
                profile_step.print_profile(net, threads, *profile_step.profile(net, threads, steps, args.clock),
                                           args.clock)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
