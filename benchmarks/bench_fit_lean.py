"""The whole command, lean: `convtrain fit --no-track` against a plain PyTorch training script.

The MNIST and CIFAR reference nets (benchmarks/nets.py) train for --epochs on --images images
(MNIST's first training images; CIFAR-10's, topped up with flipped copies as bench_fit.py makes
them), batch 100, SGD with momentum and L2, a seeded 10% validation split, at each --threads.
The PyTorch side (fit_torch_lean.py) trains and scores the validation split each epoch, nothing
more; convtrain does what `convtrain fit --no-track` does by default (per-epoch validation, the
running training metrics, checkpoints, the model file, the final evaluation and the plots).

Each run is a fresh process (bench_fit.py's launcher: wall, CPU, peak RSS), the two sides
alternated within each round. Reported: the median wall time of each, the median of the
per-round ratios PyTorch / convtrain, and each side's fixed costs: wall time minus its
training steps (convtrain's `training` line of `--timings`, checkpoints included; the
script's own step timer).

    python benchmarks/bench_fit_lean.py --data-path ../shared/data --threads 1,2 --rounds 5
    python benchmarks/bench_fit_lean.py --nets mnist --threads 1 --rounds 1 --images 1000   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_fit  # noqa: E402  -- its launcher and CIFAR data set

SEED, VAL_FRACTION = 0, 0.1


def make_mnist(data_path: Path, images: int, target: Path) -> str:
    import numpy as np

    from convtrain.data.idx import load_mnist

    raw = load_mnist(data_path / "mnist" if (data_path / "mnist").is_dir() else data_path)
    x, y = raw.x[:images], raw.y[:images]
    np.savez(target, x=np.ascontiguousarray(x, dtype=np.uint8), y=y.astype(np.int64),
             class_names=np.array(raw.class_names))
    return f"{len(x)} MNIST images {x.shape[1:]}"


def commands(net: str, npz: Path, out: Path, epochs: int, threads: int) -> dict[str, list[str]]:
    nets = bench_fit.reference_net()
    spec = nets.NETS[net]
    common = ["--epochs", str(epochs), "--batch-size", str(nets.BATCH), "--lr", str(nets.LR),
              "--momentum", str(nets.MOMENTUM), "--l2", str(nets.L2), "--val-fraction", str(VAL_FRACTION),
              "--seed", str(SEED), "--threads", str(threads),
              "--filters", ",".join(map(str, spec["filters"])), "--kernel-sizes", ",".join(map(str, spec["kernel_sizes"]))]
    return {"convtrain": [sys.executable, "-m", "convtrain", "fit", "--no-track", "--timings", "--data", "npz",
                          "--data-path", str(npz), "--out", str(out / "convtrain"), *common],
            "pytorch": [sys.executable, str(HERE / "fit_torch_lean.py"), str(npz), *common]}


def training_seconds(side: str, stdout: str) -> float:
    if side == "convtrain":
        return float(re.search(r"^training\s+([\d.]+) s", stdout, re.M).group(1))
    import json

    return json.loads(stdout.strip().splitlines()[-1])["training_seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, default=os.environ.get("CONVTRAIN_TEST_DATA"),
                        help="the folder holding mnist/ and cifar10/; default $CONVTRAIN_TEST_DATA")
    parser.add_argument("--nets", default="mnist,cifar")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.data_path is None:
        parser.error("give --data-path or set CONVTRAIN_TEST_DATA (the folder holding mnist/ and cifar10/)")
    work = Path(tempfile.mkdtemp(prefix="bench_fit_lean."))
    try:
        data = {}
        for net in args.nets.split(","):
            npz = work / f"{net}.npz"
            made = (make_mnist if net == "mnist" else bench_fit.make_dataset)(args.data_path, args.images, npz)
            print(f"{net}: {made}")
            data[net] = npz
        print(f"{args.epochs} epochs, {args.rounds} rounds alternated; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        rows = []
        for net, npz in data.items():
            for threads in [int(t) for t in args.threads.split(",")]:
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
                       "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
                cmds = commands(net, npz, work / "runs", args.epochs, threads)
                runs = {side: [] for side in cmds}
                for _ in range(args.rounds):
                    for side, argv_ in cmds.items():
                        result = bench_fit.run_once(argv_, env, work / "runs")
                        result["training"] = training_seconds(side, result["stdout"])
                        runs[side].append(result)
                        time.sleep(0.5)
                rows.append((net, threads, runs))
                ct, pt = runs["convtrain"], runs["pytorch"]
                ratio = statistics.median(p["wall"] / c["wall"] for c, p in zip(ct, pt))
                print(f"{net} {threads}T: convtrain {statistics.median(r['wall'] for r in ct):.2f} s, "
                      f"pytorch {statistics.median(r['wall'] for r in pt):.2f} s, ratio {ratio:.2f}x", flush=True)
        print("\n| net | threads | convtrain wall s | PyTorch wall s | PyTorch / convtrain | "
              "convtrain fixed s | PyTorch fixed s |\n|---|---|---|---|---|---|---|")
        for net, threads, runs in rows:
            ct, pt = runs["convtrain"], runs["pytorch"]
            walls = [p["wall"] / c["wall"] for c, p in zip(ct, pt)]

            def med(values):
                return statistics.median(values)
            print(f"| {net.upper()} | {threads} | {med([r['wall'] for r in ct]):.2f} | {med([r['wall'] for r in pt]):.2f} | "
                  f"{med(walls):.2f}x ({min(walls):.2f}-{max(walls):.2f}) | "
                  f"{med([r['wall'] - r['training'] for r in ct]):.2f} | {med([r['wall'] - r['training'] for r in pt]):.2f} |")
        print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
