"""Trainer: epochs of shuffled mini-batches, per-epoch evaluation, callbacks, exact resume.

One update (step.py): forward -> softmax cross-entropy (optionally label-smoothed) -> backward ->
+ 2*l2*W -> (clip the gradients to a global norm) -> SGD or AdamW step at the schedule's
learning rate. After each epoch the validation set is evaluated in eval mode: loss, cost,
accuracy, balanced accuracy. The same metrics of the training set are, with
`train_metrics="running"`, the mean over the epoch's own batches (metrics.RunningMetrics: no
second pass, but each batch scored in training mode by the weights before its update), or with
"full" the training set re-scored in eval mode after the epoch (all of it up to
`train_eval_limit` images, else a fixed seeded subset of that size).

Random streams, all derived from `seed`: the shuffling/augmentation generator
(default_rng([seed, 1]); data.augment draws from it after each batch's rows are known) and
the dropout generator (default_rng([seed, 3])) are the only random state that evolves; the training-evaluation subset
(default_rng([seed, 2])) is recomputed from the seed. Network initialization uses
default_rng([seed, 0]) (see Network.initialize).

Resuming is exact. A checkpoint (training/checkpoint.py, the format's one owner) holds the
weights, batch norm's running statistics, the optimizer's state (SGD's velocities or AdamW's
moments), update count, epoch, the shuffling and dropout generators' states, history and
callbacks' state (the network's arrays plus the trainer's state_dict()); a checkpoint written mid-epoch (request_stop) also holds that epoch's sample
order, the number of batches done and the running sums of its training metrics. Since
those are all the inputs of the remaining computation, a resumed fit makes the same
floating-point operations in the same order as an uninterrupted one and ends with the same
weights bit for bit (given the same thread count: reductions split by thread).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from convtrain.data.augment import AugmentPlan, augmented_batch, plan_for
from convtrain.errors import CheckpointError, ConfigError
from convtrain.nn import backend
from convtrain.nn.network import EVAL_BATCH_SIZE
from convtrain.nn.optim import SGD, Schedule, make_optimizer, make_schedule, training_length
from convtrain.training.callbacks import Callback, CallbackList, Checkpoint, EarlyStopping, History
from convtrain.training.checkpoint import TrainingCheckpoint
from convtrain.training.inputs import checked_inputs
from convtrain.training.metrics import RunningMetrics, evaluate_network
from convtrain.training.run_folder import RunFolder
from convtrain.training.sampling import epoch_order, epoch_size, train_eval_rows
from convtrain.training.scored_validation import ScoredValidation
from convtrain.training.step import train_step
from convtrain.training.stopping import check_finite_parameters, diverged, interrupted


RUNNING_KEY = "running_metrics"  # in the checkpoint's callbacks entry: no callback has this key


class Trainer:
    def __init__(self, network, optimizer: SGD, schedule: Schedule, *, epochs: int, batch_size: int,
                 l2: float, seed: int = 0, callbacks: Iterable[Callback] = (),
                 checkpoint_dir: str | Path | None = None, patience: int | None = None,
                 monitor: str = "val_loss", balanced: bool = False, augment: "AugmentPlan | bool" = False,
                 config=None, train_eval_limit: int | None = 10_000, eval_batch_size: int = EVAL_BATCH_SIZE,
                 label_smoothing: float = 0.0, clip_norm: float | None = None, train_metrics: str = "full"):
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
        _check_loop_options(self.label_smoothing, self.clip_norm, train_metrics)
        self.train_metrics = train_metrics
        self.seed = int(seed)
        self.monitor = monitor
        self.balanced = bool(balanced)
        self.augment = _augment_plan(augment)
        self.config = config
        self.train_eval_limit = train_eval_limit
        self.eval_batch_size = int(eval_batch_size)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        backend.configure()  # process-wide kernel set-up; keeps what each step frees for the next

        self.history = History(monitor=monitor)
        self.callbacks = CallbackList([self.history, *_with_defaults(callbacks, patience, monitor,
                                                                     self.checkpoint_dir is not None)])

        self.rng = np.random.default_rng([self.seed, 1])
        self.dropout_rng = np.random.default_rng([self.seed, 3])
        network.set_dropout_generator(self.dropout_rng)
        self.epoch = 0             # last finished epoch
        self.step = 0              # updates done
        self.checkpoint_path: Path | None = None   # last good checkpoint
        self.resumed_from: Path | None = None      # the checkpoint resume() restored, if any
        self.stop_training = False
        self.has_validation: bool | None = None
        self.max_steps: int | None = None
        self.steps_per_epoch: int | None = None    # updates in a full epoch, set by fit()
        self.epoch_order: np.ndarray | None = None  # sample order of the epoch in progress
        self.batches_done = 0                        # batches of that epoch already applied
        self.running: RunningMetrics | None = None   # its training metrics so far ("running")
        self.evaluation_seconds = 0.0  # spent scoring after epochs, in this process
        self.scored_validation = ScoredValidation()  # for the final evaluation, in this process
        self._stop_requested = False
        self.checkpoint_epoch: int | str | None = None  # the last good checkpoint's, for messages

    @classmethod
    def from_config(cls, network, config, callbacks: Iterable[Callback] = (),
                    checkpoint_dir: str | Path | None = None) -> "Trainer":
        return cls(network, make_optimizer(network, config), make_schedule(config), epochs=config.epochs,
                   batch_size=config.batch_size, l2=config.l2, seed=config.seed, callbacks=callbacks,
                   checkpoint_dir=checkpoint_dir, patience=config.patience, monitor=config.monitor,
                   balanced=config.balanced, augment=plan_for(config), config=config,
                   label_smoothing=getattr(config, "label_smoothing", 0.0),
                   clip_norm=getattr(config, "clip_norm", None),
                   train_metrics=getattr(config, "train_metrics", "full"))

    # ---- control --------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop at the next batch boundary, write a checkpoint, raise TrainingInterrupted.
        Safe to call from a signal handler (it only sets a flag)."""
        self._stop_requested = True

    # ---- fit ------------------------------------------------------------------------

    def fit(self, x_train, y_train, x_val=None, y_val=None) -> History:
        """Train on normalized inputs (N, C, H, W) until `epochs` (or the schedule's planned
        updates, or early stopping); continues after the last finished epoch when resumed."""
        x_train, y_train = checked_inputs(self.network, x_train, y_train, "training")
        if x_val is not None and len(x_val):
            x_val, y_val = checked_inputs(self.network, x_val, y_val, "validation")
        else:
            x_val = y_val = None
        self.has_validation = x_val is not None
        self.steps_per_epoch = math.ceil(epoch_size(y_train, self.balanced) / self.batch_size)
        self.epochs, self.max_steps = training_length(self.schedule, self.epochs, self.steps_per_epoch)
        self.schedule.plan(self.max_steps, self.step)  # a resumed fit of another length re-plans from here
        if self.epoch_order is not None and (self.epoch_order.size and self.epoch_order.max() >= len(x_train)):
            raise CheckpointError("the checkpoint's epoch order indexes past the training set: "
                                  "resume with the same training data")
        eval_rows = train_eval_rows(len(x_train), self.train_eval_limit, self.seed)

        try:
            self.callbacks.on_fit_start(self)
            while not self._finished():
                self._run_epoch(self.epoch + 1, x_train, y_train, x_val, y_val, eval_rows)
            self.callbacks.on_fit_end(self, self.history)
        except BaseException as exc:
            self.callbacks.on_exception(self, exc)
            raise
        return self.history

    def _finished(self) -> bool:
        return self.stop_training or self.epoch >= self.epochs or self.step >= self.max_steps

    def _run_epoch(self, epoch, x_train, y_train, x_val, y_val, eval_rows) -> None:
        bs = self.batch_size
        self.callbacks.on_epoch_start(self, epoch)
        started = time.perf_counter()
        if self.epoch_order is None:  # not resuming mid-epoch
            self.epoch_order = epoch_order(y_train, self.rng, self.balanced)
            self.batches_done = 0
            self.running = RunningMetrics(self.network.num_classes) if self.train_metrics == "running" else None
        order = self.epoch_order
        num_batches = math.ceil(len(order) / bs)
        images = 0
        for batch in range(self.batches_done, num_batches):
            if self.step >= self.max_steps:
                break
            rows = order[batch * bs:(batch + 1) * bs]
            xb, yb = x_train[rows], y_train[rows]
            xb, mixed = augmented_batch(xb, yb, self.augment, self.rng)
            lr = self.schedule.lr(self.step, epoch)
            loss, cost, accuracy = self.train_step(xb, yb, lr, mixed=mixed)
            if loss is None:
                raise diverged(self, f"the training loss became {cost}", epoch, batch + 1, num_batches)
            self.step += 1
            self.batches_done = batch + 1
            images += len(rows)
            self.callbacks.on_batch_end(
                self, self.step, {"loss": loss, "cost": cost, "accuracy": accuracy, "lr": lr, "batch_size": len(rows)})
            if self._stop_requested:
                self._stop_requested = False
                raise interrupted(self, epoch, num_batches)
        train_seconds = time.perf_counter() - started

        logs: dict[str, Any] = {}
        evaluation_started = time.perf_counter()
        if self.running is not None and self.running.images:
            train_values = self.running.values()
        else:  # "full", or a mid-epoch checkpoint written before running sums were kept
            x_eval, y_eval = (x_train, y_train) if eval_rows is None else (x_train[eval_rows], y_train[eval_rows])
            train_values = self.evaluate(x_eval, y_eval)
        logs.update({f"train_{k}": v for k, v in train_values.items()})
        if x_val is not None:
            values, predictions = self.evaluate(x_val, y_val, return_predictions=True)
            logs.update({f"val_{k}": v for k, v in values.items()})
            self.scored_validation.keep(epoch, self.history.best_epoch, self.network, predictions)
        self.evaluation_seconds += time.perf_counter() - evaluation_started
        logs["learning_rate"] = float(self.schedule.lr(max(self.step - 1, 0), epoch))
        logs["epoch_seconds"] = time.perf_counter() - started
        logs["images_per_second"] = images / train_seconds if train_seconds > 0 else float("nan")
        if not math.isfinite(logs["train_loss"]):
            raise diverged(self, f"the training loss evaluated after the epoch is {logs['train_loss']}", epoch,
                           None, num_batches)

        self.epoch = epoch
        self.epoch_order = None
        self.batches_done = 0
        self.running = None
        self.callbacks.on_epoch_end(self, epoch, logs)  # History first: it records the epoch
        if self._stop_requested:
            self._stop_requested = False
            raise interrupted(self, epoch, num_batches)

    def train_step(self, xb, yb, lr: float, mixed=None) -> tuple[float | None, float, float]:
        """One update on a batch: (loss, cost, accuracy) before it; see step.train_step."""
        return train_step(self.network, self.optimizer, xb, yb, lr, l2=self.l2,
                          label_smoothing=self.label_smoothing, clip_norm=self.clip_norm, mixed=mixed,
                          tally=self.running)

    def evaluate(self, x, y, *, normalize: bool = False, return_predictions: bool = False):
        """loss, cost, accuracy and balanced accuracy of normalized x (raw images with
        `normalize`) in eval mode, and with return_predictions the predicted labels; see
        metrics.evaluate_network."""
        return evaluate_network(self.network, x, y, l2=self.l2, batch_size=self.eval_batch_size,
                                normalize=normalize, return_predictions=return_predictions)

    # ---- state ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The loop's state: counters, the epoch in progress, generators, schedule plan, optimizer
        and callbacks. With the network's arrays it is all a resumed fit needs (see the module
        docstring); TrainingCheckpoint stores it."""
        mid_epoch = self.epoch_order is not None
        return {"counters": {"epoch": self.epoch, "step": self.step, "epochs": self.epochs,
                             "batch_size": self.batch_size, "l2": self.l2, "seed": self.seed,
                             "stop_training": self.stop_training, "mid_epoch": mid_epoch,
                             "batches_done": self.batches_done if mid_epoch else 0},
                "epoch_order": self.epoch_order if mid_epoch else np.empty(0, dtype=np.int64),
                "rng": self.rng.bit_generator.state,
                "dropout_rng": self.dropout_rng.bit_generator.state if self.network.has_dropout else None,
                "schedule": self.schedule.to_dict(), "optimizer": self.optimizer.state_dict(),
                "callbacks": {**self.callbacks.state_dict(), **self._running_state(mid_epoch)},
                "callback_arrays": self.callbacks.state_arrays()}

    def _running_state(self, mid_epoch: bool) -> dict:
        """The running training metrics of the epoch in progress, kept beside the callbacks'
        states (under a key no callback takes) so the counters entry stays as it always was."""
        return {RUNNING_KEY: self.running.state_dict()} if mid_epoch and self.running is not None else {}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Continue from a state_dict(); keys an older checkpoint lacks (None) start fresh.
        `source` names the file in the one-line error for an unusable generator state."""
        counters = state["counters"]
        self.epoch, self.step = int(counters["epoch"]), int(counters["step"])
        self.stop_training = bool(counters["stop_training"])
        mid_epoch = bool(counters["mid_epoch"])
        self.epoch_order = np.asarray(state["epoch_order"], dtype=np.int64) if mid_epoch else None
        self.batches_done = int(counters["batches_done"]) if mid_epoch else 0
        # the epoch in progress goes on adding to its saved sums; a checkpoint without them
        # (or a "full" fit) has that epoch's training set re-scored at its end
        callback_states = dict(state["callbacks"])
        running = callback_states.pop(RUNNING_KEY, None)
        if not (mid_epoch and self.train_metrics == "running"):
            running = None
        self.running = (RunningMetrics.from_state(running, self.network.num_classes, source)
                        if running is not None else None)
        self.optimizer.load_state_dict(state["optimizer"])
        _load_generator(self.dropout_rng, state.get("dropout_rng"), f"{source}: unusable dropout generator state")
        _load_generator(self.rng, state["rng"], f"{source}: unusable generator state")
        if state.get("schedule") is not None:  # the cosine plan the fit followed so far
            self.schedule.load_plan(state["schedule"])
        self.callbacks.load_state_dict(callback_states)
        self.callbacks.load_state_arrays(state.get("callback_arrays") or {})

    # ---- checkpoints ----------------------------------------------------------------

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the complete training state atomically (default checkpoint_dir/checkpoint.npz;
        see TrainingCheckpoint). Refuses non-finite weights, so the last good checkpoint is
        never overwritten by NaNs."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ConfigError("save_checkpoint: no path given and the trainer has no checkpoint_dir")
            path = RunFolder(self.checkpoint_dir).checkpoint
        check_finite_parameters(self)
        mid_epoch = self.epoch_order is not None
        path = TrainingCheckpoint.capture(self).save(path)
        self.checkpoint_path = path
        self.checkpoint_epoch = self.epoch if not mid_epoch else f"{self.epoch + 1}, mid-epoch"
        self.callbacks.on_checkpoint(self, path)
        return path

    def resume(self, checkpoint: str | Path | TrainingCheckpoint) -> None:
        """Restore the state saved by save_checkpoint (a path, or a TrainingCheckpoint already
        read); the next fit() continues from there."""
        if not isinstance(checkpoint, TrainingCheckpoint):
            checkpoint = TrainingCheckpoint.load(checkpoint)
        checkpoint.restore(self)
        self.checkpoint_path = self.resumed_from = checkpoint.path
        self.checkpoint_epoch = self.epoch


def _check_loop_options(label_smoothing: float, clip_norm: float | None, train_metrics: str) -> None:
    if not 0 <= label_smoothing < 1 or (clip_norm is not None and clip_norm < 0):
        raise ConfigError(f"label_smoothing and clip_norm: got {label_smoothing} and {clip_norm}, "
                          f"expected a value in [0, 1) and a norm > 0")
    if train_metrics not in ("running", "full"):
        raise ConfigError(f"train_metrics: got {train_metrics!r}, expected running or full")


def _augment_plan(augment) -> AugmentPlan:
    """A plan, or for True the pipeline `--augment` meant before plans: flips and 2-pixel shifts."""
    if isinstance(augment, AugmentPlan):
        return augment
    return AugmentPlan(crop=2, flip=True) if augment else AugmentPlan()


def _load_generator(generator: np.random.Generator, state: dict | None, what: str) -> None:
    if state is None:
        return
    try:
        generator.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{what} ({exc})") from None


def _with_defaults(callbacks: Iterable[Callback], patience: int | None, monitor: str, checkpoints: bool) -> list:
    """The caller's callbacks, plus early stopping (with `patience`) and the checkpoint writer
    (with a checkpoint folder) unless the caller brought its own."""
    callbacks = list(callbacks)
    if patience is not None and not any(isinstance(c, EarlyStopping) for c in callbacks):
        callbacks.append(EarlyStopping(monitor=monitor, patience=patience))
    if checkpoints and not any(isinstance(c, Checkpoint) for c in callbacks):
        callbacks.append(Checkpoint())
    return callbacks
