"""MLflow tracking of the training loop: the trainer callback that forwards its events to a
TrackedRun (tracking/tracked_run.py).

Epoch metrics go to the run's MetricBuffer at each epoch's end, the batch loss every
`log_every` updates, each new checkpoint's path becomes the run's checkpoint tag, and the run's
identity goes into the checkpoint, so a resumed fit continues the same run. Opening, describing
and ending the run are the run's jobs; buffering and retrying are the buffer's.
"""

from __future__ import annotations

from convtrain.errors import TrackingError
from convtrain.tracking.tracked_run import TrackedRun
from convtrain.training.callbacks import Callback


class MLflowCallback(Callback):
    """Logs the training loop of one fit to its TrackedRun."""

    key = "mlflow"

    def __init__(self, run: TrackedRun, log_every: int = 10):
        self.run = run
        self.log_every = log_every

    @property
    def run_name(self) -> str | None:  # what the progress output calls a resumed run
        return self.run.run_name

    def on_batch_end(self, trainer, step, logs):
        if step % self.log_every == 0 and "loss" in logs:
            self.run.metrics.add_batch_loss(step, logs["loss"])

    def on_epoch_end(self, trainer, epoch, logs):
        self.run.metrics.add_epoch(epoch, logs)

    def on_checkpoint(self, trainer, path):
        self.run.tag_checkpoint(path)

    def state_dict(self):
        return self.run.state_dict()

    def load_state_dict(self, state):
        if state.get("run_id") and state["run_id"] != self.run.run_id:
            raise TrackingError(f"the checkpoint belongs to MLflow run {state['run_id']}, not {self.run.run_id}")
