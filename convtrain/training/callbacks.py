"""Callbacks: everything around the training loop (history, checkpoints, early stopping,
progress, MLflow logging) hooks in here instead of being a special case of the Trainer.

The Trainer holds one CallbackList, which owns the order, the dispatch and the errors: History
first (every later callback sees the epoch in `trainer.history`), then EarlyStopping (so it
restores the best weights before others see on_fit_end), the rest in the given order, and
Checkpoint last (so the checkpoint holds everyone's state after on_epoch_end).

Setting `trainer.stop_training = True` ends the fit cleanly after the current epoch (its
evaluation, on_epoch_end and checkpoint included). After a resume from a mid-epoch
checkpoint, on_epoch_start is called again for the remainder of that epoch.
`trainer.steps_per_epoch` (updates in a full epoch) is set before on_fit_start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from convtrain.errors import ConfigError


class Callback:
    """All hooks are no-ops. Epochs are 1-based; `step` counts updates (1-based)."""

    @property
    def key(self) -> str:
        """Name under which this callback's state is stored in a checkpoint: the class name
        unless a subclass sets `key = "..."` (class attribute) or an instance assigns one."""
        return self.__dict__.get("_key", type(self).__name__)

    @key.setter
    def key(self, value: str) -> None:
        self.__dict__["_key"] = str(value)

    def on_fit_start(self, trainer): ...

    def on_epoch_start(self, trainer, epoch: int): ...

    def on_batch_end(self, trainer, step: int, logs: dict): ...

    def on_epoch_end(self, trainer, epoch: int, logs: dict): ...

    def on_checkpoint(self, trainer, path): ...

    def on_fit_end(self, trainer, history): ...

    def on_exception(self, trainer, exc: BaseException): ...

    def state_dict(self) -> dict:
        """JSON-able state saved in each checkpoint under `key`."""
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Array state saved in each checkpoint (e.g. best weights); names without '/'."""
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...


class Checkpoint(Callback):
    """Write trainer.checkpoint_dir/checkpoint.npz at the end of every `every`-th epoch
    (and of the last one); see training/checkpoint.py for what it holds."""

    def __init__(self, every: int = 1):
        if every < 1:
            raise ConfigError(f"checkpoint every: got {every}, expected a positive number of epochs")
        self.every = int(every)

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch % self.every == 0 or epoch == trainer.epochs or trainer.stop_training:
            trainer.save_checkpoint()


def monitor_mode(monitor: str) -> str:
    """'min' for losses/costs, 'max' for accuracies."""
    return "max" if "accuracy" in monitor else "min"


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs; at the end of the fit,
    restore the weights of the best epoch (kept in memory and in checkpoints)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = True):
        if patience < 1:
            raise ConfigError(f"patience: got {patience}, expected a positive number of epochs")
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.best_weights: dict[str, np.ndarray] = {}

    def on_fit_start(self, trainer):
        if trainer.has_validation is False and self.monitor.startswith("val_"):
            raise ConfigError(
                f"monitor: {self.monitor!r} needs a validation set; use a validation split or monitor 'train_loss'")

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs.get(self.monitor)
        if value is None:
            raise ConfigError(f"monitor: {self.monitor!r} is not among the epoch metrics {sorted(logs)}")
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            if self.restore_best:
                self.best_weights = {k: v.copy() for k, v in trainer.network.parameters().items()}
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                trainer.stop_training = True

    def on_fit_end(self, trainer, history):
        if self.restore_best and self.best_weights and self.best_epoch != trainer.epoch:
            trainer.network.set_parameters(self.best_weights, source="early stopping's best weights")

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state):
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = state.get("stopped_epoch")

    def state_arrays(self):
        return dict(self.best_weights)

    def load_state_arrays(self, arrays):
        self.best_weights = {k: v.copy() for k, v in arrays.items()}


class BatchLossRecorder(Callback):
    """Keeps (step, loss) every `every` updates for the learning-curve plot; survives resume."""

    key = "batch_losses"

    def __init__(self, every: int):
        self.every = every
        self.points: list[tuple[int, float]] = []

    def on_batch_end(self, trainer, step, logs):
        if step % self.every == 0:
            self.points.append((int(step), float(logs["loss"])))

    def state_dict(self):
        return {"points": self.points}

    def load_state_dict(self, state):
        self.points = [(int(s), float(v)) for s, v in state.get("points", [])]

    def curve(self, steps_per_epoch: int) -> list[tuple[float, float]]:
        """(fractional epoch, loss) pairs, as the learning-curve plot draws them."""
        return [(step / steps_per_epoch, loss) for step, loss in self.points]


@dataclass
class History(Callback):
    """Per-epoch metrics: each entry is the on_epoch_end logs plus "epoch". The trainer's
    `history`; checkpoints keep it under their own "history" entry."""

    key = "history"

    monitor: str = "val_loss"
    epochs: list[dict] = field(default_factory=list)

    def on_epoch_end(self, trainer, epoch, logs):
        self.append(epoch, logs)

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

    def state_dict(self) -> dict:
        return self.to_dict()

    def load_state_dict(self, state: dict) -> None:
        # the epochs only: what is monitored is the resumed fit's choice
        self.epochs = [dict(e) for e in state.get("epochs", [])]


class CallbackList:
    """The trainer's callbacks: their order, one key each, dispatch, and the fan-out of an error.

    Each hook method has the Callback signature and calls that hook of every callback in order.
    `on_exception` reaches every callback even if some of them fail, and a failure there never
    replaces the error being reported.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()):
        callbacks = list(callbacks)
        keys = [c.key for c in callbacks]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ConfigError(f"callbacks: two callbacks share the key {duplicates[0]!r}; give one a distinct `key`")
        def rank(callback: Callback) -> int:
            return (0 if isinstance(callback, History) else 1 if isinstance(callback, EarlyStopping)
                    else 3 if isinstance(callback, Checkpoint) else 2)

        self.callbacks = sorted(callbacks, key=rank)  # stable: the given order within a rank

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def call(self, hook: str, trainer, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(trainer, *args)

    def on_fit_start(self, trainer):
        self.call("on_fit_start", trainer)

    def on_epoch_start(self, trainer, epoch):
        self.call("on_epoch_start", trainer, epoch)

    def on_batch_end(self, trainer, step, logs):
        self.call("on_batch_end", trainer, step, logs)

    def on_epoch_end(self, trainer, epoch, logs):
        self.call("on_epoch_end", trainer, epoch, logs)

    def on_checkpoint(self, trainer, path):
        self.call("on_checkpoint", trainer, path)

    def on_fit_end(self, trainer, history):
        self.call("on_fit_end", trainer, history)

    def on_exception(self, trainer, exc: BaseException):
        for callback in self.callbacks:
            try:
                callback.on_exception(trainer, exc)
            except Exception:  # a failing reporter must not mask the real error
                pass

    def state_dict(self) -> dict[str, dict]:
        """{key: state_dict()} of every callback."""
        return {c.key: c.state_dict() for c in self.callbacks}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        """Give each callback the state saved under its key (callbacks new to the fit start fresh)."""
        for callback in self.callbacks:
            if callback.key in states:
                callback.load_state_dict(states[callback.key])

    def state_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        """{key: state_arrays()} of the callbacks that have array state."""
        return {c.key: arrays for c in self.callbacks if (arrays := c.state_arrays())}

    def load_state_arrays(self, arrays: dict[str, dict[str, np.ndarray]]) -> None:
        for callback in self.callbacks:
            if arrays.get(callback.key):
                callback.load_state_arrays(arrays[callback.key])
