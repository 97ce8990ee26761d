"""The last step of a fit: the model saved, the final evaluation, the plots, then one call that
hands the results to the MLflow run (TrackedRun.end_fit).

The plots are drawn by the fit's plot workers (training/plot_worker.py) while it evaluates the
final model and logs it to MLflow: the learning curves and filters are handed out before the
final evaluation, the confusion matrix after it, and the run waits for them only when it logs
them as artifacts, after the model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convtrain.config import FitConfig
from convtrain.training.metrics import Evaluation, confusion_matrix
from convtrain.training.plot_worker import PlotWorkers
from convtrain.training.run_folder import RunFolder


@dataclass
class FitResult:
    run_id: str | None
    history: Any  # convtrain.training.callbacks.History
    metrics: dict[str, float]  # the final model's train/val metrics, test_* and best_epoch
    model_path: Path
    checkpoint_path: Path | None
    out_dir: Path
    network: Any  # convtrain.nn.network.Network
    config: FitConfig
    tracking_uri: str | None = None
    experiment_id: str | None = None
    problems: list[str] = field(default_factory=list)  # e.g. metrics the tracking store did not take
    registered_model: str | None = None  # "NAME version N" with --register-model
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (pipeline/timings.py)


def finish(plan, outcome) -> FitResult:
    """Save the model, evaluate it, draw the plots and log it all; `plan.stage` says which."""
    config, network, splits, run = plan.config, plan.network, plan.splits, plan.run
    trainer, history, timings = outcome.trainer, outcome.history, plan.timings
    plan.stage = "saving the model"
    with timings.phase("model logging"):
        model_path = plan.model_path = network.save(RunFolder(plan.out_dir).model)
    metrics = dict(history.best if config.patience else history.last)
    metrics.pop("epoch", None)
    metrics["best_epoch"] = history.best_epoch
    if outcome.stopped_epoch:
        metrics["stopped_epoch"] = outcome.stopped_epoch
        _say(plan.progress, f"stopped at epoch {outcome.stopped_epoch}: {config.monitor} has not improved for "
                            f"{config.patience} epochs; restored epoch {history.best_epoch}")
    plan.stage = "writing the plots"
    workers = plan.plot_workers or PlotWorkers(0)
    folder = RunFolder(plan.out_dir).plots
    with timings.phase("plots"):  # handed to a worker, drawn while the fit goes on
        workers.draw(_model_free_plots(folder, history, outcome.batch_losses, trainer, network))
    plan.stage = "evaluating the final model"
    with timings.phase("evaluation"):
        evaluation = _final_evaluation(trainer, network, splits)
    metrics.update(evaluation.metrics)
    plan.stage = "writing the plots"
    with timings.phase("plots"):
        workers.draw([_confusion_plot(folder, evaluation)])
    problems = []

    def plots_written() -> list[Path]:
        """Wait for the figures (drawn here if a worker failed); the wait counts as plots."""
        waited = time.monotonic()
        stage, plan.stage = plan.stage, "writing the plots"
        paths, worker_problems = workers.results()
        plan.stage = stage
        problems.extend(worker_problems)
        timings.add("plots", time.monotonic() - waited)
        return paths

    if run is not None:
        from convtrain.tracking.tracked_run import FitRecord

        plan.stage = "logging the results to MLflow"
        logging_started = time.monotonic()
        plots_before = timings.seconds["plots"]
        problems += run.end_fit(FitRecord(
            config=config, network=network, splits=splits, history=history, metrics=metrics,
            test_metrics=evaluation.metrics, last_epoch=trainer.epoch, stopped_epoch=outcome.stopped_epoch,
            out_dir=plan.out_dir, plots=plots_written, checkpoint_path=trainer.checkpoint_path, model_path=model_path,
            input_example=np.ascontiguousarray(splits.x_train[:2]), wall_seconds=time.monotonic() - plan.started))
        timings.add("model logging", time.monotonic() - logging_started - (timings.seconds["plots"] - plots_before))
    else:
        plots_written()
    return FitResult(run_id=run.run_id if run else None, history=history, metrics=metrics, model_path=model_path,
                     checkpoint_path=trainer.checkpoint_path, out_dir=plan.out_dir, network=network, config=config,
                     tracking_uri=plan.tracking_uri, experiment_id=run.experiment_id if run else None,
                     problems=problems, registered_model=run.registered if run else None,
                     timings=timings.split())


def _say(progress_callback, line: str) -> None:
    """A line in the fit's own output (nothing when the caller asked for no progress output)."""
    console = getattr(progress_callback, "console", None)
    if console is not None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _final_evaluation(trainer, network, splits) -> Evaluation:
    """Test metrics of the final model (validation if the data set has no test split). Without
    a test split only the confusion matrix is wanted: the validation predictions the trainer made
    with this very model (Trainer.scored_validation) are used when it has them."""
    if splits.x_test is not None and len(splits.x_test):
        split, x, y = "test", splits.x_test, splits.y_test
    elif splits.x_val is not None and len(splits.x_val):
        split, x, y = "val", splits.x_val, splits.y_val
    else:
        split, x, y = "train", splits.x_train, splits.y_train
    predictions = trainer.scored_validation.predictions_for(network) if split == "val" else None
    if predictions is not None:  # the saved model scored these already, bit for bit this model
        metrics = {}
    else:
        values, predictions = trainer.evaluate(x, y, normalize=True, return_predictions=True)  # a batch at a time
        metrics = {f"test_{k}": float(v) for k, v in values.items()} if split == "test" else {}
    return Evaluation(split, metrics, confusion_matrix(y, predictions, network.num_classes),
                      list(network.class_names or range(network.num_classes)))


def _model_free_plots(folder: Path, history, recorder, trainer, network) -> list[tuple[str, tuple, dict]]:
    """The figures that need no final evaluation (plots.py calls for PlotWorkers.draw): the
    learning curves and the first conv layer's filters."""
    calls = [("learning_curves", (history.epochs, folder / "learning_curves.png"),
              {"batch_losses": list(recorder.curve(trainer.steps_per_epoch)), "best_epoch": history.best_epoch,
               "monitor": history.monitor})]
    first = next((v for k, v in network.parameters().items() if k.endswith(".weight") and v.ndim == 4), None)
    if first is not None:
        calls.append(("filter_montage", (np.array(first), folder / "filters_conv1.png"), {}))
    return calls


def _confusion_plot(folder: Path, evaluation) -> tuple[str, tuple, dict]:
    return ("confusion_matrix", (evaluation.confusion, evaluation.class_names, folder / "confusion_matrix.png"),
            {"title": f"confusion matrix ({evaluation.split} split)"})
