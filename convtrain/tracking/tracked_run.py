"""One fit's MLflow run, driven by the fit through a handful of calls.

    run = TrackedRun.start(config, tracking_uri=..., resume_run_id=...)   # prepare: create or reopen
    run.begin_fit(config, splits, out_dir, resumed=...)                  # params, tags, datasets
    MLflowCallback(run, log_every)                                       # train: epoch and batch metrics
    run.end_fit(FitRecord(...))                                          # finish: results, model, FINISHED
    run.abort(exc, out_dir)                                              # or KILLED / FAILED

Metrics go through the run's MetricBuffer (tracking/metric_buffer.py), which keeps them through
an outage of the store; tags and artifacts the store does not take become problems the fit
reports, never a failed fit. A run whose metrics or model an outage kept back stays open, so
`--resume` can send the rest; a model the store refused (a resume would only repeat it) ends
the run FINISHED without it, with the reason in a tag and the description. mlflow is imported inside the functions so `import convtrain`
stays fast.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from convtrain.errors import TrackingError, TrainingInterrupted, one_line
from convtrain.tracking.datasets import has_datasets, log_datasets
from convtrain.tracking.metric_buffer import MODEL_METRICS, MetricBuffer, stderr_line
from convtrain.tracking.quiet import quiet_mlflow_info
from convtrain.tracking.run_model import MODEL_REFUSED_TAG, RunModel
from convtrain.tracking.run_opening import create_run, reopen_run
from convtrain.tracking.runs import CHECKPOINT_TAG, ERROR_TAG, ORPHAN_NOTE_TAG, OUT_DIR_TAG, max_step, run_tags
from convtrain.tracking.store import check_reachable, client_for, resume_command
from convtrain.training.run_folder import RunFolder


@dataclass
class FitRecord:
    """What a finished fit hands its run: the results to log and the files that hold them."""
    config: Any
    network: Any
    splits: Any
    history: Any
    metrics: dict            # the saved model's train/val metrics, best_epoch (and stopped_epoch)
    test_metrics: dict       # the final evaluation's test_* metrics
    last_epoch: int
    stopped_epoch: int | None
    out_dir: Path
    plots: Any               # the figures' paths, or a function that waits for them and returns them
    checkpoint_path: Path | None
    model_path: Path
    input_example: Any
    wall_seconds: float


class TrackedRun:
    """One MLflow run: opened, described, given its results and model, then ended."""

    def __init__(self, client, tracking_uri: str, run_id: str, experiment_id: str, *,
                 run_name: str | None = None, metrics: MetricBuffer | None = None,
                 notify: Callable[[str], None] = stderr_line):
        self.client = client
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.metrics = metrics or MetricBuffer(client, tracking_uri, run_id, notify=notify)
        self.model = RunModel(self)
        self._checkpoint_tagged: str | None = None

    @classmethod
    @quiet_mlflow_info()  # a new store's "Creating initial MLflow database tables"
    def start(cls, config, *, tracking_uri: str, parent_run_id: str | None = None,
              tags: dict | None = None, resume_run_id: str | None = None, next_epoch: int | None = None,
              notify: Callable[[str], None] = stderr_line) -> "TrackedRun":
        """Open the run: create it (a child of `parent_run_id` if given) or reopen `resume_run_id`,
        whose fit trains on from epoch `next_epoch` (None: it trains no further epoch)."""
        check_reachable(tracking_uri)
        from mlflow.exceptions import MlflowException

        try:
            client = client_for(tracking_uri)
            if resume_run_id:
                run, held = reopen_run(client, tracking_uri, resume_run_id, config, tags=tags, next_epoch=next_epoch)
            else:
                run, held = create_run(client, config, parent_run_id=parent_run_id, tags=tags, notify=notify), {}
        except MlflowException as exc:
            raise TrackingError(f"tracking store {tracking_uri}: {one_line(exc)}") from None
        run_id = run.info.run_id
        return cls(client, tracking_uri, run_id, run.info.experiment_id, run_name=run.info.run_name,
                   metrics=MetricBuffer(client, tracking_uri, run_id, notify=notify, **held))

    @property
    def registered(self) -> str | None:
        """"NAME version N" once the model is registered."""
        return self.model.registered

    # ---- the start of the fit ------------------------------------------------------

    def begin_fit(self, config, splits, out_dir: Path, *, resumed: bool) -> None:
        """What is logged once the run folder exists: params, metrics an outage kept back (sent
        before the model), the folder's tag and, unless the run links them already, the datasets."""
        from convtrain.training.sampling import steps_per_epoch

        self.log_config(config, resumed=resumed,
                        steps_per_epoch=steps_per_epoch(splits.y_train, config.balanced, config.batch_size))
        if resumed:
            self.metrics.restore_unlogged(RunFolder(out_dir).unlogged)
        self.set_tags({OUT_DIR_TAG: str(Path(out_dir).resolve())})
        # a fit killed before its datasets were logged logs them when resumed
        if not resumed or not has_datasets(self.client, self.run_id):
            log_datasets(self.client, self.run_id, splits, config.data_path)

    def log_config(self, config, resumed: bool = False, steps_per_epoch: int | None = None) -> None:
        """The flattened config as params (with the length trained, when the schedule sets it:
        run_params); on resume, params that now differ become tags."""
        from mlflow.entities import Param

        params = config.flat_params() if steps_per_epoch is None else run_params(config, steps_per_epoch)
        if resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            params = {k: v for k, v in params.items() if k not in logged}
            if changed:
                self.client.log_batch(self.run_id, tags=run_tags(
                    {f"convtrain.resumed.{k}": v for k, v in changed.items()}))
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict) -> bool:
        return self.metrics.attempt(lambda: self.client.log_batch(self.run_id, tags=run_tags(tags)))

    def tag_checkpoint(self, path) -> None:
        """Record the latest checkpoint (what `--resume RUN_ID` finds); once per path."""
        path = str(Path(path).resolve())
        if path != self._checkpoint_tagged and self.set_tags({CHECKPOINT_TAG: path}):
            self._checkpoint_tagged = path

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri}

    # ---- the end of the fit --------------------------------------------------------

    def end_fit(self, record: FitRecord) -> list[str]:
        """Test metrics, the saved model's metrics as the run's latest, artifacts, the pyfunc model
        (with its metrics, registered if asked), the run description, then FINISHED; returns what
        did not get through."""
        from convtrain.tracking.description import NOTE_TAG, fit_description

        config, metrics = record.config, record.metrics
        self.log_final_metrics(record.test_metrics, step=record.last_epoch)
        self.log_restored_metrics(metrics, last_epoch=record.last_epoch, best_epoch=metrics.get("best_epoch"),
                                  restored=bool(config.patience), stopped_epoch=record.stopped_epoch)
        # the model first: the figures are still being drawn (pipeline/finish.py)
        problems = self.model.log(record.model_path, record.input_example)
        plots = record.plots() if callable(record.plots) else record.plots
        artifacts = [(RunFolder(record.out_dir).config, None), *[(p, "plots") for p in plots]]
        if record.checkpoint_path is not None:
            artifacts.append((record.checkpoint_path, "checkpoint"))
        problems += self.log_artifacts(artifacts)
        if config.log_onnx:
            from convtrain.tracking.model import log_onnx

            problems += log_onnx(self, record.model_path, record.out_dir)
        problems += self.model.link_metrics([*metrics, *record.test_metrics])
        if config.register_model:
            problems += self.model.register(config.register_model)
        self.set_tags({NOTE_TAG: fit_description(
            config=config, network=record.network, splits=record.splits, history=record.history, metrics=metrics,
            run_id=self.run_id, out_dir=record.out_dir, stopped_epoch=record.stopped_epoch,
            wall_seconds=record.wall_seconds, model_name=self.model.name, registered=self.model.registered,
            model_refused=self.model.refused)})
        return problems + self.finish("FINISHED", out_dir=record.out_dir)

    def log_final_metrics(self, values: dict, step: int) -> bool:
        """Metrics of the finished model (test_*), at the last epoch's step; sent at once."""
        self.metrics.add(values, step)
        return self.metrics.flush(force=True)

    def log_restored_metrics(self, values: dict, *, last_epoch: int, best_epoch: int | None,
                             restored: bool, stopped_epoch: int | None) -> bool:
        """Make the run's latest values describe the saved model. After early stopping
        (`restored`: the best epoch's weights were put back), as MLflow's Keras autolog does: the
        per-epoch history stays, the restored epoch's train/val metrics are logged again one step
        past the last epoch, with `stopped_epoch` (0: the fit ran every epoch). `best_epoch` is
        logged in any case."""
        if best_epoch is None:
            return True
        self.metrics.add({"best_epoch": best_epoch, **({"stopped_epoch": stopped_epoch or 0} if restored else {})},
                         last_epoch)
        again = {k: values[k] for k in MODEL_METRICS if values.get(k) is not None}
        if restored and best_epoch != last_epoch and again and not self._holds_step(last_epoch + 1):
            self.metrics.add(again, last_epoch + 1)
        return self.metrics.flush(force=True)

    def _holds_step(self, step: int) -> bool:
        """Whether the run has train_loss at `step` already (a fit resumed after it logged its
        restored metrics and was stopped before FINISHED)."""
        try:
            return max_step(self.client, self.run_id, "train_loss", -1) >= step
        except Exception:
            return False

    def log_artifacts(self, files: Iterable[tuple[str | Path, str | None]]) -> list[str]:
        """Log (local file, artifact folder) pairs; returns one line per file the store refused."""
        problems = []
        for path, folder in files:
            path = Path(path)
            if not path.exists():
                continue
            if not self.metrics.answers():
                problems.append(f"artifact {path.name} not logged (tracking store down); it is at {path}")
                continue
            try:
                self.client.log_artifact(self.run_id, str(path), folder)
            except Exception as exc:
                problems.append(f"artifact {path.name} not logged ({one_line(exc)}); it is at {path}")
        return problems

    def abort(self, exc: BaseException, out_dir: Path | None) -> None:
        """End the run of a fit that stopped: KILLED for an interrupt, FAILED with the error
        otherwise. Never raises: the fit's own error is what the user needs to see."""
        interrupted = isinstance(exc, (TrainingInterrupted, KeyboardInterrupt))
        with contextlib.suppress(Exception):
            self.finish("KILLED" if interrupted else "FAILED", error=None if interrupted else f"{type(exc).__name__}: {exc}",
                        out_dir=out_dir if out_dir is not None and Path(out_dir).is_dir() else None)

    def finish(self, status: str, *, error: str | None = None, out_dir: str | Path | None = None) -> list[str]:
        """Flush, record the error if any, set the status; returns problems worth telling the user."""
        problems = []
        metrics = self.metrics
        metrics.flush(force=True)
        if metrics.pending:
            where = metrics.save_unlogged(RunFolder(out_dir).unlogged) if out_dir is not None else None
            problems.append(f"{len(metrics.pending)} metric values could not be logged to {self.tracking_uri}"
                            + (f"; they are saved in {where}" if where else ""))
        if error:
            self.set_tags({ERROR_TAG: error[:5000]})
        if status == "KILLED":
            # the same words a run whose process was killed gets (runs.close_orphaned_runs)
            self.set_tags({ORPHAN_NOTE_TAG: f"stopped by an interrupt; continue it with "
                                            f"convtrain fit --resume {self.run_id}"})
        if status == "FINISHED" and (metrics.pending or self.model.missing):
            # FINISHED means the run holds everything; it stays open until a resume sends the rest
            if out_dir is not None:
                problems.append(f"MLflow run {self.run_id} stays open until the rest is sent: "
                                f"{resume_command(out_dir, self.tracking_uri)} sends it once the store answers")
            return problems
        if status == "FINISHED" and not error:
            self._clear_stale_notes()
        if not metrics.attempt(lambda: self._set_terminated(status)):
            problems.append(f"could not mark MLflow run {self.run_id} as {status}")
        return problems

    def _clear_stale_notes(self) -> None:
        """A resumed run that once FAILED or was KILLED and has now finished drops the tags
        that said so: they described an earlier attempt, not this run."""
        def clear():
            tags = self.client.get_run(self.run_id).data.tags
            stale = (ERROR_TAG, ORPHAN_NOTE_TAG) + (() if self.model.refused else (MODEL_REFUSED_TAG,))
            for key in stale:
                if key in tags:
                    self.client.delete_tag(self.run_id, key)
        self.metrics.attempt(clear)

    def _set_terminated(self, status: str) -> None:
        # MLflow writes two "View run" lines (emoji, GenAI-view URLs) to stdout here for
        # http stores; the CLI prints its own summary, so they are kept out of the output.
        with contextlib.redirect_stdout(io.StringIO()):
            self.client.set_terminated(self.run_id, status)


def run_params(config, steps_per_epoch: int) -> dict[str, str]:
    """config.flat_params() as a run logs them, saying what was trained: where the schedule sets
    the length (cyclic with cycles), `epochs` and `updates` are that length, not the unused
    --epochs; a cyclic run's rates are eta_min to eta_max, so its unused `lr` is left out."""
    params = config.flat_params()
    if config.schedule_sets_length:
        params["epochs"], params["updates"] = (str(n) for n in config.trained_length(steps_per_epoch))
    if config.schedule == "cyclic":
        params.pop("lr")
    return params
