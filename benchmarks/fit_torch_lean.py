"""A plain PyTorch training script, the lean side of bench_fit_lean.py: what a user would write.

Read the .npz, the seeded validation split and per-channel standardization (convtrain's own
pure-numpy functions, so both sides see the same images), a net of valid convolutions with
ReLU and a dense output (He init), SGD with momentum and weight decay 2*l2; each epoch, train on
shuffled batches, then score the validation split in eval mode (loss and accuracy) and print a
line. Nothing else: no training-set re-score, checkpoints, model file or plots. The last line
is JSON: the seconds spent in training steps.

    python benchmarks/fit_torch_lean.py data.npz --filters 32,64 --kernel-sizes 5,3 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from convtrain.data.split import split_indices
from convtrain.data.standardize import Standardizer
from convtrain.nn.standardization import standardize
from fit_torch import add_fit_arguments, build_model  # run from benchmarks/ or as a script beside it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    add_fit_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with np.load(args.data, allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"].astype(np.int64)
    train_rows, val_rows = split_indices(y, args.val_fraction, seed=args.seed, limit=None)
    standardizer = Standardizer.fit(x[train_rows].astype(np.float32))
    x_train = standardize(x[train_rows], standardizer.mean, standardizer.std, np.float32)
    x_val = torch.from_numpy(standardize(x[val_rows], standardizer.mean, standardizer.std, np.float32))
    y_train, y_val = y[train_rows], torch.from_numpy(y[val_rows])
    model = build_model(x.shape[1:], int(y.max()) + 1, [int(f) for f in args.filters.split(",")],
                        [int(k) for k in args.kernel_sizes.split(",")])
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD([{"params": [p for n, p in named.items() if n.endswith("weight")],
                                  "weight_decay": 2 * args.l2},
                                 {"params": [p for n, p in named.items() if n.endswith("bias")]}],
                                lr=args.lr, momentum=args.momentum)
    rng = np.random.default_rng([args.seed, 1])
    step_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        order = rng.permutation(len(y_train))
        model.train()
        for start in range(0, len(order), args.batch_size):
            rows = order[start:start + args.batch_size]
            xb, yb = torch.from_numpy(x_train[rows]), torch.from_numpy(y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
        step_seconds += time.perf_counter() - started
        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(y_val), 100):
                scores = model(x_val[start:start + 100])
                loss_sum += float(torch.nn.functional.cross_entropy(scores, y_val[start:start + 100], reduction="sum"))
                correct += int((scores.argmax(1) == y_val[start:start + 100]).sum())
        print(f"epoch {epoch}/{args.epochs}  train loss {loss.item():.4f} | val loss {loss_sum / len(y_val):.4f} "
              f"acc {correct / len(y_val):.4f}", flush=True)
    print(json.dumps({"training_seconds": step_seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
