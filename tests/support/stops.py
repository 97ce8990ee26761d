"""A callback that stops a fit where a test wants it, as Ctrl-C would."""

from convtrain.training.callbacks import Callback


class StopAt(Callback):
    """Requests a stop (as a SIGINT handler would) after update `step`."""

    def __init__(self, step):
        self.stop_step = step

    def on_batch_end(self, trainer, step, logs):
        if step == self.stop_step:
            trainer.request_stop()
