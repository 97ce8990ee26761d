"""The Optuna side of a sweep: the storage, the study (created once), and its trial tickets.

Why tickets. Every trial a sweep will run is enqueued as a WAITING trial when the study is
created (a grid point's parameters, or an empty ticket that TPE/random sample when it is
taken). A worker only ever *takes* a waiting trial and never asks Optuna for a fresh one. So,
across processes and machines:
- no trial runs twice: Optuna's GridSampler alone can hand one point to two workers (it
  says so itself, and after a killed trial it re-picks among running points);
- the budget is exact: n_trials tickets, however many workers race for the last one;
- a re-run resumes: finished trials are finished, waiting tickets are still waiting.

A killed worker leaves its trial RUNNING. `reclaim_dead_trials` fails it when its process
is known dead (same machine, pid gone) and Optuna's heartbeat fails it when a worker on
another machine has been silent for GRACE_SECONDS; either way the trial is re-enqueued
with the same parameters (at most MAX_RETRIES times, so a configuration that kills its
worker every time cannot loop forever).

What is Optuna's and what is ours:
- Optuna's: the storage, the WAITING trials (`study.add_trial`), the claim itself -- a
  WAITING -> RUNNING `set_trial_state_values` that returns False to every process but one,
  exactly what `study.ask()` does inside (`Study._pop_waiting_trial_id`) -- heartbeats,
  `fail_stale_trials`, `tell`, samplers and pruners. A retry records its lineage as Optuna's
  `RetryHeartbeatStaleTrialCallback` (formerly `RetryFailedTrialCallback`) does, under its
  system attrs, so `RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)` and
  `.retry_history(trial)` answer for our retries too.
- Ours, because Optuna lacks it: `take_ticket` instead of `study.ask()`, since `ask()` creates
  a fresh trial when no WAITING one is left (the budget would no longer be exact, and a grid
  point could run twice) and gives no way to sign a ticket *before* turning it RUNNING (the
  signature is how a claim cut short by Ctrl-C or kill -9 is told apart from one in
  progress, see `reclaim_dead_trials`). `requeue` instead of Optuna's retry callback, since
  that callback copies every system attr of the dead trial (its owner and claims included),
  counts every re-enqueue as a retry (a Ctrl-C'd trial given back is not a failed one), has
  no notion of the checkpoint folder a retry continues from, and loses a grid ticket's
  parameters when the trial died before suggesting them; and it only runs on heartbeat
  staleness, while a dead local worker is reclaimed at once by its pid.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convtrain.errors import ConfigError, ConvtrainError, one_line
from convtrain.sweep.spec import SweepSpec
from convtrain.tracking.processes import alive, on_this_machine, this_process

if TYPE_CHECKING:  # optuna is imported lazily: `convtrain --help` must not pay for it
    import optuna

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
MAX_RETRIES = 3
# Study user attrs that tie the study to its sweep and to the MLflow parent run.
FINGERPRINT_ATTR = "convtrain.fingerprint"
TICKETS_ATTR = "convtrain.tickets"
PARENT_RUN_ATTR = "convtrain.mlflow_parent_run_id"
# Trial system attrs.
OWNER_ATTR = "convtrain.owner"
CLAIM_PREFIX = "convtrain.claim."  # + pid@host: a worker trying to take a WAITING trial
RETRIES_ATTR = "convtrain.retries"  # re-enqueues that count against MAX_RETRIES
RETRY_OF_ATTR = "convtrain.retry_of"  # the trial this one repeats (the one just before it)
# Optuna's own retry lineage (RetryHeartbeatStaleTrialCallback's system attrs): the first
# trial of the series, and every trial of it before this one
OPTUNA_FAILED_TRIAL_ATTR = "failed_trial"
OPTUNA_RETRY_HISTORY_ATTR = "retry_history"
FIXED_PARAMS_ATTR = "fixed_params"  # Optuna's: parameters a WAITING trial comes with (enqueue_trial)
# Trial user attrs (shown in trials.csv and Optuna's dashboard).
NOTE_ATTR = "note"  # why a trial failed, was pruned or is a retry
SECONDS_ATTR = "seconds"
RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow child run
RETRY_REASON_ATTR = "retry_reason"
OUT_ATTR = "convtrain.out"  # the folder a trial's fit writes its checkpoints to
RESUME_ATTR = "convtrain.resume_from"  # a retry continues the killed trial's checkpoint there


class StorageError(ConvtrainError):
    """The study storage cannot be opened or reached."""


def redact(url: str) -> str:
    """The storage URL without its password, for logs and MLflow params."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def quiet_optuna() -> None:
    """Optuna logs every study creation and warns that heartbeats are experimental; the sweep
    prints its own lines."""
    import warnings

    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg (3); fall back to psycopg2 when only that
    is installed, and accept the postgres:// spelling many hosting services hand out."""
    from importlib.util import find_spec

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    if find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def open_storage(url: str, *, reclaimed: list | None = None) -> "optuna.storages.RDBStorage":
    """An Optuna RDB storage with heartbeats on; stale trials found by the heartbeat are
    re-enqueued and appended to `reclaimed` (so the caller can close their MLflow runs)."""
    import optuna
    quiet_optuna()
    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        # Several workers share one file: wait for its write lock rather than fail at once;
        # isolation_level=None hands BEGIN to us (see _serialize_sqlite_transactions).
        engine_kwargs["connect_args"] = {"timeout": 120, "isolation_level": None}
    else:
        engine_kwargs["pool_pre_ping"] = True

    def on_stale(study, trial):
        requeue(study, trial, reason="its worker stopped sending heartbeats")
        if reclaimed is not None:
            reclaimed.append(trial)

    from sqlalchemy.exc import IntegrityError, ProgrammingError

    try:
        for attempt in range(4):
            try:
                storage = optuna.storages.RDBStorage(
                    with_driver(url), engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=on_stale)
                break
            except (IntegrityError, ProgrammingError):
                # Machines starting together on a fresh database race to create Optuna's
                # tables; the loser finds them made a moment later.
                if attempt == 3:
                    raise
                time.sleep(0.5 + random.random())
        if sqlite:
            _serialize_sqlite_transactions(storage.engine)
        return storage
    except ImportError as exc:
        raise StorageError(f"study storage {redact(url)}: missing database driver ({exc})") from None
    except Exception as exc:  # sqlalchemy raises many kinds; all mean "cannot use this URL"
        raise StorageError(f"study storage {redact(url)}: cannot open it: {one_line(exc)}") from None


def _serialize_sqlite_transactions(engine) -> None:
    """Start every transaction with BEGIN IMMEDIATE (the file's write lock).

    Taking a ticket reads the trial's state and then writes RUNNING. PostgreSQL locks the row
    (SELECT ... FOR UPDATE); SQLite ignores FOR UPDATE, and Python's sqlite3 runs the SELECT
    outside any transaction, so two workers could both read WAITING and both run the trial.
    Holding the write lock from the first statement makes read-then-write atomic.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sampler(spec: SweepSpec, trial_number: int):
    """A sampler seeded per trial: trial k's random draws depend on (seed, k) only, so a
    one-worker sweep is reproducible and parallel workers never draw the same numbers."""
    import optuna
    seed = (spec.seed * 1_000_003 + trial_number) % 2**32
    if spec.method == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # grid trials carry all their parameters in the ticket; nothing is left to sample
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: SweepSpec):
    import optuna
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                           n_warmup_steps=spec.warmup_epochs)
    if spec.pruner == "hyperband":
        max_epochs = "auto" if "epochs" in spec.space else spec.base.epochs
        return optuna.pruners.HyperbandPruner(min_resource=max(1, spec.warmup_epochs), max_resource=max_epochs)
    return optuna.pruners.NopPruner()


@dataclass
class StudyHandle:
    """A loaded study plus the raw storage its tickets are taken from."""

    study: "optuna.Study"
    storage: "optuna.storages.RDBStorage"
    study_id: int
    created: bool


def create_or_join(spec: SweepSpec, storage, *, on_create=None, wait_seconds: float = 60.0) -> StudyHandle:
    """Create the study and issue its tickets, or join the study another run created.

    `on_create(study)` runs once, by the creator, before the tickets are issued (it makes the
    MLflow parent run). Joiners wait until the creator has finished issuing tickets.
    """
    import optuna
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction,
                                    sampler=make_sampler(spec, 0), pruner=make_pruner(spec))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage,
                                  sampler=make_sampler(spec, 0), pruner=make_pruner(spec))
        handle = StudyHandle(study, storage, storage.get_study_id_from_name(spec.name), created=False)
        _check_same_sweep(handle, spec)
        _wait_for_tickets(handle, wait_seconds)
        _top_up(handle, spec)
        return handle
    handle = StudyHandle(study, storage, storage.get_study_id_from_name(spec.name), created=True)
    study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    if on_create is not None:
        on_create(study)
    _issue(handle, spec, spec.n_trials)
    return handle


def load(spec: SweepSpec, storage) -> StudyHandle:
    """Load an existing study in a worker process (the launcher created it)."""
    import optuna
    study = optuna.load_study(study_name=spec.name, storage=storage,
                              sampler=make_sampler(spec, 0), pruner=make_pruner(spec))
    return StudyHandle(study, storage, storage.get_study_id_from_name(spec.name), created=False)


def _check_same_sweep(handle: StudyHandle, spec: SweepSpec) -> None:
    stored = handle.study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is not None and stored != spec.fingerprint():
        raise ConfigError(
            f"study {spec.name!r} already exists in this storage for a different sweep (method, objective or "
            "space differ); give this sweep another name ([sweep] name or --study-name)")


def _wait_for_tickets(handle: StudyHandle, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    while TICKETS_ATTR not in handle.study.user_attrs:
        if time.monotonic() > deadline:
            raise StorageError(
                f"study {handle.study.study_name!r} exists but its creator never issued its trials; "
                "delete it (optuna delete-study) or give this sweep another name")
        time.sleep(0.5)


def _issue(handle: StudyHandle, spec: SweepSpec, count: int, already: int = 0) -> None:
    import optuna
    if spec.method == "grid":
        issued = {_key(t.system_attrs.get(FIXED_PARAMS_ATTR, {})) for t in handle.study.get_trials(deepcopy=False)}
        points = [p for p in spec.grid_points() if _key(p) not in issued][:count]
    else:
        points = [{} for _ in range(count)]
    for params in points:
        handle.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, system_attrs={FIXED_PARAMS_ATTR: params}))
    # written last: joiners wait for it, so they never see a half-issued study
    handle.study.set_user_attr(TICKETS_ATTR, already + len(points))


def _top_up(handle: StudyHandle, spec: SweepSpec) -> None:
    """A re-run asking for more trials than the study was created with issues the difference."""
    issued = handle.study.user_attrs.get(TICKETS_ATTR, 0)
    if spec.n_trials > issued:
        _issue(handle, spec, spec.n_trials - issued, already=issued)


def _key(params: dict) -> str:
    return repr(sorted(params.items()))


# ---- taking, reclaiming and re-enqueueing trials -------------------------------------------------


def take_ticket(handle: StudyHandle, spec: SweepSpec):
    """Atomically take one waiting trial for this process; None when none are left."""
    import optuna
    from optuna.trial import TrialState
    storage = handle.storage
    # listed through the study, so the trial is in the cache Optuna's Trial object reads
    for waiting in handle.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(handle.study_id, waiting.number)
        # Each claimant signs the ticket before trying to turn it RUNNING, so that a worker
        # stopped between the two (Ctrl-C, kill) leaves a trial that a re-run can tell is
        # orphaned: RUNNING, no owner, and every claimant gone. (One key per claimant: a
        # worker that loses the race must not overwrite what the winner wrote.)
        owner = this_process()
        try:
            storage.set_trial_system_attr(trial_id, _claim_key(owner), owner)
            if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                continue  # another worker took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_system_attr(trial_id, OWNER_ATTR, owner)
        storage.record_heartbeat(trial_id)
        handle.study.sampler = make_sampler(spec, waiting.number)
        return optuna.Trial(handle.study, trial_id)
    return None


def requeue(study, trial, *, reason: str, count_retry: bool = True) -> bool:
    """Enqueue a fresh ticket with the parameters of `trial` (which has just failed)."""
    import optuna
    retries = trial.system_attrs.get(RETRIES_ATTR, 0) + (1 if count_retry else 0)
    if retries > MAX_RETRIES:
        return False
    params = {**trial.params, **trial.system_attrs.get(FIXED_PARAMS_ATTR, {})}
    history = [*trial.system_attrs.get(OPTUNA_RETRY_HISTORY_ATTR, []), trial.number]
    system_attrs = {FIXED_PARAMS_ATTR: params, RETRIES_ATTR: retries, RETRY_OF_ATTR: trial.number,
                    OPTUNA_FAILED_TRIAL_ATTR: history[0], OPTUNA_RETRY_HISTORY_ATTR: history}
    out = trial.system_attrs.get(OUT_ATTR)
    if out:
        system_attrs[RESUME_ATTR] = out
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING,
                                              system_attrs=system_attrs, user_attrs={RETRY_REASON_ATTR: reason}))
    return True


def reclaim_dead_trials(handle: StudyHandle) -> list:
    """Fail and re-enqueue RUNNING trials whose worker ran on this machine and is gone."""
    import optuna
    from optuna.trial import TrialState
    reclaimed = []
    for trial in handle.storage.get_all_trials(handle.study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if not owner:
            # the claim was cut short between "RUNNING" and "run by": orphaned once every
            # claimant is known to be gone, or, for claimants that cannot be checked from
            # here, once a claim (milliseconds) is long over
            claimants = [v for k, v in trial.system_attrs.items() if k.startswith(CLAIM_PREFIX)]
            local_and_dead = claimants and all(on_this_machine(c) and not alive(c) for c in claimants)
            if not local_and_dead and not _older_than(trial.datetime_start, GRACE_SECONDS):
                continue
        elif not on_this_machine(owner) or alive(owner):
            continue
        trial_id = handle.storage.get_trial_id_from_study_id_trial_number(handle.study_id, trial.number)
        try:
            handle.storage.set_trial_user_attr(trial_id, NOTE_ATTR, "its worker process died")
            if not handle.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process reclaimed it first
        requeue(handle.study, trial, reason=f"trial {trial.number} was killed")
        reclaimed.append(trial)
    return reclaimed


def _claim_key(owner: dict) -> str:
    return f"{CLAIM_PREFIX}{owner['pid']}@{owner['host']}"


def _older_than(started, seconds: float) -> bool:
    if started is None:
        return True
    import datetime
    now = datetime.datetime.now(started.tzinfo) if started.tzinfo else datetime.datetime.now()
    return (now - started).total_seconds() > seconds


def fail_stale_trials(handle: StudyHandle) -> None:
    """Optuna's heartbeat check for workers on other machines (calls our stale callback)."""
    from optuna.storages import fail_stale_trials as optuna_fail_stale
    optuna_fail_stale(handle.study)


class Heartbeat:
    """Records a trial's heartbeat every HEARTBEAT_SECONDS while the trial runs."""

    def __init__(self, storage, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a database hiccup must not kill the fit; the next beat retries
                pass
