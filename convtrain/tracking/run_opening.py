"""Opening a fit's MLflow run: a new one (a child of a sweep's parent run if asked), or on
--resume the run the checkpoint names, reopened with what it already holds."""

from __future__ import annotations

import json
from typing import Callable

from convtrain.errors import ConfigError, TrackingError, one_line
from convtrain.tracking.metric_buffer import BATCH_METRIC, EPOCH_METRICS, EPOCH_STEP_METRIC
from convtrain.tracking.processes import this_process
from convtrain.tracking.runs import PROCESS_TAG, close_orphaned_runs, context_tags, max_step, run_tags
from convtrain.tracking.store import ensure_described_experiment
from convtrain.training.run_folder import RunFolder


def create_run(client, config, *, parent_run_id: str | None, tags: dict | None, notify: Callable[[str], None]):
    """A new RUNNING run in the config's experiment (closing the runs dead fits left open)."""
    experiment_id = ensure_described_experiment(client, config.experiment)
    close_orphaned_runs(client, experiment_id)
    new_tags = context_tags(tags)
    new_tags[PROCESS_TAG] = json.dumps(this_process())
    if parent_run_id and _run_exists(client, parent_run_id, notify):
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
        new_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return client.create_run(experiment_id, tags=new_tags, run_name=config.run_name)


def reopen_run(client, tracking_uri: str, run_id: str, config, *, tags: dict | None,
               next_epoch: int | None) -> tuple[object, dict]:
    """Run `run_id` set RUNNING again, and what it holds: the MetricBuffer keywords
    logged_epochs, logged_batch_step and logged_other_steps."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"cannot resume MLflow run {run_id} in {tracking_uri}: {one_line(exc)}") from None
    _check_step_free(client, run, next_epoch, config)  # before the run is touched
    close_orphaned_runs(client, run.info.experiment_id)
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=run_tags({**(tags or {}), PROCESS_TAG: json.dumps(this_process())}))
    # epoch_seconds, not train_loss: the restored best epoch's train_loss sits one step past
    # the last epoch (TrackedRun.log_restored_metrics); runs from before epoch_seconds existed fall back
    logged_epochs = max_step(client, run_id, EPOCH_STEP_METRIC, -1)
    if logged_epochs < 0:
        logged_epochs = max_step(client, run_id, "train_loss", 0)
    held = {"logged_epochs": logged_epochs, "logged_batch_step": max_step(client, run_id, BATCH_METRIC, -1),
            # a fit killed after logging its test metrics (while logging artifacts or the model)
            # computes them again when resumed; the run must not get them twice
            "logged_other_steps": {key: max_step(client, run_id, key, -1) for key in run.data.metrics
                                   if key not in EPOCH_METRICS and key != BATCH_METRIC}}
    return run, held


def _run_exists(client, run_id: str, notify: Callable[[str], None]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        notify(f"warning: parent run {run_id} is not in this tracking store; the run is logged without a parent")
        return False
    return True


def _check_step_free(client, run, next_epoch: int | None, config) -> None:
    """Refuse to train a run on into the step that already holds its restored model's metrics.

    A fit whose end put an earlier epoch's weights back logged that epoch's train/val metrics
    one step past its last epoch (TrackedRun.log_restored_metrics), and MLflow cannot remove them: an
    extension (`--resume --epochs N`) would log its first new epoch at that step as a second
    value. A fit early stopping ended trains no further epoch, so it never gets here."""
    if next_epoch is None:
        return
    run_id = run.info.run_id
    logged = max_step(client, run_id, EPOCH_STEP_METRIC, -1)
    if logged < 0 or logged >= next_epoch:
        return  # a run from before epoch_seconds, or one holding that epoch already (nothing twice)
    if max_step(client, run_id, "train_loss", -1) < next_epoch:
        return
    best = run.data.metrics.get("best_epoch")
    restored = f"epoch {int(best)}'s" if best is not None else "an earlier epoch's"
    raise ConfigError(
        f"epochs: run {run_id} cannot train past epoch {next_epoch - 1}: its fit ended by putting {restored} "
        f"weights back and logged their metrics at step {next_epoch}, where epoch {next_epoch} would log a "
        f"second value; to train longer, start a new fit from its config "
        f"(convtrain fit --config {RunFolder(config.out or '.').config} --epochs {config.epochs} --out <new folder>)")
