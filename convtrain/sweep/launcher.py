"""`convtrain sweep`: an Optuna study whose every trial is one fit, under one MLflow parent run.

The launcher (this module) does, in order:
1. parse the sweep file (every mistake is a one-line ConfigError before anything starts);
2. create -- once, before any worker exists -- the MLflow experiment, the Optuna study with
   its trial tickets (see sweep/study.py) and the parent run; or join the ones an earlier run or
   another machine created;
3. run the workers: in this process for one, spawned processes for `--workers N`, each with
   cores/N kernel threads;
4. summarize: the trials table, trials.csv, best.toml and plots in the sweep's out folder,
   and the same on the parent run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from rich.console import Console

from convtrain.errors import (ConfigError, ConvtrainError, TrainingInterrupted, one_line, out_of_memory, plural,
                             printable)
from convtrain.sweep import plots as sweep_plots
from convtrain.sweep import report as sweep_report
from convtrain.sweep import runs as sweep_runs
from convtrain.sweep import study as sweep_study
from convtrain.sweep.console import SweepConsole
from convtrain.sweep.spec import SweepSpec, load_sweep
from convtrain.sweep.worker import (SweepFailed, WorkerPlan, default_threads, launcher_gone, reclaim, run_worker,
                                    watch_launcher)
from convtrain.tracking import store as tracking_store
from convtrain.training.signals import sigterm_as_keyboard_interrupt

STORAGE_FILE = "optuna.db"
# More workers than cores only share the cores (and each holds a fit's memory); --force-workers
# allows up to this many, for fits that mostly wait (a remote tracking server, slow disks).
MAX_FORCED_WORKERS = 64


@dataclass
class SweepOutcome:
    spec: SweepSpec
    storage_url: str
    rows: list = field(default_factory=list)
    best: object | None = None
    best_config: Path | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    files: list[Path] = field(default_factory=list)


def default_storage_url(tracking_uri: str | None) -> str:
    """A SQLite file beside the MLflow store when that is a local file, else in the cwd."""
    folder = Path.cwd()
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent
    elif tracking_uri and tracking_uri.startswith("file:"):
        folder = Path(urlparse(tracking_uri).path).resolve().parent
    elif tracking_uri and "://" not in tracking_uri:  # a plain ./mlruns folder
        folder = Path(tracking_uri).expanduser().resolve().parent
    return f"sqlite:///{folder / STORAGE_FILE}"


def run_sweep(sweep_file: str | Path, *, workers: int = 1, storage: str | None = None,
              n_trials: int | None = None, tracking_uri: str | None = None, study_name: str | None = None,
              quiet: bool = False, console: Console | None = None, fit: Callable | None = None,
              force_workers: bool = False) -> SweepOutcome:
    """Run (or resume, or join) the sweep in `sweep_file`; see the module docstring."""
    console = console or SweepConsole()
    check_workers(workers, force=force_workers)
    spec = load_sweep(sweep_file, n_trials=n_trials, study_name=study_name)
    track = spec.base.track
    uri = tracking_store.resolve_tracking_uri(tracking_uri or spec.base.tracking_uri) if track else None
    if uri:
        tracking_store.check_reachable(uri)
    storage_url = storage or default_storage_url(uri)
    stale: list = []
    rdb = sweep_study.open_storage(storage_url, reclaimed=stale)

    def create_parent(study):
        study.set_user_attr(sweep_study.PARENT_RUN_ATTR,
                            sweep_runs.create_parent(spec, tracking_uri=uri, storage_url=storage_url))

    handle = sweep_study.create_or_join(spec, rdb, on_create=create_parent if track else None)
    parent_run_id = _parent_run(handle, spec, uri, storage_url) if track else None
    outcome = SweepOutcome(spec, storage_url, parent_run_id=parent_run_id, tracking_uri=uri)
    # trials a killed run left RUNNING go back in the queue now, so the header counts them
    reclaim(handle, spec, uri, parent_run_id, stale)
    _announce(console, spec, handle, storage_url, workers, parent_run_id, quiet)

    plan = WorkerPlan(sweep_path=str(spec.path), storage_url=storage_url, n_trials=n_trials,
                      study_name=study_name, tracking_uri=uri, parent_run_id=parent_run_id,
                      threads=default_threads(workers) if workers > 1 else None, quiet=quiet,
                      fit_progress=workers == 1 and not quiet and console.is_terminal, fit=fit)
    status = "FINISHED"
    try:
        if workers == 1:
            run_worker(plan)
        else:
            failed = _run_processes(plan, workers)
            if failed:
                status = "FAILED"
                raise SweepFailed(f"{'; '.join(failed)}; re-run the same command to finish the sweep")
    except (KeyboardInterrupt, TrainingInterrupted):
        status = "KILLED"
        raise TrainingInterrupted(
            f"sweep {spec.name!r} interrupted; re-run the same command to resume it "
            "(finished trials are kept, the interrupted one runs again)") from None
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if status == "FINISHED":
            _summarize(outcome, handle, console, quiet, status)
        else:
            try:  # keep what finished visible, without hiding the error that stopped the sweep
                _summarize(outcome, handle, console, quiet, status)
            except Exception as exc:
                console.print(f"(could not write the sweep summary: {one_line(exc)})", markup=False)
    return outcome


def check_workers(workers: int, *, force: bool = False, cores: int | None = None) -> None:
    """At most one worker per core, or MAX_FORCED_WORKERS with force; one line otherwise."""
    cores = cores or os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"--workers: got {workers}, expected at least 1")
    if force and workers > MAX_FORCED_WORKERS:
        raise ConfigError(f"--workers: got {workers}, expected at most {MAX_FORCED_WORKERS} even with --force-workers")
    if not force and workers > cores:
        raise ConfigError(f"--workers: got {workers}, but this machine has {cores} core{'s' if cores > 1 else ''}; "
                          "more workers than cores only slow each other down (--force-workers to insist)")


def _parent_run(handle, spec: SweepSpec, uri: str, storage_url: str) -> str:
    """The study's parent run, reopened; a new one if this tracking store does not have it
    (e.g. a machine joining a shared study with its own local MLflow store)."""
    run_id = handle.study.user_attrs.get(sweep_study.PARENT_RUN_ATTR)
    if run_id and sweep_runs.reopen_parent(run_id, tracking_uri=uri):
        return run_id
    run_id = sweep_runs.create_parent(spec, tracking_uri=uri, storage_url=storage_url)
    if not handle.study.user_attrs.get(sweep_study.PARENT_RUN_ATTR):
        handle.study.set_user_attr(sweep_study.PARENT_RUN_ATTR, run_id)
    return run_id


def _announce(console, spec, handle, storage_url, workers, parent_run_id, quiet) -> None:
    if quiet:
        return
    from optuna.trial import TrialState
    trials = handle.study.get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    verb = "created" if handle.created else "joined"
    console.print(f"sweep {printable(spec.name)} ({verb}): {spec.method}, {plural(len(spec.space), 'parameter')}, "
                  f"{plural(done, 'trial')} done, {waiting} to run, {plural(workers, 'worker')}; "
                  f"storage {sweep_study.redact(storage_url)}", markup=False)
    if parent_run_id:
        console.print(f"mlflow parent run {parent_run_id} (experiment {spec.base.experiment!r})", markup=False)


def _run_processes(plan: WorkerPlan, workers: int) -> list[str]:
    """Spawn the workers and wait; returns what went wrong with those that failed. SIGTERM to
    the launcher is passed on, so each fit stops at a batch boundary and checkpoints."""
    context = multiprocessing.get_context("spawn")  # fork + threads (OpenMP, sqlite) is unsafe
    # Ctrl-C reaches every worker, but one caught outside its fit's batch loop may not stop;
    # the event makes sure none starts another trial.
    stop = context.Event()
    processes = []
    for index in range(workers):
        worker_plan = WorkerPlan(**{**plan.__dict__, "label": f"[w{index + 1}] ", "launcher_pid": os.getpid()})
        process = context.Process(target=_worker_main, args=(worker_plan, stop), name=f"sweep-worker-{index + 1}")
        process.start()
        processes.append(process)

    def forward(signum, frame):
        stop.set()
        for p in processes:
            if p.is_alive():
                p.terminate()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:
        stop.set()
        for p in processes:  # Ctrl-C reached the workers too; let them checkpoint and give back
            p.join(timeout=120)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    interrupted = [p for p in processes if p.exitcode in (130, -signal.SIGINT, -signal.SIGTERM)]
    if interrupted:
        raise KeyboardInterrupt
    return [_describe_exit(index + 1, p.exitcode) for index, p in enumerate(processes) if p.exitcode != 0]


def _describe_exit(number: int, code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"sweep worker {number} was killed ({name})"
    return f"sweep worker {number} stopped on an error (see its line above)"


def _worker_main(plan: WorkerPlan, stop) -> None:
    """Entry point of a spawned worker: one-line errors, exit codes like the CLI's. SIGTERM (from
    the launcher, or sent when the launcher dies) stops a running fit at its next batch with a
    checkpoint, and a worker between fits at once."""
    import gc
    import sys
    if plan.launcher_pid is not None:
        watch_launcher(plan.launcher_pid)
    try:
        with sigterm_as_keyboard_interrupt():
            run_worker(plan, stop)
        gc.freeze()  # out of the teardown's collections, as the CLI's own process (convtrain/cli.py)
    except (KeyboardInterrupt, TrainingInterrupted):
        if plan.launcher_pid is not None and launcher_gone(plan.launcher_pid):
            print(f"{plan.label}error: the sweep launcher (pid {plan.launcher_pid}) is gone, so this worker stopped "
                  "(a running trial checkpointed); re-run the sweep command to finish it", file=sys.stderr, flush=True)
        sys.exit(130)
    except ConvtrainError as exc:
        print(f"{plan.label}error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except MemoryError as exc:  # the line the CLI gives one in the launcher's own process
        print(f"{plan.label}error: {out_of_memory(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as exc:  # a traceback per worker would bury the one line that matters
        print(f"{plan.label}error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _summarize(outcome: SweepOutcome, handle, console: Console, quiet: bool, status: str) -> None:
    """Table, files and parent-run summary from the study as it is now (also after a failure)."""
    spec = outcome.spec
    rows = sweep_report.trial_rows(handle.study, spec)
    outcome.rows = rows
    outcome.best = best = sweep_report.best_row(rows)
    files = [sweep_report.write_csv(rows, spec, spec.out / "trials.csv")]
    if best is not None:
        outcome.best_config = sweep_report.write_best_config(spec, best, spec.out / "best.toml",
                                                             parent_run_id=outcome.parent_run_id,
                                                             tracking_uri=outcome.tracking_uri)
        files.append(outcome.best_config)
    for plot in (sweep_plots.objective_vs_parameters(rows, spec, spec.out / "objective_by_parameter.png"),
                 sweep_plots.optimization_history(rows, spec, spec.out / "optimization_history.png")):
        if plot is not None:
            files.append(plot)
    outcome.files = files
    console.print(sweep_report.trials_table(rows, spec, max_rows=10 if quiet else 40))
    if best is not None:
        console.print(f"best: trial {best.number}, {spec.objective} {best.value:.4f}; "
                      f"config in {outcome.best_config} (convtrain fit --config {outcome.best_config})",
                      markup=False)
    if outcome.parent_run_id:
        counts = sweep_report.counts(rows)
        summary = {"counts": counts, "finished": counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"],
                   "best": None if best is None else {"number": best.number, "value": best.value,
                                                       "params": best.params, "run_id": best.run_id}}
        registered = sweep_runs.log_summary(outcome.parent_run_id, tracking_uri=outcome.tracking_uri, spec=spec,
                                            summary=summary, files=files, rows=rows, best=best,
                                            best_config=outcome.best_config)
        if registered and not quiet:
            console.print(f"registered the best trial's model: {registered}", markup=False)
        # Another machine may still be running trials: the parent is finished when nothing waits.
        if status != "FINISHED" or (counts["WAITING"] == 0 and counts["RUNNING"] == 0):
            sweep_runs.finish_parent(outcome.parent_run_id, tracking_uri=outcome.tracking_uri, status=status)
