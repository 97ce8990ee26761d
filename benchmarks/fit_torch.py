"""`convtrain fit --no-track` written as a plain PyTorch script: the same work, for bench_fit.py.

What `convtrain fit` does on an .npz without a test split, and this script does too:
read the .npz; the stratified seeded validation split and the training set's per-channel
standardization (the same functions convtrain uses, convtrain.data.split,
convtrain.data.standardize and convtrain.nn.standardization: pure numpy, so the two see the
same images); a net of valid convolutions with ReLU and a dense output, He-initialized (N(0, 2/fan_in), biases 0); SGD with
momentum and an L2 penalty on the weights (weight_decay = 2*l2); the config written to the
output folder; a checkpoint (weights, optimizer state, batch-order generator, history) written
atomically and fsync'ed before the first epoch and after every epoch; per epoch, the training
set's and the validation set's loss, cost, accuracy and balanced accuracy in eval mode,
batches of 100; a line per epoch; the model saved; the final evaluation of the validation set
(predictions, the confusion matrix); the three plots (convtrain.training.plots, the same code
convtrain runs); the history table.

    python benchmarks/fit_torch.py data.npz --out runs/torch --filters 32,64 --kernel-sizes 5,3 \
        --epochs 2 --batch-size 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from convtrain.data.split import split_indices
from convtrain.data.standardize import Standardizer
from convtrain.nn.standardization import standardize
from convtrain.training import plots
from convtrain.training.metrics import confusion_matrix

EVAL_BATCH = 100  # convtrain's EVAL_BATCH_SIZE; also the fastest for torch here (at 500 it scores half as fast)


def build_model(input_shape, num_classes, filters, kernel_sizes):
    layers, (channels, height, width) = [], input_shape
    for out_channels, size in zip(filters, kernel_sizes):
        layers += [torch.nn.Conv2d(channels, out_channels, size), torch.nn.ReLU()]
        channels, height, width = out_channels, height - size + 1, width - size + 1
    layers += [torch.nn.Flatten(), torch.nn.Linear(channels * height * width, num_classes)]
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for module in model:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # N(0, 2/fan_in)
                module.bias.zero_()
    return model


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file, fsync, rename: what convtrain's checkpoint writes do."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def balanced_accuracy(y, predictions, num_classes):
    recalls = [np.mean(predictions[y == c] == c) for c in range(num_classes) if np.any(y == c)]
    return float(np.mean(recalls))


def evaluate(model, x, y, l2, weights, num_classes):
    """loss, cost, accuracy, balanced accuracy in eval mode, and the predictions."""
    model.eval()
    loss_sum, predictions = 0.0, np.empty(len(y), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(y), EVAL_BATCH):
            scores = model(torch.from_numpy(x[start:start + EVAL_BATCH]))
            target = torch.from_numpy(y[start:start + EVAL_BATCH])
            loss_sum += float(torch.nn.functional.cross_entropy(scores, target, reduction="sum"))
            predictions[start:start + EVAL_BATCH] = scores.argmax(1).numpy()
        penalty = float(sum((w * w).sum() for w in weights))
    model.train()
    loss = loss_sum / len(y)
    return {"loss": loss, "cost": loss + l2 * penalty, "accuracy": float(np.mean(predictions == y)),
            "balanced_accuracy": balanced_accuracy(y, predictions, num_classes)}, predictions


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings both PyTorch fit scripts take, with the reference nets' defaults."""
    parser.add_argument("--filters", default="32,64")
    parser.add_argument("--kernel-sizes", default="5,3")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the .npz (arrays x, y, optionally class_names)")
    parser.add_argument("--out", required=True, help="output folder")
    add_fit_arguments(parser)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vars(args), indent=1))

    with np.load(args.data, allow_pickle=False) as archive:
        x, y = archive["x"], archive["y"].astype(np.int64)
        class_names = [str(c) for c in archive["class_names"]] if "class_names" in archive.files else None
    num_classes = len(class_names) if class_names else int(y.max()) + 1
    train_rows, val_rows = split_indices(y, args.val_fraction, seed=args.seed, limit=None)
    standardizer = Standardizer.fit(x[train_rows].astype(np.float32))
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    x_train, y_train = standardize(x[train_rows], standardizer.mean, standardizer.std, dtype), y[train_rows]
    x_val, y_val = standardize(x[val_rows], standardizer.mean, standardizer.std, dtype), y[val_rows]

    filters = [int(f) for f in args.filters.split(",")]
    kernel_sizes = [int(k) for k in args.kernel_sizes.split(",")]
    model = build_model(x.shape[1:], num_classes, filters, kernel_sizes)
    named = dict(model.named_parameters())
    weights = [p for n, p in named.items() if n.endswith("weight")]
    biases = [p for n, p in named.items() if n.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": 2 * args.l2}, {"params": biases}],
                                lr=args.lr, momentum=args.momentum)
    rng = np.random.default_rng([args.seed, 1])  # the batch order, as convtrain's Trainer draws it
    history, batch_losses, step = [], [], 0

    def checkpoint(epoch):
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "step": step, "rng": rng.bit_generator.state, "history": history,
                     "batch_losses": batch_losses}, out / "checkpoint.pt")

    checkpoint(0)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        order = rng.permutation(len(y_train))
        for start in range(0, len(order), args.batch_size):
            rows = order[start:start + args.batch_size]
            xb, yb = torch.from_numpy(x_train[rows]), torch.from_numpy(y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            scores = model(xb)
            loss = torch.nn.functional.cross_entropy(scores, yb)
            loss.backward()
            optimizer.step()
            step += 1
            batch_loss = loss.item()  # the progress bar's figures
            batch_accuracy = float((scores.argmax(1) == yb).float().mean())
            if step % args.log_every == 0:
                batch_losses.append((step / steps_per_epoch, batch_loss))
        train_seconds = time.perf_counter() - started
        logs = {"epoch": epoch}
        logs.update({f"train_{k}": v for k, v in evaluate(model, x_train, y_train, args.l2, weights,
                                                           num_classes)[0].items()})
        logs.update({f"val_{k}": v for k, v in evaluate(model, x_val, y_val, args.l2, weights,
                                                         num_classes)[0].items()})
        logs["epoch_seconds"] = time.perf_counter() - started
        history.append(logs)
        checkpoint(epoch)
        print(f"epoch {epoch}/{args.epochs}  train loss {logs['train_loss']:.4f} acc {logs['train_accuracy']:.4f} | "
              f"val loss {logs['val_loss']:.4f} acc {logs['val_accuracy']:.4f} bal {logs['val_balanced_accuracy']:.4f}"
              f" | last batch acc {batch_accuracy:.2f} | {logs['epoch_seconds']:.1f}s "
              f"{len(y_train) / train_seconds:.0f} img/s", flush=True)

    save_atomic({"model": model.state_dict(), "normalization": standardizer.to_dict(),
                 "class_names": class_names}, out / "model.pt")
    values, predictions = evaluate(model, x_val, y_val, args.l2, weights, num_classes)
    confusion = confusion_matrix(y_val, predictions, num_classes)  # convtrain's, as the fit's
    plots.learning_curves(history, out / "plots" / "learning_curves.png", batch_losses=batch_losses,
                          best_epoch=max(history, key=lambda r: -r["val_loss"])["epoch"], monitor="val_loss")
    plots.confusion_matrix(confusion, class_names or list(range(num_classes)), out / "plots" / "confusion_matrix.png",
                           title="confusion matrix (val split)")
    plots.filter_montage(weights[0].detach().numpy(), out / "plots" / "filters_conv1.png")
    print("epoch  train loss  train acc  val loss  val acc  val bal acc")
    for row in history:
        print(f"{row['epoch']:>5}  {row['train_loss']:10.4f}  {row['train_accuracy']:9.4f}  {row['val_loss']:8.4f}  "
              f"{row['val_accuracy']:7.4f}  {row['val_balanced_accuracy']:11.4f}")
    print(f"val accuracy {values['accuracy']:.4f}  balanced_accuracy {values['balanced_accuracy']:.4f}  "
          f"loss {values['loss']:.4f}\nmodel {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
