"""The digits filter x L2 grid of experiments/sweep-digits-filters.toml as an Optuna + PyTorch
script, the other side of bench_sweep.py: one process, a grid sampler, each trial a small
PyTorch fit of fit-digits.toml's recipe (3x3 convs with padding 1, a 2x2 max pool after the
first, ReLU, a dense output; SGD lr 0.05, momentum 0.9, weight decay 2*l2, a cosine schedule
to 1e-4, batch 64, a seeded 20% validation split, early stopping on val_loss with patience 5),
scoring the validation split each epoch. No tracking, no files. Prints each trial's seconds and,
last, JSON with the trials per minute.

    python benchmarks/sweep_torch.py --epochs 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import optuna
import torch

from convtrain.data import load_dataset

SPACE = {"filters": ["4,8", "8,16", "16,32", "32,64"], "l2": [1e-4, 1e-3, 1e-2]}


def build(filters: list[int]) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, filters[0], 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(filters[0], filters[1], 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(filters[1] * 16, 10))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = load_dataset("digits", val_fraction=0.2, seed=0)
    mean, std = splits.x_train.mean(), splits.x_train.std()
    x_train = torch.from_numpy(((splits.x_train - mean) / std).astype(np.float32))
    x_val = torch.from_numpy(((splits.x_val - mean) / std).astype(np.float32))
    y_train, y_val = torch.from_numpy(splits.y_train), torch.from_numpy(splits.y_val)

    def objective(trial) -> float:
        started = time.perf_counter()
        torch.manual_seed(0)
        filters = [int(f) for f in trial.suggest_categorical("filters", SPACE["filters"]).split(",")]
        l2 = trial.suggest_categorical("l2", SPACE["l2"])
        model = build(filters)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=2 * l2)
        steps = args.epochs * math.ceil(len(y_train) / 64)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-4)
        generator = torch.Generator().manual_seed(1)
        best, waited = math.inf, 0
        for _ in range(args.epochs):
            model.train()
            for rows in torch.randperm(len(y_train), generator=generator).split(64):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
                optimizer.step()
                schedule.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(torch.nn.functional.cross_entropy(model(x_val), y_val))
            best, waited = (val_loss, 0) if val_loss < best else (best, waited + 1)
            if waited >= 5:
                break
        print(f"trial {trial.number}: {time.perf_counter() - started:.2f} s", flush=True)
        return best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(SPACE, seed=0))
    study.optimize(objective, n_trials=args.trials)
    wall = time.perf_counter() - started
    print(json.dumps({"trials": args.trials, "seconds": wall, "trials_per_minute": 60 * args.trials / wall}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
