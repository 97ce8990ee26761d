"""`convtrain.fit(config)`: one whole training run, the same one `convtrain fit` makes.

    from convtrain import FitConfig, fit
    result = fit(FitConfig(epochs=3))
    result.metrics["test_accuracy"], result.run_id, result.model_path

A fit is three steps, each going down the layers once:
    prepare(config, lock)   pipeline/prepare.py  validation, data, network, MLflow run, run folder
    train(plan)             pipeline/train.py    the trainer and its callbacks, resumed or new
    finish(plan, outcome)   pipeline/finish.py   model.npz, final evaluation, plots, TrackedRun.end_fit
Bad input fails in `prepare` before anything is written; past that, a failure or an interrupt
ends the MLflow run as FAILED or KILLED (pipeline/failures.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from convtrain.config import FitConfig
from convtrain.errors import TrainingInterrupted
from convtrain.pipeline.failures import ends_run_on_failure
from convtrain.pipeline.finish import FitResult, finish
from convtrain.pipeline.prepare import prepare
from convtrain.pipeline.train import train
from convtrain.training.callbacks import Callback
from convtrain.training import plot_worker
from convtrain.training.run_folder import RunFolderLock
from convtrain.training.signals import sigterm_as_keyboard_interrupt

__all__ = ["FitResult", "fit"]


def fit(config: FitConfig, *, callbacks: Iterable[Callback] = (), resume: str | Path | None = None,
        parent_run_id: str | None = None, tags: dict | None = None, progress: Any = "auto") -> FitResult:
    """Train as configured; returns a FitResult. See the module docstring for the steps.

    resume: a checkpoint path (or anything `resolve_checkpoint` accepts); the fit continues in
        the checkpoint's folder and MLflow run.
    parent_run_id: make the MLflow run a child of this run (sweeps).
    tags: extra MLflow tags for the run.
    progress: "auto" (bars on a terminal, lines elsewhere), "quiet" (final table only), "none"
        or None (nothing), or a Callback of your own.
    Exceptions propagate after the MLflow run is marked FAILED (or KILLED on interruption).
    """
    # The whole fit holds its output folder (one writer per folder), and SIGTERM ends it like
    # Ctrl-C from the very start, so a signal while the data loads also ends with one line.
    # The plot workers are forked first, before the fit has a thread, a lock or a store open, to
    # import matplotlib while it loads, opens its store and trains; they end with the fit,
    # whatever its outcome (training/plot_worker.py); a sweep worker's trials share its workers.
    with plot_worker.for_fit() as plot_workers, sigterm_as_keyboard_interrupt(), RunFolderLock() as lock:
        try:
            plan = prepare(config, lock, resume=resume, parent_run_id=parent_run_id or config.parent_run,
                           tags=tags, callbacks=callbacks, progress=progress)
        except KeyboardInterrupt:  # before the run and the output folder exist
            raise TrainingInterrupted("stopped by an interrupt while setting up the fit, before anything "
                                      "was written") from None
        plan.plot_workers = plot_workers
        with ends_run_on_failure(plan):
            return finish(plan, train(plan))
