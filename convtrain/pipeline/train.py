"""The second step of a fit: the trainer and its callbacks, set up (or resumed) and run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from convtrain.training.callbacks import BatchLossRecorder, EarlyStopping
from convtrain.training.run_folder import RunFolder
from convtrain.training.signals import stop_on_signals


@dataclass
class TrainOutcome:
    trainer: Any                  # convtrain.training.trainer.Trainer, its network trained
    history: Any                  # its History callback
    batch_losses: BatchLossRecorder
    stopped_epoch: int | None     # the epoch early stopping ended the fit at, None if it ran every epoch


def train(plan) -> TrainOutcome:
    """Build the trainer (progress, batch losses, MLflow, the caller's callbacks; the Trainer adds
    early stopping and checkpoints), write its first checkpoint or resume the saved one, then
    train until the end, early stopping or a signal (stop_on_signals)."""
    from convtrain.training.trainer import Trainer

    config, network, splits = plan.config, plan.network, plan.splits
    recorder = BatchLossRecorder(config.log_every)
    tracking = []
    if plan.run is not None:
        from convtrain.tracking.callback import MLflowCallback

        tracking.append(MLflowCallback(plan.run, log_every=config.log_every))
    callbacks = [*([plan.progress] if plan.progress else []), recorder, *tracking, *plan.callbacks]
    trainer = plan.trainer = Trainer.from_config(network, config, callbacks=callbacks, checkpoint_dir=plan.out_dir)
    timings = plan.timings
    training_started = time.monotonic()
    if plan.resume_from is not None:
        trainer.resume(plan.resume_from)
        config.save_toml(RunFolder(plan.out_dir).config)  # only once the resume is known to work
    else:
        # The epoch-0 checkpoint: initial weights, generator state and (in the MLflow
        # callback's state) the run id, written as soon as the run exists and before the
        # slower logging below, so a fit killed at any later moment -- even before its
        # first epoch ends -- resumes into this run instead of leaving it RUNNING forever.
        trainer.save_checkpoint()
    if plan.run is not None:
        store_started = time.monotonic()
        plan.run.begin_fit(config, splits, plan.out_dir, resumed=plan.resume_from is not None)
        timings.add("store", time.monotonic() - store_started)
        training_started += time.monotonic() - store_started

    x_train = network.normalize(splits.x_train)
    x_val = network.normalize(splits.x_val) if splits.x_val is not None and len(splits.x_val) else None
    plan.stage = "training"
    with stop_on_signals(trainer):
        history = trainer.fit(x_train, splits.y_train, x_val, splits.y_val if x_val is not None else None)
    timings.add("training", time.monotonic() - training_started)
    timings.move("training", "evaluation", trainer.evaluation_seconds)
    return TrainOutcome(trainer, history, recorder, _early_stopped_epoch(trainer))


def _early_stopped_epoch(trainer) -> int | None:
    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    return stopper.stopped_epoch if stopper is not None and stopper.stopped_epoch else None
