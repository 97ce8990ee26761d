"""Trainer: epochs of shuffled mini-batches, per-epoch evaluation, callbacks, exact resume.

One update: forward -> softmax cross-entropy (optionally label-smoothed) -> backward ->
+ 2*l2*W -> (clip the gradients to a global norm) -> SGD or AdamW step at the schedule's
learning rate. After each epoch the training set (all of it up to
`train_eval_limit` images, else a fixed seeded subset of that size) and the validation set
are evaluated in eval mode: loss, cost, accuracy, balanced accuracy.

Random streams, all derived from `seed`: the shuffling/augmentation generator
(default_rng([seed, 1])) and the dropout generator (default_rng([seed, 3])) are the only
random state that evolves; the training-evaluation subset
(default_rng([seed, 2])) is recomputed from the seed. Network initialization uses
default_rng([seed, 0]) (see Network.initialize).

Resuming is exact. A checkpoint holds the weights, batch norm's running statistics, the
optimizer's state (see training/layer_state.py), update count, epoch, the
shuffling generator's state, history and callbacks' state; a checkpoint written mid-epoch
(request_stop) also holds that epoch's sample order and the number of batches done. Since
those are all the inputs of the remaining computation, a resumed fit makes the same
floating-point operations in the same order as an uninterrupted one and ends with the same
weights bit for bit (given the same thread count: reductions split by thread).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from convtrain.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, TrainingInterrupted
from convtrain.nn import backend
from convtrain.nn.losses import cross_entropy_sum, softmax_cross_entropy
from convtrain.nn.npz_files import json_entry, read_json, read_npz, text_entry, write_npz_atomic
from convtrain.nn.optim import SGD, Schedule, clip_grad_norm_, make_optimizer, make_schedule
from convtrain.training.callbacks import Callback, Checkpoint, EarlyStopping, improved, monitor_mode
from convtrain.training.layer_state import layer_state_arrays, load_layer_state

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_FORMAT = "convtrain-checkpoint-1"


@dataclass
class History:
    """Per-epoch metrics: each entry is the on_epoch_end logs plus "epoch"."""

    monitor: str = "val_loss"
    epochs: list[dict] = field(default_factory=list)

    def append(self, epoch: int, logs: dict) -> None:
        self.epochs.append({"epoch": epoch, **logs})

    def metric(self, name: str) -> list[float]:
        return [entry[name] for entry in self.epochs if name in entry]

    @property
    def _monitored(self) -> str:
        # Without a validation set a val_* monitor falls back to the training loss.
        if self.epochs and self.monitor not in self.epochs[-1]:
            return "train_loss"
        return self.monitor

    @property
    def best_epoch(self) -> int | None:
        name, best, best_epoch = self._monitored, None, None
        mode = monitor_mode(name)
        for entry in self.epochs:
            if improved(entry[name], best, mode):
                best, best_epoch = entry[name], entry["epoch"]
        return best_epoch

    @property
    def best(self) -> dict:
        epoch = self.best_epoch
        return next((dict(e) for e in self.epochs if e["epoch"] == epoch), {})

    @property
    def last(self) -> dict:
        return dict(self.epochs[-1]) if self.epochs else {}

    def to_dict(self) -> dict:
        return {"monitor": self.monitor, "epochs": [dict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        return cls(monitor=data.get("monitor", "val_loss"), epochs=[dict(e) for e in data.get("epochs", [])])


def _arrange_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """EarlyStopping first, Checkpoint last, the rest in the given order."""
    early = [c for c in callbacks if isinstance(c, EarlyStopping)]
    checkpoints = [c for c in callbacks if isinstance(c, Checkpoint)]
    others = [c for c in callbacks if not isinstance(c, (EarlyStopping, Checkpoint))]
    keys = [c.key for c in callbacks]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"callbacks: two callbacks share the key {duplicates[0]!r}; give one a distinct `key`")
    return early + others + checkpoints


class Trainer:
    def __init__(self, network, optimizer: SGD, schedule: Schedule, *, epochs: int, batch_size: int,
                 l2: float, seed: int = 0, callbacks: Iterable[Callback] = (),
                 checkpoint_dir: str | Path | None = None, patience: int | None = None,
                 monitor: str = "val_loss", balanced: bool = False, augment: bool = False,
                 config=None, train_eval_limit: int | None = 10_000, eval_batch_size: int = 500,
                 label_smoothing: float = 0.0, clip_norm: float | None = None):
        if epochs < 1 or batch_size < 1:
            raise ConfigError(f"epochs and batch_size: got {epochs} and {batch_size}, expected positive counts")
        self.network = network
        self.optimizer = optimizer
        self.schedule = schedule
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.l2 = float(l2)
        self.label_smoothing = float(label_smoothing)
        self.clip_norm = None if not clip_norm else float(clip_norm)
        if not 0 <= self.label_smoothing < 1 or (self.clip_norm is not None and self.clip_norm < 0):
            raise ConfigError(f"label_smoothing and clip_norm: got {label_smoothing} and {clip_norm}, "
                              f"expected a value in [0, 1) and a norm > 0")
        self.seed = int(seed)
        self.monitor = monitor
        self.balanced = bool(balanced)
        self.augment = bool(augment)
        self.config = config
        self.train_eval_limit = train_eval_limit
        self.eval_batch_size = int(eval_batch_size)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        backend.configure()  # process-wide kernel set-up; keeps what each step frees for the next

        callbacks = list(callbacks)
        if patience is not None and not any(isinstance(c, EarlyStopping) for c in callbacks):
            callbacks.append(EarlyStopping(monitor=monitor, patience=patience))
        if self.checkpoint_dir is not None and not any(isinstance(c, Checkpoint) for c in callbacks):
            callbacks.append(Checkpoint())
        self.callbacks = _arrange_callbacks(callbacks)

        self.rng = np.random.default_rng([self.seed, 1])
        self.dropout_rng = np.random.default_rng([self.seed, 3])
        network.set_dropout_generator(self.dropout_rng)
        self.epoch = 0             # last finished epoch
        self.step = 0              # updates done
        self.history = History(monitor=monitor)
        self.checkpoint_path: Path | None = None   # last good checkpoint
        self.stop_training = False
        self.has_validation: bool | None = None
        self.max_steps: int | None = None
        self._stop_requested = False
        self._epoch_order: np.ndarray | None = None   # sample order of the epoch in progress
        self._batches_done = 0                         # batches of that epoch already applied
        self._checkpoint_epoch: int | str | None = None

    @classmethod
    def from_config(cls, network, config, callbacks: Iterable[Callback] = (),
                    checkpoint_dir: str | Path | None = None) -> "Trainer":
        return cls(network, make_optimizer(network, config), make_schedule(config), epochs=config.epochs,
                   batch_size=config.batch_size, l2=config.l2, seed=config.seed, callbacks=callbacks,
                   checkpoint_dir=checkpoint_dir, patience=config.patience, monitor=config.monitor,
                   balanced=config.balanced, augment=config.augment, config=config,
                   label_smoothing=getattr(config, "label_smoothing", 0.0),
                   clip_norm=getattr(config, "clip_norm", None))

    # ---- control --------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop at the next batch boundary, write a checkpoint, raise TrainingInterrupted.
        Safe to call from a signal handler (it only sets a flag)."""
        self._stop_requested = True

    def _dispatch(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ---- fit ------------------------------------------------------------------------

    def fit(self, x_train, y_train, x_val=None, y_val=None) -> History:
        """Train on normalized inputs (N, C, H, W) until `epochs` (or the schedule's planned
        updates, or early stopping); continues after the last finished epoch when resumed."""
        x_train, y_train = self._check_data(x_train, y_train, "training")
        if x_val is not None and len(x_val):
            x_val, y_val = self._check_data(x_val, y_val, "validation")
        else:
            x_val = y_val = None
        self.has_validation = x_val is not None
        steps_per_epoch = math.ceil(self._epoch_size(y_train) / self.batch_size)
        planned = self.schedule.planned_steps()
        if planned is not None:
            self.epochs = math.ceil(planned / steps_per_epoch)
            self.max_steps = planned
        else:
            self.max_steps = self.epochs * steps_per_epoch
        self.schedule.total_steps = self.max_steps
        if self._epoch_order is not None and (self._epoch_order.size and self._epoch_order.max() >= len(x_train)):
            raise CheckpointError("the checkpoint's epoch order indexes past the training set: "
                                  "resume with the same training data")
        train_eval_rows = self._train_eval_rows(len(x_train))

        try:
            self._dispatch("on_fit_start")
            while not self._finished():
                self._run_epoch(self.epoch + 1, x_train, y_train, x_val, y_val, train_eval_rows)
            self._dispatch("on_fit_end", self.history)
        except BaseException as exc:
            for callback in self.callbacks:
                try:
                    callback.on_exception(self, exc)
                except Exception:  # a failing reporter must not mask the real error
                    pass
            raise
        return self.history

    def _finished(self) -> bool:
        return self.stop_training or self.epoch >= self.epochs or self.step >= self.max_steps

    def _check_data(self, x, y, what):
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim != 4 or x.shape[1:] != self.network.input_shape:
            raise DataError(f"{what} images have shape {x.shape}, expected (N, {', '.join(map(str, self.network.input_shape))})")
        if y.shape != (x.shape[0],):
            raise DataError(f"{what} labels have shape {y.shape}, expected ({x.shape[0]},) for {x.shape[0]} images")
        if x.shape[0] == 0:
            raise DataError(f"the {what} set is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self.network.num_classes:
            raise DataError(f"{what} labels must be integers in [0, {self.network.num_classes}), "
                            f"got {y.dtype} in [{y.min()}, {y.max()}]")
        return np.ascontiguousarray(x, dtype=self.network.dtype), y.astype(np.int64, copy=False)

    def _epoch_size(self, y) -> int:
        if not self.balanced:
            return len(y)
        counts = np.bincount(y)
        counts = counts[counts > 0]
        return int(counts.size * counts.min())

    def _epoch_order_for(self, y) -> np.ndarray:
        if self.balanced:
            from convtrain.data import class_balanced_indices
            return class_balanced_indices(y, self.rng)
        return self.rng.permutation(len(y))

    def _train_eval_rows(self, n: int) -> np.ndarray | None:
        if self.train_eval_limit is None or n <= self.train_eval_limit:
            return None
        rows = np.random.default_rng([self.seed, 2]).choice(n, self.train_eval_limit, replace=False)
        return np.sort(rows)

    def _run_epoch(self, epoch, x_train, y_train, x_val, y_val, train_eval_rows) -> None:
        bs = self.batch_size
        self._dispatch("on_epoch_start", epoch)
        started = time.perf_counter()
        if self._epoch_order is None:  # not resuming mid-epoch
            self._epoch_order = self._epoch_order_for(y_train)
            self._batches_done = 0
        order = self._epoch_order
        num_batches = math.ceil(len(order) / bs)
        images = 0
        for batch in range(self._batches_done, num_batches):
            if self.step >= self.max_steps:
                break
            rows = order[batch * bs:(batch + 1) * bs]
            xb, yb = x_train[rows], y_train[rows]
            if self.augment:
                from convtrain.data import augment_batch
                xb = augment_batch(xb, self.rng)
            lr = self.schedule.lr(self.step, epoch)
            loss, cost, accuracy = self.train_step(xb, yb, lr)
            if loss is None:
                self._diverged(f"the training loss became {cost}", epoch, batch + 1, num_batches)
            self.step += 1
            self._batches_done = batch + 1
            images += len(rows)
            self._dispatch("on_batch_end", self.step,
                           {"loss": loss, "cost": cost, "accuracy": accuracy, "lr": lr, "batch_size": len(rows)})
            if self._stop_requested:
                self._interrupt(epoch, num_batches)
        train_seconds = time.perf_counter() - started

        logs: dict[str, Any] = {}
        x_eval, y_eval = (x_train, y_train) if train_eval_rows is None else (x_train[train_eval_rows], y_train[train_eval_rows])
        logs.update({f"train_{k}": v for k, v in self.evaluate(x_eval, y_eval).items()})
        if x_val is not None:
            logs.update({f"val_{k}": v for k, v in self.evaluate(x_val, y_val).items()})
        logs["learning_rate"] = float(self.schedule.lr(max(self.step - 1, 0), epoch))
        logs["epoch_seconds"] = time.perf_counter() - started
        logs["images_per_second"] = images / train_seconds if train_seconds > 0 else float("nan")
        if not math.isfinite(logs["train_loss"]):
            self._diverged(f"the training loss evaluated after the epoch is {logs['train_loss']}", epoch, None, num_batches)

        self.epoch = epoch
        self._epoch_order = None
        self._batches_done = 0
        self.history.append(epoch, logs)
        self._dispatch("on_epoch_end", epoch, logs)
        if self._stop_requested:
            self._interrupt(epoch, num_batches)

    def train_step(self, xb, yb, lr: float) -> tuple[float | None, float, float]:
        """One update on a batch: (loss, cost, accuracy) before the update. A non-finite loss
        leaves the weights untouched and returns (None, loss, nan)."""
        network = self.network
        # Overflow on the way to a non-finite loss is reported as divergence (by the caller, or
        # at the next batch), not as numpy RuntimeWarnings around that one-line error.
        with np.errstate(over="ignore", invalid="ignore"):
            scores = network.forward(xb, train=True)
            loss, dscores = softmax_cross_entropy(scores, yb, self.label_smoothing)
            if not math.isfinite(loss):
                return None, loss, float("nan")
            network.backward(dscores)
            network.add_l2_gradients(self.l2)
            cost = loss + self.l2 * network.l2_penalty() if self.l2 else loss
            grads = network.gradients()
            if self.clip_norm:
                clip_grad_norm_(grads, self.clip_norm)  # the cost's gradient, L2 term included
            self.optimizer.step(grads, lr)
        accuracy = float(np.count_nonzero(scores.argmax(axis=1) == yb)) / len(yb)
        return loss, cost, accuracy

    def evaluate(self, x, y) -> dict[str, float]:
        """loss, cost, accuracy and balanced accuracy of normalized x in eval mode."""
        from convtrain.data import balanced_accuracy

        network = self.network
        loss_sum = 0.0
        predictions = np.empty(len(y), dtype=np.int64)
        for start in range(0, len(y), self.eval_batch_size):
            stop = start + self.eval_batch_size
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite: divergence, reported by fit
                scores = network.forward(x[start:stop], train=False)
                loss_sum += cross_entropy_sum(scores, y[start:stop])
            predictions[start:stop] = scores.argmax(axis=1)
        loss = loss_sum / len(y)
        return {
            "loss": loss,
            "cost": loss + self.l2 * network.l2_penalty(),
            "accuracy": float(np.mean(predictions == y)),
            "balanced_accuracy": balanced_accuracy(y, predictions, network.num_classes),
        }

    # ---- failure paths --------------------------------------------------------------

    def _last_good(self) -> str:
        if self.checkpoint_path is None:
            return "no checkpoint was written" + ("" if self.checkpoint_dir else " (no checkpoint directory)")
        return f"the last good checkpoint is {self.checkpoint_path} (epoch {self._checkpoint_epoch})"

    def _diverged(self, what: str, epoch: int, batch: int | None, num_batches: int):
        where = f"epoch {epoch}" + (f", batch {batch}/{num_batches}" if batch is not None else "")
        raise TrainingDiverged(
            f"{what} at {where} (update {self.step + 1}); {self._last_good()}; "
            f"try a lower learning rate",
            epoch=epoch, batch=batch, checkpoint=self.checkpoint_path)

    def _interrupt(self, epoch: int, num_batches: int):
        self._stop_requested = False
        where = (f"epoch {epoch}, batch {self._batches_done}/{num_batches}" if self._epoch_order is not None
                 else f"the end of epoch {epoch}")
        path = self.save_checkpoint() if self.checkpoint_dir is not None else None
        saved = f"checkpoint written to {path}" if path else "no checkpoint directory, nothing saved"
        raise TrainingInterrupted(f"training stopped at {where} (update {self.step}); {saved}", checkpoint=path)

    # ---- checkpoints ----------------------------------------------------------------

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the complete training state atomically (default checkpoint_dir/checkpoint.npz).
        Refuses non-finite weights, so the last good checkpoint is never overwritten by NaNs."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ConfigError("save_checkpoint: no path given and the trainer has no checkpoint_dir")
            path = self.checkpoint_dir / CHECKPOINT_NAME
        path = Path(path)
        for name, value in self.network.parameters().items():
            if not np.isfinite(value).all():
                raise TrainingDiverged(
                    f"parameter {name} is not finite after update {self.step} (epoch {self.epoch + 1}); "
                    f"not writing a checkpoint; {self._last_good()}",
                    epoch=self.epoch + 1, checkpoint=self.checkpoint_path)
        arrays = self.network.to_arrays()
        arrays["format"] = np.array(CHECKPOINT_FORMAT)
        arrays.update(layer_state_arrays(self))
        mid_epoch = self._epoch_order is not None
        arrays["trainer"] = json_entry({
            "epoch": self.epoch, "step": self.step, "epochs": self.epochs, "batch_size": self.batch_size,
            "l2": self.l2, "seed": self.seed, "stop_training": self.stop_training,
            "mid_epoch": mid_epoch, "batches_done": self._batches_done if mid_epoch else 0,
        })
        arrays["epoch_order"] = self._epoch_order if mid_epoch else np.empty(0, dtype=np.int64)
        arrays["rng"] = json_entry(self.rng.bit_generator.state)
        arrays["schedule"] = json_entry(self.schedule.to_dict())
        arrays["history"] = json_entry(self.history.to_dict())
        arrays["callbacks"] = json_entry({c.key: c.state_dict() for c in self.callbacks})
        for callback in self.callbacks:
            for name, value in callback.state_arrays().items():
                arrays[f"callback/{callback.key}/{name}"] = value
        if self.config is not None:
            arrays["config"] = text_entry(self.config.to_toml())
        write_npz_atomic(path, arrays)
        self.checkpoint_path = path
        self._checkpoint_epoch = self.epoch if not mid_epoch else f"{self.epoch + 1}, mid-epoch"
        self._dispatch("on_checkpoint", path)
        return path

    def resume(self, checkpoint_path: str | Path) -> None:
        """Restore the state saved by save_checkpoint; the next fit() continues from there."""
        path = Path(checkpoint_path)
        arrays = read_npz(path, "checkpoint")
        if "trainer" not in arrays:
            raise CheckpointError(f"checkpoint file {str(path)!r} is a saved model, not a training checkpoint")
        architecture = read_json(arrays, "architecture", path, "checkpoint")
        if architecture != self.network.architecture:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} was written for a different network "
                f"({architecture}) than this one ({self.network.architecture})")
        state = read_json(arrays, "trainer", path, "checkpoint")
        if state["mid_epoch"] and state["batch_size"] != self.batch_size:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} stopped mid-epoch with batch size {state['batch_size']}; "
                f"resume with the same batch size (not {self.batch_size})")
        params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
        self.network.set_parameters(params, source=f"checkpoint file {str(path)!r}")
        self.network.normalization = read_json(arrays, "normalization", path, "checkpoint")
        self.network.class_names = read_json(arrays, "class_names", path, "checkpoint")
        self.network.meta = read_json(arrays, "meta", path, "checkpoint") or {}
        load_layer_state(self, arrays, path)

        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.stop_training = bool(state["stop_training"])
        if state["mid_epoch"]:
            self._epoch_order = arrays["epoch_order"].astype(np.int64)
            self._batches_done = int(state["batches_done"])
        else:
            self._epoch_order, self._batches_done = None, 0
        try:
            self.rng.bit_generator.state = read_json(arrays, "rng", path, "checkpoint")
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint file {str(path)!r}: unusable generator state ({exc})") from None
        self.history = History.from_dict(read_json(arrays, "history", path, "checkpoint"))
        self.history.monitor = self.monitor
        callback_states = read_json(arrays, "callbacks", path, "checkpoint")
        for callback in self.callbacks:
            if callback.key in callback_states:
                callback.load_state_dict(callback_states[callback.key])
            prefix = f"callback/{callback.key}/"
            saved = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if saved:
                callback.load_state_arrays(saved)
        self.checkpoint_path = path
        self._checkpoint_epoch = self.epoch
