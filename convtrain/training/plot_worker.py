"""The fit's figures drawn by helper processes, while the fit does something else.

Drawing the three figures of a fit takes matplotlib's import and then each figure's layout and
rasterizing, all pure Python under one GIL: a thread would not run beside the fit. So `fit`
forks a plot worker as it begins, before it has started a thread, opened a store or loaded
data. The worker imports matplotlib and plots.py while the fit loads its data, opens its store
and trains, and then forks its siblings (two drawing processes by default): a fork shares what
was imported, so no process imports matplotlib twice and the workers add no work the fit would
not do itself. Each `draw` hands a share of calls to the next worker in turn (the learning
curves and filters before the final evaluation, the confusion matrix after it), which draws it
the moment it arrives; `results` asks each worker for its paths and waits for them. The fit
meanwhile scores its final model and logs it to MLflow.

A sweep worker runs many fits: `shared_workers` forks the workers once, before its first trial,
and each fit's figures are one round of the same workers (`for_fit`), so no trial forks a
process while Optuna's heartbeat thread runs.

Nothing is lost and nothing is left behind:
- a worker that fails (an exception, a crash, no answer) is reported by `results` in one line,
  and its figures are drawn in the fit's own process instead, where an error raises as before;
- the fit ends and reaps its workers when it ends (`close`), whatever the outcome;
- a fit killed with SIGKILL takes its workers with it (Linux's parent-death signal: the first
  worker dies with the fit, its siblings with it); elsewhere a worker reads end-of-file on its
  pipe and exits.

`CONVTRAIN_PLOT_WORKERS=0` draws in the fit's process (the figures are the same either way),
`1` in one worker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from pathlib import Path

WORKERS_ENV = "CONVTRAIN_PLOT_WORKERS"
DEFAULT_WORKERS = 2
ANSWER_TIMEOUT = 300.0  # seconds a fit waits for its figures before drawing them itself
_LENGTH = struct.Struct(">Q")  # an answer is its pickle's length, then the pickle


def worker_count() -> int:
    try:
        return max(int(os.environ.get(WORKERS_ENV, DEFAULT_WORKERS)), 0)
    except ValueError:
        return DEFAULT_WORKERS


class PlotWorkers:
    """Up to `count` worker processes, forked now, each drawing the calls it is handed.

    `fork_now=None` forks unless matplotlib is imported in this process already: there is then
    no import to hide, and such a process (a notebook, a sweep worker without `shared_workers`)
    draws its figures itself."""

    def __init__(self, count: int | None = None, *, fork_now: bool | None = None):
        self.processes: list[_Worker] = []
        self.jobs: list[tuple[_Worker | None, list]] = []
        self.problems: list[str] = []
        count = worker_count() if count is None else count
        if fork_now is None:
            fork_now = "matplotlib.figure" not in sys.modules
        if fork_now and count:
            try:
                self.processes = _Worker.fork_group(count)
            except OSError as exc:  # no process to spare: the fit draws its figures itself
                self.problems.append(f"plot worker not started ({exc}); the figures are drawn in the fit")

    def __enter__(self) -> "PlotWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def draw(self, calls: list[tuple[str, tuple, dict]]) -> None:
        """Hand `calls` (plots.py function name, args, kwargs) to the next live worker in turn;
        with none they are drawn by `results`, in this process."""
        live = [w for w in self.processes if w.alive]
        worker = live[len(self.jobs) % len(live)] if live else None
        if worker is not None:
            worker.send(("draw", calls))
        self.jobs.append((worker, calls))

    def results(self) -> tuple[list[Path], list[str]]:
        """The paths of this round's figures, in the order of the calls, and one line per worker
        that failed (whose figures were then drawn here). Errors drawing here raise."""
        paths, problems = [], list(self.problems)
        self.problems = []
        jobs, self.jobs = self.jobs, []
        asked = []
        for worker, _ in jobs:
            if worker is not None and worker not in asked:
                worker.send(("answer",))
                asked.append(worker)
        answers = {}
        for worker, share in jobs:
            if worker is not None and id(worker) not in answers:
                answers[id(worker)] = worker.answer()
                if answers[id(worker)] is None:  # dead or hung: stopped, and handed nothing more
                    worker.end()
                if not isinstance(answers[id(worker)], list):
                    problems.append(f"plot worker failed ({answers[id(worker)] or worker.status()}); "
                                    "its figures were drawn in the fit instead")
            answer = answers.get(id(worker))
            if isinstance(answer, list) and answer:
                paths += [Path(p) for p in answer.pop(0)]
            else:
                paths += draw_here(share)
        return paths, problems

    def forget_round(self) -> None:
        """Drop what this round handed out (a fit that failed before it asked for its figures):
        the workers discard what they drew for it."""
        for worker in {id(w): w for w, _ in self.jobs if w is not None}.values():
            worker.send(("forget",))
        self.jobs = []

    def close(self) -> None:
        """End and reap every worker (an idle one reads end-of-file and exits)."""
        self.jobs = []
        for worker in reversed(self.processes):  # siblings first, then the worker that forked them
            worker.done()
        for worker in self.processes:
            worker.end()
        self.processes = []


class _Round:
    """One fit's use of a sweep worker's shared PlotWorkers: closing it ends the round, not the
    workers."""

    def __init__(self, workers: PlotWorkers):
        self.workers = workers

    def __enter__(self) -> PlotWorkers:
        return self.workers

    def __exit__(self, *exc) -> None:
        self.workers.forget_round()


_shared: PlotWorkers | None = None


@contextlib.contextmanager
def shared_workers(count: int | None = None):
    """Fork plot workers once for every fit this process runs inside the block (a sweep
    worker's trials); matplotlib is imported here first, so the workers start drawing at once."""
    global _shared
    preload()
    workers = PlotWorkers(count, fork_now=True)
    previous, _shared = _shared, workers
    try:
        yield workers
    finally:
        _shared = previous
        workers.close()


def for_fit():
    """The plot workers of one fit, a context manager: a round of the shared workers inside
    `shared_workers`, else workers of its own, forked now and ended with it."""
    return _Round(_shared) if _shared is not None else PlotWorkers()


class _Worker:
    """One worker: a pipe for its calls, a pipe for its answers. The first worker of a group is
    the fit's child (`pid`); its siblings are the first worker's children, which it reaps."""

    def __init__(self, pid: int | None, calls_fd: int, answer_fd: int):
        self.pid, self.calls_fd, self.answer_fd = pid, calls_fd, answer_fd
        self.exit_status: int | None = None
        self.alive = True
        self.stream = None  # the calls pipe, once the first calls are sent
        self.sent = False

    @classmethod
    def fork_group(cls, count: int) -> list["_Worker"]:
        """Fork the first worker now; it forks the other count - 1 after its import."""
        pipes = [(*os.pipe(), *os.pipe()) for _ in range(count)]  # calls read, write; answer read, write
        fit_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for fd in (fd for four in pipes for fd in four):
                os.close(fd)
            raise
        if pid == 0:  # the first worker: never returns into the fit's code
            code = 1
            try:
                _die_with(fit_pid)
                for _, calls_write, answer_read, _ in pipes:
                    os.close(calls_write)  # so a dead fit's pipes read as end-of-file here
                    os.close(answer_read)
                code = serve_group([(calls_read, answer_write) for calls_read, _, _, answer_write in pipes])
            finally:
                os._exit(code)
        workers = []
        for index, (calls_read, calls_write, answer_read, answer_write) in enumerate(pipes):
            os.close(calls_read)
            os.close(answer_write)
            workers.append(cls(pid if index == 0 else None, calls_write, answer_read))
        return workers

    def send(self, message) -> None:
        try:
            if self.stream is None:
                self.stream = open(self.calls_fd, "wb", closefd=True)
                self.calls_fd = -1
            self.sent = True
            pickle.dump(message, self.stream, protocol=pickle.HIGHEST_PROTOCOL)
            self.stream.flush()
        except (OSError, ValueError, pickle.PicklingError):  # the worker is gone; results() draws its share
            pass

    def done(self) -> None:
        """No more calls: close its pipe, so it exits."""
        if self.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.close()
            self.stream = None
        if self.calls_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.calls_fd)
            self.calls_fd = -1

    def answer(self, timeout: float | None = None):
        """Its answer to ("answer",): a list of path lists (one per share drawn), or an error line
        (str); None if none came whole within `timeout` seconds (ANSWER_TIMEOUT)."""
        import select

        data, deadline = b"", time.monotonic() + (ANSWER_TIMEOUT if timeout is None else timeout)
        try:
            while len(data) < _LENGTH.size or len(data) < _LENGTH.size + _LENGTH.unpack_from(data)[0]:
                ready, _, _ = select.select([self.answer_fd], [], [], max(deadline - time.monotonic(), 0))
                if not ready:
                    return None  # no answer in time: stopped by results(), its figures drawn in the fit
                chunk = os.read(self.answer_fd, 1 << 16)
                if not chunk:
                    return None  # it died
                data += chunk
            return pickle.loads(data[_LENGTH.size:])
        except Exception:
            return None

    def status(self) -> str:
        code = self.exit_status
        if code is None:
            return "no answer"
        return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"

    def end(self) -> None:
        """Close its pipes (an idle worker then exits) and, for the fit's own child, stop it if it
        does not and reap it (its siblings die with it)."""
        self.alive = False
        self.done()
        if self.answer_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.answer_fd)
            self.answer_fd = -1
        if self.pid is None or self.exit_status is not None:
            return
        # a worker with no calls has nothing to finish; one that was sent calls gets a moment
        deadline = time.monotonic() + (2.0 if self.sent else 0.0)
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_status = os.waitstatus_to_exitcode(status)
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
                self.exit_status = os.waitstatus_to_exitcode(status)
                return
            time.sleep(0.005)


def preload() -> None:
    """Import what drawing needs in this process, once, and draw a small figure to memory so
    that what matplotlib loads on first use (fonts, the PNG writer) is loaded too: forked
    workers then draw at once, and import nothing while another thread (Optuna's heartbeat) may
    hold an import lock."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from convtrain.training import plots  # noqa: F401

    figure = Figure(figsize=(1, 1))
    FigureCanvasAgg(figure)
    figure.subplots().set_title("0")
    figure.savefig(io.BytesIO(), format="png", dpi=20)


def _die_with(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when its parent process dies, so a killed fit leaves no worker
    drawing into its folder while it is resumed (prctl PR_SET_PDEATHSIG). Elsewhere the worker
    still ends at the end-of-file of its pipe."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


def draw_here(calls) -> list[Path]:
    from convtrain.training import plots

    return [Path(getattr(plots, name)(*args, **kwargs)) for name, args, kwargs in calls]


def serve_group(pipes: list[tuple[int, int]]) -> int:
    """The first worker: import what drawing needs (while the fit trains), fork a sibling for
    each further pair of pipes, serve the first pair itself, then reap the siblings."""
    for name in ("SIGINT", "SIGTERM"):  # the fit's own handlers are not the worker's
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        preload()
    except BaseException:
        pass  # drawing will raise the same, and say it
    first_pid, siblings = os.getpid(), []
    for index, (calls_fd, answer_fd) in enumerate(pipes[1:], start=1):
        try:
            pid = os.fork()
        except OSError:
            break  # its calls are never read: the fit finds no answer and draws them itself
        if pid == 0:
            code = 1
            try:
                _die_with(first_pid)
                for other, (c, a) in enumerate(pipes):
                    if other != index:
                        os.close(c)
                        os.close(a)
                code = serve(calls_fd, answer_fd)
            finally:
                os._exit(code)
        siblings.append(pid)
    for calls_fd, answer_fd in pipes[1:]:
        os.close(calls_fd)
        os.close(answer_fd)
    code = serve(*pipes[0])
    deadline = time.monotonic() + 2.0  # they read end-of-file when the fit closes their pipes
    for pid in siblings:
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
    return code


_END = "end"  # what the reader puts after the last message: end-of-file, or a cut message


def _read_messages(calls_fd: int, messages) -> None:
    """Unpickle each message the moment the fit sends it, and never stop reading while the fit
    sends: a share being drawn must not leave the fit blocked on a full pipe."""
    with open(calls_fd, "rb") as stream:
        while True:
            try:
                messages.put(pickle.load(stream))
            except BaseException:  # end-of-file, or a message cut short: the fit has ended
                messages.put(_END)
                return


def serve(calls_fd: int, answer_fd: int) -> int:
    """A worker: draw each share of calls as it arrives (the learning curves while the fit still
    scores and logs its model); to ("answer",), send the round's paths, or its first error in
    one line, and begin the next round; ("forget",) begins the next round without answering.
    End-of-file: the fit has ended."""
    import queue
    import threading

    messages: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_messages, args=(calls_fd, messages), daemon=True).start()
    drawn: list | str = []
    with open(answer_fd, "wb") as answers:
        while True:
            message = messages.get()
            if message == _END:
                return 0
            if message[0] == "draw" and isinstance(drawn, list):  # after an error, the fit draws the rest
                try:
                    drawn.append([str(p) for p in draw_here(message[1])])
                except BaseException as exc:  # sent back as one line; the fit draws the figures itself
                    lines = traceback.format_exception_only(type(exc), exc)
                    drawn = " ".join(line.strip() for line in lines)[:1000]
            elif message[0] == "answer":
                payload = pickle.dumps(drawn)
                answers.write(_LENGTH.pack(len(payload)) + payload)
                answers.flush()
                drawn = []
            elif message[0] == "forget":
                drawn = []
