"""A sweep worker: take a trial ticket, fit its config, tell Optuna how it went; repeat.

One worker is one process (the `--workers` launcher starts several, other machines start
their own). How a trial ends decides what happens next:

    the fit returns            -> COMPLETE with the objective the fit ended with
    the pruner stops it        -> PRUNED (its MLflow child run is tagged so)
    its config is impossible,  -> FAIL, and the sweep goes on: this point is bad, the
      or the loss diverged        others may not be
    Ctrl-C / SIGTERM           -> FAIL, its ticket is re-enqueued, the worker stops
    anything else (data,       -> FAIL, its ticket is re-enqueued, the worker stops with the
      tracking, disk, a bug)      error: it would fail every other trial the same way

A worker the `--workers` launcher started checks, before each trial, that its launcher is
still there: killed with kill -9 (or by the OOM killer), the launcher cannot stop its workers,
so they stop themselves at the next trial boundary instead of running the sweep on their own.
A trial they leave RUNNING is reclaimed by the next run, as any killed trial is.

Two trials in a row stopped by unexpected errors (not a bad point: a bug, a broken install)
stop the worker with one line, SweepFailed, naming the error; --debug shows the traceback.

A re-enqueued ticket (also one reclaimed from a killed worker) continues from the checkpoint
the stopped trial left in its folder, in the same MLflow child run, instead of starting over;
from scratch only when there is no usable checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from convtrain.errors import (
    CheckpointError,
    ConfigError,
    ConvtrainError,
    TrainingDiverged,
    TrainingInterrupted,
    one_line,
)
from convtrain.sweep import runs as sweep_runs
from convtrain.sweep import study as sweep_study
from convtrain.sweep.console import SweepConsole
from convtrain.sweep.runs import SWEEP_TAG, TRIAL_TAG
from convtrain.sweep.spec import Choices, SweepSpec, load_sweep
from convtrain.tracking.metric_buffer import epochs_sent_together
from convtrain.training.callbacks import Callback


@dataclass
class WorkerPlan:
    """Everything a worker process needs; picklable, so it crosses a spawn boundary."""

    sweep_path: str
    storage_url: str
    n_trials: int | None = None
    study_name: str | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    threads: int | None = None
    quiet: bool = False
    fit_progress: bool = False  # a transient bar over the running trial's epochs (one worker in a terminal)
    label: str = ""  # prefix of this worker's lines when several share a terminal
    launcher_pid: int | None = None  # set for a spawned worker: it stops when that process is gone
    fit: Callable | None = field(default=None, repr=False)  # tests inject a fast stand-in


# A trial's epoch metrics reach MLflow together, at most this late (tracking/metric_buffer.py).
TRIAL_METRICS_SECONDS = 1.0


class SweepFailed(ConvtrainError):
    """A sweep worker stopped on an error that would fail every other trial as well."""


class LauncherGone(ConvtrainError):
    """The launcher that started this worker has died (kill -9, the OOM killer)."""


def launcher_gone(launcher_pid: int) -> bool:
    """True once the launcher process is gone: the pipe multiprocessing keeps from it is closed,
    or (POSIX) this process has been handed to another parent."""
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        return True
    return os.name == "posix" and os.getppid() != launcher_pid


def watch_launcher(launcher_pid: int, poll_seconds: float = 1.0) -> None:
    """Have this worker sent SIGTERM as soon as its launcher dies (kill -9, the OOM killer), so a
    running fit checkpoints at its next batch and stops, as it does for `kill`: on Linux the
    kernel sends it (PR_SET_PDEATHSIG); elsewhere a daemon thread looks every `poll_seconds`."""
    import signal
    import threading

    def terminate() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    if _set_parent_death_signal(signal.SIGTERM):
        if launcher_gone(launcher_pid):  # it died before the kernel was told to tell us
            terminate()
        return

    def poll() -> None:
        while not launcher_gone(launcher_pid):
            time.sleep(poll_seconds)
        terminate()

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()


def _set_parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, signum) on Linux; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, signum, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


class PruningCallback(Callback):
    """Reports the objective after every epoch and stops the fit when the pruner says so."""

    def __init__(self, trial, objective: str):
        self.trial = trial
        self.objective = objective

    def on_epoch_end(self, trainer, epoch, logs):
        import optuna
        value = logs.get(self.objective)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.objective} {value:.4f}")


def run_worker(plan: WorkerPlan, stop=None) -> int:
    """Run trials until no ticket is left, or until `stop` (an Event the launcher sets on
    Ctrl-C) is set; returns how many this worker ran."""
    spec = load_sweep(plan.sweep_path, n_trials=plan.n_trials, study_name=plan.study_name)
    reclaimed: list = []
    storage = sweep_study.open_storage(plan.storage_url, reclaimed=reclaimed)
    handle = sweep_study.load(spec, storage)
    console = SweepConsole()
    if plan.fit is None:
        from convtrain.pipeline.fit import fit
        from convtrain.training.plot_worker import shared_workers

        plot_workers = shared_workers()  # forked once, before any trial's thread: every trial's figures
    else:
        fit, plot_workers = plan.fit, contextlib.nullcontext()
    with plot_workers, epochs_sent_together(TRIAL_METRICS_SECONDS):
        return _run_trials(plan, spec, handle, reclaimed, fit, console, stop)


def _run_trials(plan: WorkerPlan, spec: SweepSpec, handle, reclaimed: list, fit: Callable, console, stop) -> int:
    ran = errors_in_a_row = 0
    previous_failure = None
    while True:
        if plan.launcher_pid is not None and launcher_gone(plan.launcher_pid):
            raise LauncherGone(f"the sweep launcher (pid {plan.launcher_pid}) is gone, so this worker stops "
                               f"after {ran} trial{'s' if ran != 1 else ''}; re-run the sweep command to finish it")
        reclaim(handle, spec, plan.tracking_uri, plan.parent_run_id, reclaimed)
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt  # the launcher was interrupted while this trial ran
        trial = sweep_study.take_ticket(handle, spec)
        if trial is None:
            return ran
        try:
            run_trial(trial, handle, spec, plan, fit, console)
            errors_in_a_row = 0
        except ConvtrainError:
            raise  # a user-facing problem (data missing, tracking store down): never luck
        except Exception as exc:
            # One unexpected error may be a race or a hiccup (two workers creating the same
            # MLflow dataset at once, a locked database): the trial's ticket is back in the
            # queue, so go on. A second one in a row is not luck: stop this worker.
            errors_in_a_row += 1
            if errors_in_a_row > 1:
                raise SweepFailed(f"trials {previous_failure} and {trial.number} both stopped on unexpected "
                                  f"errors, the last {type(exc).__name__}: {one_line(exc)[:300]}; stopping "
                                  "(their parameters are queued again; --debug shows the traceback)") from exc
            previous_failure = trial.number
            console.print(f"{plan.label}warning: trial {trial.number} stopped on {type(exc).__name__}: "
                          f"{one_line(exc)[:300]}; its parameters go back in the queue", markup=False)
        ran += 1


def reclaim(handle, spec: SweepSpec, tracking_uri: str | None, parent_run_id: str | None,
            stale: list | None = None) -> list:
    """Re-enqueue the trials of dead workers and close their MLflow child runs; returns them.
    `stale` is the list `open_storage` appends to when Optuna's heartbeat check fails a trial."""
    stale = stale if stale is not None else []
    stale.extend(sweep_study.reclaim_dead_trials(handle))
    sweep_study.fail_stale_trials(handle)  # appends to `stale` through the storage's callback
    found = list(stale)
    stale.clear()
    if found and parent_run_id:
        sweep_runs.close_killed_children(tracking_uri, parent_run_id, spec, [t.number for t in found])
    return found


def run_trial(trial, handle, spec: SweepSpec, plan: WorkerPlan, fit: Callable, console: Console) -> None:
    trial_id = handle.storage.get_trial_id_from_study_id_trial_number(handle.study_id, trial.number)
    started = time.monotonic()
    try:
        with sweep_study.Heartbeat(handle.storage, trial_id):
            params, outcome = _fit_trial(trial, trial_id, handle, spec, plan, fit)
        seconds = time.monotonic() - started
        _record(trial, handle, spec, plan, outcome, seconds)
    except BaseException as exc:
        # Whatever stopped this trial before it was told (Ctrl-C, a crash, a bug): put its
        # parameters back in the queue. A trial already told stays as it is.
        if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)):
            reason = f"interrupted: {one_line(exc) or 'Ctrl-C'}"
        else:
            reason = one_line(exc) or type(exc).__name__
        _give_back(trial, trial_id, handle, reason)
        raise
    _report(console, plan, spec, trial.number, params, outcome, seconds)


def _fit_trial(trial, trial_id: int, handle, spec: SweepSpec, plan: WorkerPlan,
               fit: Callable) -> tuple[dict, dict]:
    """Fit the trial's config; returns its parameters and how it ended. Endings that belong to
    this trial alone are outcomes; anything else is raised."""
    import optuna
    from optuna.trial import TrialState
    params = suggest(trial, spec)
    callbacks = [PruningCallback(trial, spec.objective)] if spec.pruner != "none" else []
    tags = {SWEEP_TAG: spec.name, TRIAL_TAG: str(trial.number)}
    fields = _run_fields(spec, trial.number, plan)
    resume_from = _resumable(handle.storage.get_trial(trial_id).system_attrs.get(sweep_study.RESUME_ATTR))
    if resume_from is not None:
        fields["out"] = str(resume_from)
    # where this trial's checkpoints go, for a retry if it is stopped
    handle.storage.set_trial_system_attr(trial_id, sweep_study.OUT_ATTR, fields["out"])
    try:
        config = spec.trial_config(params, **fields)
        run = dict(callbacks=callbacks, parent_run_id=plan.parent_run_id, tags=tags,
                   progress=_trial_bar(trial.number, plan) if plan.fit_progress else None)
        if resume_from is None:
            result = fit(config, **run)
        else:
            try:
                result = fit(config, resume=resume_from, **run)
            except CheckpointError:  # refused before training: start this point over elsewhere
                fields = _run_fields(spec, trial.number, plan)
                handle.storage.set_trial_system_attr(trial_id, sweep_study.OUT_ATTR, fields["out"])
                result = fit(spec.trial_config(params, **fields), **run)
    except optuna.TrialPruned as exc:
        return params, {"state": TrialState.PRUNED, "note": str(exc)}
    except (ConfigError, TrainingDiverged) as exc:
        return params, {"state": TrialState.FAIL, "note": one_line(exc)}
    value = _objective_value(result, spec.objective)
    if value is None:
        return params, {"state": TrialState.FAIL, "note": f"the fit reported no finite {spec.objective}"}
    return params, {"state": TrialState.COMPLETE, "value": value, "run_id": getattr(result, "run_id", None)}


def _record(trial, handle, spec: SweepSpec, plan: WorkerPlan, outcome: dict, seconds: float) -> None:
    """Attributes and child-run tags first, the state last: a told trial is complete."""
    from optuna.trial import TrialState
    trial.set_user_attr(sweep_study.SECONDS_ATTR, round(seconds, 3))
    if outcome.get("note"):
        trial.set_user_attr(sweep_study.NOTE_ATTR, outcome["note"])
    run_id = outcome.get("run_id")
    if plan.parent_run_id:
        run_id = run_id or sweep_runs.find_child(plan.tracking_uri, plan.parent_run_id, spec, trial.number)
        if run_id:
            trial.set_user_attr(sweep_study.RUN_ID_ATTR, run_id)
            sweep_runs.tag_child(plan.tracking_uri, run_id, outcome["state"].name, outcome.get("value"))
    if outcome["state"] == TrialState.COMPLETE:
        handle.study.tell(trial, outcome["value"])
    else:
        handle.study.tell(trial, state=outcome["state"])


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Ask the trial for every swept parameter (a ticket's fixed values come back as they are)."""
    params = {}
    for name, p in spec.space.items():
        if isinstance(p, Choices):
            params[name] = trial.suggest_categorical(name, list(p.labels))
        elif p.integer:
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return params


def _run_fields(spec: SweepSpec, number: int, plan: WorkerPlan) -> dict[str, Any]:
    """Per-trial names and places; threads only when the base config leaves them open."""
    out = spec.out / f"trial-{number:03d}"
    suffix = 2
    while out.exists():  # left by an earlier study of the same name: keep it, never overwrite
        out = spec.out / f"trial-{number:03d}-{suffix}"
        suffix += 1
    fields: dict[str, Any] = {"run_name": f"{spec.name}-trial-{number:03d}", "out": str(out)}
    if plan.tracking_uri:
        fields["tracking_uri"] = plan.tracking_uri
    if spec.base.threads is None and plan.threads:
        fields["threads"] = plan.threads
    return fields


def _resumable(folder: str | None):
    """The folder of a stopped trial if it holds a readable training checkpoint, else None."""
    if not folder:
        return None
    from convtrain.pipeline.resume import checkpoint_config
    from convtrain.training.run_folder import RunFolder

    try:
        checkpoint_config(RunFolder(folder).checkpoint)
    except (CheckpointError, OSError):
        return None
    return Path(folder)


def _objective_value(result, objective: str) -> float | None:
    value = (getattr(result, "metrics", None) or {}).get(objective)
    if value is None:
        history = getattr(result, "history", None)
        epochs = getattr(history, "epochs", None) or []
        value = epochs[-1].get(objective) if epochs else None
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _give_back(trial, trial_id: int, handle, reason: str) -> None:
    """Fail a trial this worker cannot finish and put its ticket back for a later run."""
    from optuna.trial import TrialState
    try:
        trial.set_user_attr(sweep_study.NOTE_ATTR, reason)
        handle.study.tell(trial, state=TrialState.FAIL)
        frozen = handle.storage.get_trial(trial_id)
        sweep_study.requeue(handle.study, frozen, reason=reason, count_retry=False)
    except Exception:
        pass  # the storage may be what failed; the next run's reclaim finds the trial instead


def _report(console: Console, plan: WorkerPlan, spec: SweepSpec, number: int, params: dict,
            outcome: dict, seconds: float) -> None:
    if plan.quiet:
        return
    state = outcome["state"].name
    value = outcome.get("value")
    score = f"{spec.objective} {value:.4f}" if value is not None else outcome.get("note", "")
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    console.print(f"{plan.label}trial {number:>3} {state:<8} {score}  ({seconds:.1f}s)  {shown}", markup=False)


def _trial_bar(number: int, plan: WorkerPlan):
    """The running trial's bar, erased when the trial ends: the terminal keeps one line per
    trial (the README's promise), not each fit's epoch lines and history table."""
    from convtrain.training.progress import ProgressCallback

    return ProgressCallback(bar_only=True, label=f"{plan.label}trial {number} ")


def default_threads(workers: int) -> int:
    """Each of N workers gets an equal share of the cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
