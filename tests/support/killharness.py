"""Kill a real `convtrain` process at a chosen moment: the child side and the test side.

A child runs `convtrain.cli.main()` unchanged, after a few functions have been wrapped so
that every moment worth dying at appends one line to an events file,

    <seconds since start> <event> epoch=<last finished epoch> step=<updates done>

and, when the n-th occurrence of an event named in its stop list ("checkpoint-half:2") is
reached, the child stops itself with SIGSTOP right there. The test then sends SIGKILL, so the
process dies exactly at that point: half-way through writing a checkpoint, inside the open
SQLite transaction of MLflow's log_batch, between a gradient and the update it feeds, ...
Nothing in convtrain knows about this; the wrappers only observe and pause.

Events, in the order a tracked fit meets them:
    run-created, run-reopened      the MLflow run is created / set back to RUNNING (--resume)
    resume-read                    the trainer is about to restore the checkpoint it resumes
    fit-start                      on_fit_start, before the first batch
    mid-batch                      after backward, before that batch's SGD update
    epoch-eval                     evaluating the training or validation set after an epoch
    mlflow-sql                     inside log_batch's transaction, after its first metric INSERT
    checkpoint-half, model-half    half of the .npz bytes are in the temp file
    checkpoint-full, model-full    all bytes written, not yet fsynced nor renamed
    on-checkpoint                  the checkpoint is in place; callbacks are told (MLflow tag)
    artifact, log-model, terminated   the end of a tracked fit

Two ways to start children:
    exec: `python tests/support/killharness.py EVENTS STOPS -- fit ...`, a fresh interpreter;
    fork: one "zygote" process imports convtrain, MLflow, SQLAlchemy and matplotlib once and
          forks a child per run (the child still runs the real CLI from main()). Importing
          MLflow alone takes seconds on a busy 2-core machine, so a dozen kills fit in the
          time budget only this way.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NO_STOP = "-"
ZYGOTE = "zygote"


# ---- the child ----------------------------------------------------------------------------------

class _Recorder:
    """Appends events to a file and stops the process at the chosen one; silent until opened."""

    def __init__(self):
        self.file = None
        self.trainer = None

    def open(self, events_path: str, stops: str) -> None:
        """stops: "event:n,event:n" or NO_STOP."""
        self.file = open(events_path, "a", buffering=1, encoding="utf-8")
        self.started = time.monotonic()
        self.stops = set() if stops == NO_STOP else {(name, int(nth)) for name, nth in
                                                      (spec.rsplit(":", 1) for spec in stops.split(","))}
        self.counts: dict[str, int] = {}

    def __call__(self, event: str) -> None:
        if self.file is None:
            return
        self.counts[event] = self.counts.get(event, 0) + 1
        where = f" epoch={self.trainer.epoch} step={self.trainer.step}" if self.trainer is not None else ""
        self.file.write(f"{time.monotonic() - self.started:.4f} {event}{where}\n")
        self.file.flush()
        if (event, self.counts[event]) in self.stops:
            os.kill(os.getpid(), signal.SIGSTOP)  # the test SIGKILLs us here, or signals and continues us


record = _Recorder()


def _wrap(owner, name, before=None, after=None) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def _instrument() -> None:
    import io

    import mlflow
    import numpy as np
    import sqlalchemy

    import convtrain.tracking.model
    from convtrain.nn.network import Network
    from convtrain.training.callbacks import CallbackList
    from convtrain.training.checkpoint import TrainingCheckpoint
    from convtrain.training.trainer import Trainer

    client = mlflow.MlflowClient
    _wrap(client, "create_run", after=lambda *a, **k: record("run-created"))
    _wrap(client, "update_run", after=lambda result, self, run_id, status=None, **k:
          status == "RUNNING" and record("run-reopened"))
    _wrap(client, "log_artifact", before=lambda *a, **k: record("artifact"))
    _wrap(client, "set_terminated", before=lambda *a, **k: record("terminated"))
    _wrap(convtrain.tracking.model, "log_model", before=lambda *a, **k: record("log-model"))
    _wrap(TrainingCheckpoint, "restore", before=lambda *a, **k: record("resume-read"))
    _wrap(Trainer, "evaluate", before=lambda *a, **k: record("epoch-eval"))
    _wrap(Network, "add_l2_gradients", before=lambda *a, **k: record("mid-batch"))

    def dispatch_seen(callbacks, hook, trainer, *args):
        record.trainer = trainer
        if hook == "on_fit_start":
            record("fit-start")
        elif hook == "on_checkpoint":
            record("on-checkpoint")

    _wrap(CallbackList, "call", before=dispatch_seen)

    # Every .npz convtrain writes goes through np.savez into the temp file of write_npz_atomic.
    real_savez = np.savez

    def savez(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            return real_savez(file, *args, **kwargs)
        target = Path(os.readlink(f"/proc/self/fd/{file.fileno()}")).name  # ".checkpoint.npz.<random>.tmp"
        kind = "model" if target.startswith(".model.npz") else "checkpoint"
        buffer = io.BytesIO()
        real_savez(buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[:len(data) // 2])
        file.flush()
        record(f"{kind}-half")
        file.write(data[len(data) // 2:])
        file.flush()
        record(f"{kind}-full")

    np.savez = savez

    @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "after_cursor_execute")
    def metric_insert(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS"):
            record("mlflow-sql")


def _run_cli(events: str, stops: str, args: list[str]) -> int:
    record.open(events, stops)
    sys.argv = ["convtrain", *args]
    from convtrain.cli import main

    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _zygote() -> None:
    """Import everything once, then per request line fork a child that runs the CLI."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot  # noqa: F401
    import mlflow.models  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import convtrain.cli  # noqa: F401
    import convtrain.data  # noqa: F401
    import convtrain.pipeline.fit  # noqa: F401
    import convtrain.tracking.callback  # noqa: F401

    _instrument()
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing printed by the zygote itself may reach the channel
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(request["cwd"])
                for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                                       (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                       (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                    target = os.open(path, mode, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                channel.close()
                os.environ.clear()
                os.environ.update(request["env"])
                code = _run_cli(request["events"], request["stops"], request["args"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        channel.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ---- the test side ------------------------------------------------------------------------------

@dataclass
class Event:
    seconds: float
    name: str
    epoch: int | None = None
    step: int | None = None


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    events: list[Event] = field(default_factory=list)
    killed: bool = False  # by our SIGKILL, where a stop or kill_after said

    @property
    def last(self) -> Event | None:
        return self.events[-1] if self.events else None

    def names(self) -> list[str]:
        return [e.name for e in self.events]


def read_events(path: Path) -> list[Event]:
    events = []
    if not path.exists():
        return events
    text = path.read_text(encoding="utf-8")
    for line in text[:text.rfind("\n") + 1].splitlines():  # not a line the child died writing
        seconds, name, *where = line.split()
        values = dict(item.split("=", 1) for item in where if "=" in item)
        events.append(Event(float(seconds), name, int(values["epoch"]) if "epoch" in values else None,
                            int(values["step"]) if "step" in values else None))
    return events


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


class Harness:
    """Runs `convtrain` children in `workdir` with a clean environment (default MLflow store:
    the workdir's mlflow.db); `fork=True` starts them from a zygote (see the module docstring)."""

    def __init__(self, workdir: Path, *, fork: bool = True, timeout: float = 120.0):
        import convtrain

        self.workdir = Path(workdir)
        self.timeout = timeout
        self.runs = 0
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("MLFLOW_TRACKING_URI", "CONVTRAIN_DEBUG") and not k.startswith("PYTEST")}
        self.env.update({
            "COLUMNS": "120", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(Path(convtrain.__file__).parents[1]),  # the convtrain the tests import
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            # what the CLI sets before it imports MLflow; the zygote imports it earlier
            "MLFLOW_LOGGING_LEVEL": "WARNING",
        })
        self.zygote = None
        if fork:
            self.zygote = subprocess.Popen([sys.executable, __file__, ZYGOTE], cwd=self.workdir, env=self.env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self._replies = b""

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stdin.close()
            try:
                self.zygote.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()
            self.zygote = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, args: list, *, stop_at: str | None = None, kill_after: tuple[str, float] | None = None,
            stops: list[tuple[str, tuple]] = ()) -> Outcome:
        """Run `convtrain ARGS` and SIGKILL it where `stop_at` ("event:n") stops it, or `seconds`
        after the first `event` of `kill_after=(event, seconds)`; else let it finish.
        `stops`: [("event:n", signals), ...]: at each, send the signals (e.g. SIGTERM) and let the
        child go on."""
        stops = list(stops) + ([(stop_at, ())] if stop_at else [])
        spec = ",".join(where for where, _ in stops) or NO_STOP
        self.runs += 1
        events = self.workdir / f".events-{self.runs}"
        out, err = self.workdir / f".stdout-{self.runs}", self.workdir / f".stderr-{self.runs}"
        args = [str(a) for a in args]
        if self.zygote is not None:
            self.zygote.stdin.write(json.dumps({
                "cwd": str(self.workdir), "stdout": str(out), "stderr": str(err), "events": str(events),
                "stops": spec, "args": args, "env": self.env}) + "\n")
            self.zygote.stdin.flush()
            pid = self._reply(block=True)["pid"]
            process = None
        else:
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                process = subprocess.Popen([sys.executable, __file__, str(events), spec, "--", *args],
                                           cwd=self.workdir, env=self.env, stdout=stdout, stderr=stderr,
                                           stdin=subprocess.DEVNULL)
            pid = process.pid

        returncode = None
        killed = False
        kill_at = None
        deadline = time.monotonic() + self.timeout
        try:
            while returncode is None:
                returncode = self._exited(process)
                if returncode is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"convtrain {' '.join(args)} ran past {self.timeout:.0f}s")
                if stops and not killed and _state(pid) == "T":
                    signals = stops.pop(self._stopped_at(events, stops))[1]
                    if not signals:
                        killed = True
                        os.kill(pid, signal.SIGKILL)
                        continue
                    seen = len(read_events(events))
                    for sig in signals:
                        os.kill(pid, sig)
                    os.kill(pid, signal.SIGCONT)
                    # Resumed once it leaves the stopped state or records a new event: on a busy
                    # machine this loop may not run again before the child reaches its next stop.
                    while (_state(pid) == "T" and len(read_events(events)) == seen
                           and time.monotonic() < deadline):
                        time.sleep(0.001)
                    continue
                if kill_after and kill_at is None:
                    name, delay = kill_after
                    if any(e.name == name for e in read_events(events)):
                        kill_at = time.monotonic() + delay
                if kill_at is not None and time.monotonic() >= kill_at and not killed:
                    killed = True
                    os.kill(pid, signal.SIGKILL)
        finally:
            if returncode is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                returncode = self._exited(process, block=True)
        return Outcome(returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
                       read_events(events), killed and returncode == -signal.SIGKILL)

    @staticmethod
    def _stopped_at(events: Path, stops: list[tuple[str, tuple]]) -> int:
        """Which of `stops` the stopped child is at: its last event and how often it happened."""
        names = [e.name for e in read_events(events)]
        where = f"{names[-1]}:{names.count(names[-1])}"
        return next(i for i, (spec, _) in enumerate(stops) if spec == where)

    def _exited(self, process, block: bool = False) -> int | None:
        """The child's return code once it has ended, else None (after waiting a few ms)."""
        if process is not None:
            try:
                return process.wait(timeout=None if block else 0.005)
            except subprocess.TimeoutExpired:
                return None
        reply = self._reply(block)
        return None if reply is None else reply["returncode"]

    def _reply(self, block: bool) -> dict | None:
        """The zygote's next JSON line (read from the raw pipe: select cannot see a file buffer)."""
        fd = self.zygote.stdout.fileno()
        while b"\n" not in self._replies:
            ready, _, _ = select.select([fd], [], [], None if block else 0.005)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the zygote process ended (code {self.zygote.wait()})")
            self._replies += chunk
        line, self._replies = self._replies.split(b"\n", 1)
        return json.loads(line)


if __name__ == "__main__":
    if sys.argv[1:] == [ZYGOTE]:
        _zygote()
    else:
        events, stops, separator, *cli_args = sys.argv[1:]
        assert separator == "--", "usage: killharness.py EVENTS STOPS -- convtrain arguments"
        _instrument()
        sys.exit(_run_cli(events, stops, cli_args))
