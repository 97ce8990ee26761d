"""A run's pyfunc model: logged under the run's name, linked to the final metrics, registered
if asked. Failures are returned as problem lines: the model file on disk is the fit's result,
the logged copy is a convenience a later `--resume` can still add."""

from __future__ import annotations

from pathlib import Path

from convtrain.errors import one_line
from convtrain.tracking.quiet import quiet_mlflow_info
from convtrain.tracking.sqlite_store import is_disk_full

MODEL_URI_TAG = "convtrain.model_uri"
# why the store refused the model (a refusal a resume would repeat, not an outage)
MODEL_REFUSED_TAG = "convtrain.model_not_logged"
# what the training loop logs about itself, not about the model: not linked to the model
_LOOP_METRICS = ("learning_rate", "epoch_seconds", "images_per_second")


class RunModel:
    """The model of one TrackedRun: its id, name and registered version once they exist."""

    def __init__(self, run):
        self.run = run
        self.model_id: str | None = None
        self.name: str | None = None
        self.registered: str | None = None  # "NAME version N"
        self.missing = False  # a log was cut off by an outage: the run stays open for --resume
        self.refused: str | None = None  # why the store refused it: the run ends, saying so

    @quiet_mlflow_info()  # "Validating input example against model signature", once per model
    def log(self, network_path: str | Path, input_example) -> list[str]:
        """The pyfunc model (signature, input example), named after the run; returns why it
        failed, or nothing."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from convtrain.tracking import model

        run = self.run
        self.missing, self.refused = True, None
        if not run.metrics.answers():
            return [f"pyfunc model not logged (tracking store down); the model is at {network_path}"]
        name = model.model_name(run.run_name)
        try:
            with _use_tracking_uri(run.tracking_uri):  # MLflow's Model.log reads the global URI
                self.model_id = model.log_model(run.client, run.run_id, run.experiment_id, network_path,
                                                input_example, name=name)
        except Exception as exc:
            if is_disk_full(exc):
                return [f"pyfunc model not logged (the disk is full); the model is at {network_path}"]
            if _outage(exc, run.tracking_uri):
                return [f"pyfunc model not logged (tracking store down: {one_line(exc)}); "
                        f"the model is at {network_path}"]
            # a refusal (a name, a value, a store limit) that a resume would only repeat: the run
            # ends without the model, marked and explained (TrackedRun.finish, the description)
            self.missing, self.refused = False, one_line(exc)[:1000]
            run.set_tags({MODEL_REFUSED_TAG: f"pyfunc model not logged: {self.refused}"})
            return [f"pyfunc model not logged ({self.refused}); the model is at {network_path}; "
                    f"MLflow run {run.run_id} ends without it"]
        self.missing = False
        self.name = name
        run.set_tags({MODEL_URI_TAG: f"runs:/{run.run_id}/{name}"})
        return []

    def link_metrics(self, keys) -> list[str]:
        """The final metrics (`keys`) on the logged model as well; returns why not, or nothing.

        Each is sent as the very row the run holds (same value, step and timestamp), now with
        the model's id: the store keeps one row, so the run's history gains no extra point."""
        from convtrain.tracking.model import link_metrics

        run = self.run
        latest = run.metrics.latest
        rows = [latest[k] for k in keys if k in latest and k not in _LOOP_METRICS]
        if self.model_id is None or not rows:
            return []
        if run.metrics.attempt(lambda: link_metrics(run.client, run.run_id, self.model_id, rows)):
            return []
        return ["the final metrics were not linked to the logged model (tracking store down)"]

    def register(self, name: str) -> list[str]:
        """Register the logged model as a new version of `name`; returns why not, or nothing."""
        from convtrain.tracking.model import register

        run = self.run
        if self.model_id is None:
            return [f"model not registered as {name!r}: the pyfunc model was not logged"]
        try:
            version = register(run.client, self.model_id, name, run_id=run.run_id,
                               description=f"from run {run.run_name or run.run_id}")
        except Exception as exc:
            return [f"model not registered as {name!r} ({one_line(exc)})"]
        self.registered = f"{version.name} version {version.version}"
        return []


def _outage(exc: BaseException, tracking_uri: str) -> bool:
    """Whether logging failed because the store could not be reached (a resume sends the model
    once it answers), rather than because it refused the model."""
    from convtrain.errors import TrackingError
    from convtrain.tracking.store import check_reachable

    seen, visited = exc, set()
    while seen is not None and id(seen) not in visited:  # the chain of causes, each once
        visited.add(id(seen))
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__name__ in (
                "ConnectionError", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NewConnectionError"):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        check_reachable(tracking_uri, timeout=2.0)
    except TrackingError:
        return True
    return False
