"""Callbacks: everything around the training loop (checkpoints, early stopping, progress,
MLflow logging) hooks in here instead of being a special case of the Trainer.

Hooks are called in the order the callbacks are listed in `trainer.callbacks`; the Trainer
puts EarlyStopping first (so it restores the best weights before others see on_fit_end) and
Checkpoint last (so the checkpoint holds everyone's state after on_epoch_end).

Setting `trainer.stop_training = True` ends the fit cleanly after the current epoch (its
evaluation, on_epoch_end and checkpoint included). After a resume from a mid-epoch
checkpoint, on_epoch_start is called again for the remainder of that epoch.
"""

from __future__ import annotations

import math

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
    (and of the last one); see Trainer.save_checkpoint for what it holds."""

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
