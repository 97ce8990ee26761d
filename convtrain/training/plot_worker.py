"""The fit's figures drawn by a helper process, while the fit does something else.

Drawing the three figures of a fit takes matplotlib's import and then each figure's layout and
rasterizing, all pure Python under one GIL: a thread would not run beside the fit. So `fit`
forks `PlotWorkers` as it begins, before it has started a thread, opened a store or loaded
data. (A process that has imported matplotlib already, a sweep worker, draws its figures
itself: there is no import to hide, and a fork per trial measured slower than drawing.) A worker
imports matplotlib and plots.py while the fit loads its data, opens its store and trains, then
waits for its figures on a pipe; a fork shares what the fit imported already, so
the worker adds no work the fit would not do itself. Each `draw` hands its calls to one worker
(with two: the learning curves and filters before the final evaluation, the confusion matrix
after it; with one, the second call's figures are drawn by the same worker); `results` waits
for them all. The fit meanwhile scores its final model and logs it to MLflow.

Nothing is lost and nothing is left behind:
- a worker that fails (an exception, a crash, no answer) is reported by `results` in one line,
  and its figures are drawn in the fit's own process instead, where an error raises as before;
- the fit ends and reaps its workers when it ends (`close`), whatever the outcome;
- a fit killed with SIGKILL takes its workers with it (Linux's parent-death signal); elsewhere a
  worker reads end-of-file on its pipe and exits without drawing.

`CONVTRAIN_PLOT_WORKERS=0` draws in the fit's process (the figures are the same either way).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import time
import traceback
from pathlib import Path

WORKERS_ENV = "CONVTRAIN_PLOT_WORKERS"
DEFAULT_WORKERS = 1
ANSWER_TIMEOUT = 300.0  # seconds a fit waits for its figures before drawing them itself


def worker_count() -> int:
    try:
        return max(int(os.environ.get(WORKERS_ENV, DEFAULT_WORKERS)), 0)
    except ValueError:
        return DEFAULT_WORKERS


class PlotWorkers:
    """Up to `count` worker processes, forked now, each drawing the calls it is handed."""

    def __init__(self, count: int | None = None, *, fork_now: bool | None = None):
        self.processes: list[_Worker] = []
        self.jobs: list[tuple[_Worker | None, list]] = []
        self.problems: list[str] = []
        self.count = worker_count() if count is None else count
        # With matplotlib imported already (a sweep worker, preload) there is no import to hide
        # behind the training, and forking a trial's process when its figures are handed out
        # cost more than drawing them (a 12-trial sweep: 0.94 s a trial beyond training against
        # 0.76): such a process draws its figures itself unless told to fork.
        if fork_now is None and "matplotlib.figure" in sys.modules:
            self.count = 0
        elif fork_now is not False:
            self._fork()

    def _fork(self) -> None:
        count, self.count = self.count, 0
        for _ in range(count):
            try:
                self.processes.append(_Worker.fork(self.processes))
            except OSError as exc:  # no process to spare: the fit draws its figures itself
                self.problems.append(f"plot worker not started ({exc}); the figures are drawn in the fit")
                break

    def __enter__(self) -> "PlotWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def draw(self, calls: list[tuple[str, tuple, dict]]) -> None:
        """Hand `calls` (plots.py function name, args, kwargs) to the next worker in turn; with
        none they are drawn by `results`, in this process."""
        if self.count:
            self._fork()
        worker = self.processes[len(self.jobs) % len(self.processes)] if self.processes else None
        if worker is not None:
            worker.send(calls)
        self.jobs.append((worker, calls))

    def results(self) -> tuple[list[Path], list[str]]:
        """The paths of the figures, in the order of the calls, and one line per worker that
        failed (whose figures were then drawn here). Errors drawing here raise."""
        paths, problems = [], list(self.problems)
        jobs, self.jobs = self.jobs, []
        for worker in self.processes:
            worker.done()
        answers = {}
        for worker, share in jobs:
            if worker is not None and id(worker) not in answers:
                answers[id(worker)] = worker.answer()
                if not isinstance(answers[id(worker)], list):
                    problems.append(f"plot worker failed ({answers[id(worker)] or worker.status()}); "
                                    "its figures were drawn in the fit instead")
            answer = answers.get(id(worker))
            if isinstance(answer, list) and answer:
                paths += [Path(p) for p in answer.pop(0)]
            else:
                paths += draw_here(share)
        self.close()
        return paths, problems

    def close(self) -> None:
        """End and reap every worker (an idle one reads end-of-file and exits)."""
        self.count = 0
        for worker in self.processes:
            worker.end()
        self.processes = []


class _Worker:
    """One forked worker: a pipe for its calls, a pipe for its answer."""

    def __init__(self, pid: int, calls_fd: int, answer_fd: int):
        self.pid, self.calls_fd, self.answer_fd = pid, calls_fd, answer_fd
        self.exit_status: int | None = None
        self.stream = None  # the calls pipe, once the first calls are sent
        self.sent = False

    @classmethod
    def fork(cls, siblings: list["_Worker"]) -> "_Worker":
        calls_read, calls_write = os.pipe()
        answer_read, answer_write = os.pipe()
        fit_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the fit's code
            code = 1
            try:
                _die_with(fit_pid)
                for fd in (calls_write, answer_read, *[f for s in siblings for f in (s.calls_fd, s.answer_fd)]):
                    os.close(fd)  # so a dead fit's pipes read as end-of-file here and in its siblings
                code = serve(calls_read, answer_write)
            finally:
                os._exit(code)
        os.close(calls_read)
        os.close(answer_write)
        return cls(pid, calls_write, answer_read)

    def send(self, calls) -> None:
        try:
            if self.stream is None:
                self.stream = open(self.calls_fd, "wb", closefd=True)
                self.calls_fd = -1
            self.sent = True
            pickle.dump(calls, self.stream, protocol=pickle.HIGHEST_PROTOCOL)
        except (OSError, ValueError, pickle.PicklingError):  # the worker is gone; results() draws its share
            pass

    def done(self) -> None:
        """No more calls: close its pipe, so it draws them and answers."""
        if self.stream is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stream.close()
            self.stream = None

    def answer(self, timeout: float = ANSWER_TIMEOUT):
        """Its pickled answer: a list of path lists (one per send), or an error line (str); None if
        it sent none within `timeout` seconds (it is then stopped)."""
        import select

        chunks, deadline = [], time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([self.answer_fd], [], [], max(deadline - time.monotonic(), 0))
                if not ready:
                    chunks = []  # no answer in time: stopped below, its figures drawn in the fit
                    break
                chunk = os.read(self.answer_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            chunks = []
        self.end()
        try:
            return pickle.loads(b"".join(chunks)) if chunks else None
        except Exception:
            return None

    def status(self) -> str:
        code = self.exit_status
        if code is None:
            return "no answer"
        return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"

    def end(self) -> None:
        """Close its pipes (an idle worker then exits), stop it if it does not, and reap it."""
        self.done()
        for name in ("calls_fd", "answer_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        if self.exit_status is not None:
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
    """Import what drawing needs in this process, once: a process that runs many fits (a sweep
    worker) then forks workers that draw at once, and that import nothing while another thread
    (Optuna's heartbeat) may hold an import lock."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    from convtrain.training import plots  # noqa: F401


def _die_with(fit_pid: int) -> None:
    """Linux: SIGKILL this worker when the fit's process dies, so a killed fit leaves no worker
    drawing into its folder while it is resumed (prctl PR_SET_PDEATHSIG). Elsewhere the worker
    still ends at the end-of-file of its pipe."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != fit_pid:  # the fit died before the request took effect
        os._exit(0)


def draw_here(calls) -> list[Path]:
    from convtrain.training import plots

    return [Path(getattr(plots, name)(*args, **kwargs)) for name, args, kwargs in calls]


def serve(calls_fd: int, answer_fd: int) -> int:
    """The worker: import what drawing needs, wait for the calls, draw them, answer with their
    paths (or the error, in one line). End-of-file instead of calls: the fit has ended."""
    for name in ("SIGINT", "SIGTERM"):  # the fit's own handlers are not the worker's
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        preload()  # before the calls come: while the fit trains
    except BaseException:
        pass  # drawing will raise the same, and say it
    calls = []
    with open(calls_fd, "rb") as stream:
        while True:
            try:
                calls.append(pickle.load(stream))
            except EOFError:
                break
            except BaseException:
                calls = []  # a truncated message: the fit died while sending
                break
    if not calls:
        return 0
    try:
        answer = [[str(p) for p in draw_here(share)] for share in calls]
    except BaseException as exc:  # sent back as one line; the fit draws the figures itself
        lines = traceback.format_exception_only(type(exc), exc)
        answer = " ".join(line.strip() for line in lines)[:1000]
    with open(answer_fd, "wb") as stream:
        stream.write(pickle.dumps(answer))
    return 0
