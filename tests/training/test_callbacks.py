"""CallbackList: order, unique keys, dispatch, the fan-out of an error; History as a callback."""

import pytest

from convtrain.errors import ConfigError
from convtrain.training.callbacks import Callback, CallbackList, Checkpoint, EarlyStopping, History


class Logged(Callback):
    """Records its hooks into a shared log; can fail while reporting an error."""

    def __init__(self, name, log, fail_to_report=False):
        self.key = name
        self.log = log
        self.fail_to_report = fail_to_report

    def on_epoch_end(self, trainer, epoch, logs):
        self.log.append((self.key, "epoch_end", epoch))

    def on_exception(self, trainer, exc):
        self.log.append((self.key, "exception", type(exc).__name__))
        if self.fail_to_report:
            raise RuntimeError(f"{self.key} failed while reporting")


def test_history_first_early_stopping_next_checkpoint_last_the_rest_in_order():
    log = []
    a, b = Logged("a", log), Logged("b", log)
    history, early, checkpoint = History(), EarlyStopping(patience=2), Checkpoint()
    callbacks = CallbackList([checkpoint, a, early, b, history])
    assert list(callbacks) == [history, early, a, b, checkpoint]
    assert len(callbacks) == 5


def test_two_callbacks_with_one_key_are_refused():
    log = []
    with pytest.raises(ConfigError, match="share the key 'a'"):
        CallbackList([Logged("a", log), Logged("a", log)])
    with pytest.raises(ConfigError, match="share the key 'history'"):
        CallbackList([History(), Logged("history", log)])


def test_every_callback_hears_of_an_error_even_if_one_fails_to_report_it():
    log = []
    callbacks = CallbackList([Logged("first", log, fail_to_report=True), Logged("second", log)])
    callbacks.on_exception(None, KeyboardInterrupt())  # does not raise the reporter's RuntimeError
    assert log == [("first", "exception", "KeyboardInterrupt"), ("second", "exception", "KeyboardInterrupt")]


def test_dispatch_in_order_and_history_records_each_epoch():
    log = []
    history = History()
    callbacks = CallbackList([Logged("a", log), history])
    callbacks.on_epoch_end(None, 1, {"val_loss": 0.5, "train_loss": 0.6})
    callbacks.on_epoch_end(None, 2, {"val_loss": 0.4, "train_loss": 0.5})
    assert log == [("a", "epoch_end", 1), ("a", "epoch_end", 2)]
    assert history.metric("val_loss") == [0.5, 0.4] and history.best_epoch == 2


def test_states_go_to_the_callback_with_the_same_key():
    early = EarlyStopping(patience=3)
    early.best, early.best_epoch, early.wait = 0.25, 4, 1
    history = History(epochs=[{"epoch": 1, "val_loss": 0.3}])
    saved = CallbackList([history, early])
    fresh_history, fresh_early = History(monitor="val_accuracy"), EarlyStopping(patience=3)
    CallbackList([fresh_history, fresh_early]).load_state_dict(saved.state_dict())
    assert fresh_early.state_dict() == early.state_dict()
    assert fresh_history.epochs == history.epochs
    assert fresh_history.monitor == "val_accuracy"  # what to monitor is the resumed fit's own choice
