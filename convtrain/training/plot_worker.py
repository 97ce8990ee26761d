"""The fit's figures drawn by helper processes, while the fit does something else.

Drawing the three figures of a fit takes matplotlib's import and then each figure's layout and
rasterizing, all pure Python under one GIL: a thread would not run beside the fit. So a fit
starts `PlotWorkers` as it begins; each worker is a fresh interpreter (not a fork of the fit,
which holds OpenMP and BLAS threads and MLflow's locks) that imports matplotlib and plots.py
while the fit loads its data, opens its store and trains, then waits for its share of the
figures on stdin. Each `draw` hands its calls to one worker (the learning curves and filters
before the final evaluation, the confusion matrix after it); `results` waits for them all. The fit meanwhile
scores its final model and logs it to MLflow.

Nothing is lost and nothing is left behind:
- a worker that fails (an exception, a crash, no answer) is reported by `results` in one line,
  and its figures are drawn in the fit's own process instead, where an error raises as before;
- the fit ends its workers when it ends (`close`: terminate, then kill), whatever the outcome;
- a fit killed with SIGKILL closes the workers' stdin, and a worker that reads end-of-file
  exits at once without drawing.

`CONVTRAIN_PLOT_WORKERS=0` draws in the fit's process (the figures are the same either way).

    python -m convtrain.training.plot_worker     # a worker: a pickled list of calls on stdin
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

WORKERS_ENV = "CONVTRAIN_PLOT_WORKERS"
DEFAULT_WORKERS = 2  # a fit's two draw() calls


def worker_count() -> int:
    try:
        return max(int(os.environ.get(WORKERS_ENV, DEFAULT_WORKERS)), 0)
    except ValueError:
        return DEFAULT_WORKERS


class PlotWorkers:
    """Up to `count` worker processes, started now, each drawing the calls it is handed."""

    def __init__(self, count: int | None = None):
        self.processes: list[subprocess.Popen] = []
        self.jobs: list[tuple[subprocess.Popen | None, list]] = []
        self.problems: list[str] = []
        for _ in range(worker_count() if count is None else count):
            try:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "convtrain.training.plot_worker"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_worker_env()))
            except OSError as exc:  # no process to spare: the fit draws its figures itself
                self.problems.append(f"plot worker not started ({exc}); the figures are drawn in the fit")
                break

    def __enter__(self) -> "PlotWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def draw(self, calls: list[tuple[str, tuple, dict]]) -> None:
        """Hand `calls` (plots.py function name, args, kwargs) to the next idle worker; with none
        left they are drawn by `results`, in this process."""
        process = self.processes[len(self.jobs)] if len(self.jobs) < len(self.processes) else None
        if process is not None:
            try:
                process.stdin.write(pickle.dumps(calls, protocol=pickle.HIGHEST_PROTOCOL))
                process.stdin.close()
            except (OSError, ValueError):  # the worker is gone; results() draws its share
                pass
        self.jobs.append((process, calls))

    def results(self) -> tuple[list[Path], list[str]]:
        """The paths of the figures, in the order of the calls, and one line per worker that
        failed (whose figures were then drawn here). Errors drawing here raise."""
        paths, problems = [], list(self.problems)
        for process, share in self.jobs:
            answer = _answer(process) if process is not None else None
            if isinstance(answer, list):
                paths += [Path(p) for p in answer]
                continue
            if process is not None:
                problems.append(f"plot worker failed ({answer or _exit_status(process)}); "
                                "its figures were drawn in the fit instead")
            paths += draw_here(share)
        self.close()
        return paths, problems

    def close(self) -> None:
        for process in self.processes:
            _end(process)
        self.processes = []


def draw_here(calls) -> list[Path]:
    from convtrain.training import plots

    return [Path(getattr(plots, name)(*args, **kwargs)) for name, args, kwargs in calls]


def _worker_env() -> dict:
    env = dict(os.environ)
    # the worker imports this very convtrain, wherever it came from
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"  # a figure needs no thread pool beside the fit's
    return env


def _answer(process: subprocess.Popen):
    """The worker's pickled answer: a list of paths, or an error line (str); None if it sent none."""
    try:
        data = process.stdout.read()
        process.wait(timeout=30)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        _end(process)
        return None
    try:
        return pickle.loads(data) if data else None
    except Exception:
        return None


def _exit_status(process: subprocess.Popen) -> str:
    code = process.poll()
    if code is None:
        return "no answer"
    return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"


def _end(process: subprocess.Popen) -> None:
    """Stop a worker and reap it (never left running or a zombie)."""
    for stream in (process.stdin, process.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    """Import what drawing needs, wait for the calls, draw them, answer with their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  -- warm before the job
    from matplotlib.figure import Figure  # noqa: F401

    from convtrain.training import plots  # noqa: F401

    data = sys.stdin.buffer.read()
    if not data:  # the fit ended (or was killed) without asking for figures
        return 0
    out = sys.stdout.buffer
    try:
        answer = [str(p) for p in draw_here(pickle.loads(data))]
    except BaseException as exc:  # sent back as one line; the fit draws the figures itself
        lines = traceback.format_exception_only(type(exc), exc)
        answer = " ".join(line.strip() for line in lines)[:1000]
    out.write(pickle.dumps(answer))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
