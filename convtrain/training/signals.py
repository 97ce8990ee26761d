"""Signal handling shared by the commands that run for a long time."""

import contextlib
import signal
import threading

from convtrain.errors import TrainingInterrupted


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does, so that `kill` and
    job schedulers get the same clean ending as a user at the terminal. Only the main thread
    can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_on_signals(trainer):
    """SIGINT/SIGTERM ask the trainer to stop at the next batch (checkpoint, TrainingInterrupted);
    a second SIGINT interrupts at once. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        trainer.request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        if not received:
            raise
        # the second Ctrl-C: no checkpoint of its own (it may have cut one short), but the last
        # complete one can still be resumed, and the user should be told so
        last = trainer.checkpoint_path
        raise TrainingInterrupted(
            f"training stopped at once by a second interrupt in epoch {trainer.epoch + 1} (update {trainer.step}); "
            + (f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"),
            checkpoint=last) from None
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
