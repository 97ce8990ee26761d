"""Signal handling shared by the commands that run for a long time."""

import contextlib
import signal
import threading


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
