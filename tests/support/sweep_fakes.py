"""A stand-in for convtrain.pipeline.fit.fit in sweep tests: instant, deterministic, observable.

It walks the epochs through the callbacks (so pruning runs) and appends one JSON line per
call to the file named by $SWEEP_FAKE_LOG (from any process). It misbehaves on request:
- $SWEEP_FAKE_INTERRUPT names a file: if it exists, it is removed and the fit raises
  KeyboardInterrupt (Ctrl-C mid-trial);
- $SWEEP_FAKE_HANG_AFTER=k: every call logged after the k-th hangs until its process is killed
  (decided by the call's own place in the log, not by how many calls the log holds when it
  looks: a worker held up for a moment must not see the other worker's next call and hang
  on a call that came second);
- $SWEEP_FAKE_FAIL_ONCE names a file: if it exists, it is removed and the fit raises
  RuntimeError (an unexpected, passing error);
- $SWEEP_FAKE_DATA_ERROR: every fit raises DataError (a problem no trial can get past);
- $SWEEP_FAKE_BUG: every fit raises ValueError (a bug: unexpected, and it never passes);
- $SWEEP_FAKE_BARRIER=n: each fit waits until n processes have logged a call.
"""

from __future__ import annotations

import json
import math
import os
import time
from types import SimpleNamespace

from convtrain.errors import DataError


def score(config) -> float:
    """Best at l2 = 1e-3 and more filters; in (0, 1)."""
    return round(0.9 - 0.05 * abs(math.log10(config.l2) + 3) + 0.001 * sum(config.filters) - 0.01 * config.lr, 6)


def calls(log_path) -> list[dict]:
    if not os.path.exists(log_path):
        return []
    with open(log_path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _place(log_path, call: str) -> int:
    """Where the call with this id sits in the log (0 for the first call logged)."""
    return next(i for i, record in enumerate(calls(log_path)) if record.get("call") == call)


def fake_fit(config, *, callbacks=(), parent_run_id=None, tags=None, progress="none", resume=None):
    log = os.environ.get("SWEEP_FAKE_LOG")
    record = {"pid": os.getpid(), "trial": int((tags or {}).get("convtrain.sweep.trial", -1)),
              "filters": config.filters, "l2": config.l2, "lr": config.lr, "threads": config.threads,
              "out": config.out, "call": os.urandom(8).hex()}
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    barrier = int(os.environ.get("SWEEP_FAKE_BARRIER", "0"))
    deadline = time.monotonic() + 60
    while log and len({c["pid"] for c in calls(log)}) < barrier and time.monotonic() < deadline:
        time.sleep(0.05)  # until that many processes have a trial: a slow start cannot skip one
    interrupt = os.environ.get("SWEEP_FAKE_INTERRUPT")
    if interrupt and os.path.exists(interrupt):
        os.unlink(interrupt)
        raise KeyboardInterrupt
    fail_once = os.environ.get("SWEEP_FAKE_FAIL_ONCE")
    if fail_once and os.path.exists(fail_once):
        os.unlink(fail_once)
        raise RuntimeError("UNIQUE constraint failed (a race between workers)")
    if os.environ.get("SWEEP_FAKE_DATA_ERROR"):
        raise DataError(f"data_path: {os.environ['SWEEP_FAKE_DATA_ERROR']} does not exist")
    if os.environ.get("SWEEP_FAKE_BUG"):
        raise ValueError(f"operands could not be broadcast together ({os.environ['SWEEP_FAKE_BUG']})")
    hang_after = os.environ.get("SWEEP_FAKE_HANG_AFTER")
    if hang_after and log and _place(log, record["call"]) >= int(hang_after):
        time.sleep(600)
    if os.environ.get("SWEEP_FAKE_SLEEP"):
        time.sleep(float(os.environ["SWEEP_FAKE_SLEEP"]))
    final = score(config)
    epochs = []
    for epoch in range(1, config.epochs + 1):
        logs = {"val_accuracy": final * epoch / config.epochs, "val_loss": 1 - final * epoch / config.epochs}
        epochs.append(logs)
        for callback in callbacks:
            callback.on_epoch_end(None, epoch, logs)
    return SimpleNamespace(run_id=None, metrics=dict(epochs[-1]), history=SimpleNamespace(epochs=epochs))


def take_all_tickets(args) -> list[int]:
    """A bare worker: take tickets and finish them at once, as fast as possible (race tests)."""
    from convtrain.sweep import study as sweep_study
    from convtrain.sweep.spec import load_sweep

    path, url = args
    spec = load_sweep(path)
    handle = sweep_study.load(spec, sweep_study.open_storage(url))
    taken = []
    while (trial := sweep_study.take_ticket(handle, spec)) is not None:
        taken.append(trial.number)
        handle.study.tell(trial, 0.5)
    return taken


if __name__ == "__main__":
    # `python sweep_fakes.py SWEEP.toml [--workers N] [--storage URL]`: a sweep process on the
    # fake fit, for tests that kill it or run two at once; errors are one line, as in the CLI.
    # (--workers is forced: the tests mean that many workers whatever the machine's cores.)
    import sys

    from convtrain.sweep.launcher import run_sweep
    from tests.support.sweep_fakes import fake_fit as importable_fit  # by module name, so spawned workers find it

    args = sys.argv[1:]
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    storage = args[args.index("--storage") + 1] if "--storage" in args else None
    from convtrain.errors import ConvtrainError

    try:
        run_sweep(args[0], workers=workers, storage=storage, quiet=True, fit=importable_fit, force_workers=True)
    except ConvtrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
