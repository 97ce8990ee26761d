"""The same fit in PyTorch: a fit config's net, data, augmentation and optimizer, for a
like-for-like accuracy beside convtrain's (e.g. experiments/fit-cifar10-bn.toml's comment).

What is shared with `convtrain fit`: the split and standardization (convtrain.data), the
initial weights (the convtrain Network exported with convtrain.nn.torch_compat), the batch
order and augmentation (the Trainer's generator default_rng([seed, 1]) and the config's plan from
convtrain.data.augment, mixup's and cutmix's soft targets included), the
learning-rate schedule (convtrain.nn.optim.make_schedule), label smoothing, gradient clipping,
and which parameters decay (conv and dense weights: AdamW's weight_decay, or SGD's L2 as
weight_decay = 2 * l2). What differs: torch's own kernels and float rounding, and its dropout
masks (torch's generator, seeded with the fit's seed).

    python benchmarks/torch_recipe.py experiments/fit-cifar10-bn.toml --data-path ../shared/data/cifar10
    python benchmarks/torch_recipe.py experiments/fit-cifar10-bn.toml --seeds 0,1,2 --threads 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np


def run(config, threads: int) -> dict:
    import torch

    from convtrain.data import Standardizer, load_dataset
    from convtrain.data.augment import augment_images, blend, plan_for
    from convtrain.nn.network import Network
    from convtrain.nn.optim import make_schedule
    from convtrain.nn.torch_compat import to_torch_module

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    splits = load_dataset(config.data, config.data_path, val_fraction=config.val_fraction, seed=config.seed,
                          limit=config.limit)
    network = Network.from_config(config, splits.input_shape, splits.num_classes)
    standardizer = Standardizer.fit(splits.x_train)
    network.normalization = {k: v.tolist() for k, v in standardizer.to_dict().items()}
    x_train, y_train = network.normalize(splits.x_train), splits.y_train.astype(np.int64)
    x_val, y_val = network.normalize(splits.x_val), splits.y_val.astype(np.int64)

    model = to_torch_module(network).train()
    decay_names = set(network.weight_names())
    named = dict(model.named_parameters())
    decay = [p for n, p in named.items() if n in decay_names]
    rest = [p for n, p in named.items() if n not in decay_names]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}],
                                      lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    else:
        optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 2 * config.l2},
                                     {"params": rest, "weight_decay": 0.0}],
                                    lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    schedule = make_schedule(config)
    steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
    planned = schedule.planned_steps()
    max_steps = planned if planned is not None else config.epochs * steps_per_epoch
    schedule.total_steps = max_steps
    rng = np.random.default_rng([config.seed, 1])  # the Trainer's batch-order/augmentation stream
    plan = plan_for(config)

    step, epoch, started = 0, 0, time.perf_counter()
    while step < max_steps:
        epoch += 1
        order = rng.permutation(len(y_train))
        for start in range(0, len(order), config.batch_size):
            if step >= max_steps:
                break
            rows = order[start:start + config.batch_size]
            xb, yb = x_train[rows], torch.from_numpy(y_train[rows])
            target = yb
            if plan.active:
                xb = augment_images(xb, plan, rng)
                if plan.mixes:  # mixup, cutmix: soft targets; CrossEntropyLoss smooths them as it smooths labels
                    xb, partner, lam = blend(xb, plan, rng)
                    classes = splits.num_classes
                    target = (lam * torch.nn.functional.one_hot(yb, classes).double()
                              + (1 - lam) * torch.nn.functional.one_hot(yb[partner], classes).double()).float()
            lr = schedule.lr(step, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(torch.from_numpy(np.ascontiguousarray(xb))), target)
            loss.backward()
            if config.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predictions = np.concatenate([model(torch.from_numpy(x_val[i:i + 500])).argmax(1).numpy()
                                      for i in range(0, len(y_val), 500)])
    return {"seed": config.seed, "val_accuracy": float(np.mean(predictions == y_val)), "steps": step,
            "seconds": seconds}


def main() -> None:
    from convtrain.config import FitConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a fit config TOML (e.g. experiments/fit-cifar10-bn.toml)")
    parser.add_argument("--data-path", help="overrides the config's data_path")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = FitConfig.from_toml(args.config)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        config = base.with_overrides({"seed": seed, "data_path": args.data_path})
        result = run(config, args.threads)
        results.append(result)
        print(f"seed {seed}: val_accuracy {result['val_accuracy']:.4f}  ({result['steps']} updates, "
              f"{result['seconds']:.0f} s)", flush=True)
    accuracies = [r["val_accuracy"] for r in results]
    spread = f" ± {statistics.stdev(accuracies):.4f}" if len(accuracies) > 1 else ""
    print(f"PyTorch val_accuracy over {len(accuracies)} seed(s): {statistics.mean(accuracies):.4f}{spread}")


if __name__ == "__main__":
    main()
