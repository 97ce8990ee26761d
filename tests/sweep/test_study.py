"""Sweep mechanics on a fake fit (tests/support/sweep_fakes.py): tickets, workers, resume, pruning.

No MLflow here (track = false); tests/test_sweep_e2e.py runs real fits with tracking.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from convtrain.errors import ConfigError, ConvtrainError, DataError, TrainingInterrupted
from convtrain.sweep.launcher import run_sweep
from convtrain.sweep.spec import load_sweep
from convtrain.sweep.study import create_or_join, open_storage
from tests.support import sweep_fakes
from tests.support.sweep_fakes import calls, fake_fit

GRID = """
[fit]
epochs = 2
track = false
[sweep]
method = "grid"
[space]
filters = [[4, 8], [8, 16]]
l2 = [1e-4, 1e-3]
"""


@pytest.fixture
def sweep_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEP_FAKE_LOG", str(tmp_path / "calls.jsonl"))
    return tmp_path


def write(folder: Path, text: str, name="sweep.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_study(folder: Path, name="sweep"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def states(study) -> Counter:
    return Counter(t.state.name for t in study.get_trials())


def points(records) -> list:
    return sorted((tuple(r["filters"]), r["l2"]) for r in records)


def test_grid_runs_every_point_once_and_a_rerun_adds_nothing(sweep_dir):
    path = write(sweep_dir, GRID)
    outcome = run_sweep(path, quiet=True, fit=fake_fit)
    assert len(outcome.rows) == 4 and all(r.state == "COMPLETE" for r in outcome.rows)
    assert len(set(points(calls(sweep_dir / "calls.jsonl")))) == 4
    assert outcome.best.params == {"filters": "8,16", "l2": 0.001}
    assert outcome.best.value == max(r.value for r in outcome.rows)
    assert "filters = [8, 16]" in outcome.best_config.read_text()
    assert (sweep_dir / "runs/sweep/trials.csv").read_text().count("COMPLETE") == 4
    assert (sweep_dir / "runs/sweep/optimization_history.png").stat().st_size > 0

    run_sweep(path, quiet=True, fit=fake_fit)
    assert len(calls(sweep_dir / "calls.jsonl")) == 4
    assert states(load_study(sweep_dir)) == {"COMPLETE": 4}


def test_trial_outputs_are_per_trial_and_threads_stay_the_base_configs(sweep_dir):
    run_sweep(write(sweep_dir, GRID), quiet=True, fit=fake_fit)
    records = calls(sweep_dir / "calls.jsonl")
    assert sorted(r["out"] for r in records) == [f"runs/sweep/trial-{n:03d}" for n in range(4)]
    assert {r["threads"] for r in records} == {None}


def test_random_search_is_reproducible_and_the_budget_is_exact(sweep_dir):
    text = GRID.replace('method = "grid"', 'method = "random"\nn_trials = 5\nseed = 7').replace(
        "l2 = [1e-4, 1e-3]", "l2 = {low = 1e-5, high = 1e-1, log = true}")
    first = run_sweep(write(sweep_dir, text, "a.toml"), quiet=True, fit=fake_fit)
    second = run_sweep(write(sweep_dir, text, "b.toml"), quiet=True, fit=fake_fit)
    assert len(first.rows) == 5
    by_number = lambda rows: sorted((r.number, r.params["l2"], r.params["filters"]) for r in rows)
    assert by_number(first.rows) == by_number(second.rows)
    # asking for more trials later tops the study up instead of starting over
    more = run_sweep(write(sweep_dir, text, "a.toml"), n_trials=7, quiet=True, fit=fake_fit)
    assert len(more.rows) == 7 and len(calls(sweep_dir / "calls.jsonl")) == 12


def test_tpe_with_median_pruning_marks_pruned_trials(sweep_dir):
    text = """
[fit]
epochs = 4
track = false
[sweep]
method = "grid"
pruner = "median"
startup_trials = 2
warmup_epochs = 0
[space]
l2 = [1e-3, 2e-3, 1e-4, 1e-5, 1e-6, 1e-1]
"""
    outcome = run_sweep(write(sweep_dir, text), quiet=True, fit=fake_fit)
    counted = Counter(r.state for r in outcome.rows)
    assert counted["PRUNED"] >= 2 and counted["COMPLETE"] >= 2 and counted["FAIL"] == 0
    pruned = [t for t in load_study(sweep_dir).get_trials() if t.state.name == "PRUNED"]
    assert all(t.intermediate_values for t in pruned)


def test_hyperband_prunes_weak_trials_at_its_rungs(sweep_dir):
    text = """
[fit]
epochs = 9
track = false
[sweep]
method = "random"
n_trials = 12
seed = 3
pruner = "hyperband"
warmup_epochs = 1
[space]
l2 = {low = 1e-6, high = 1e-1, log = true}
"""
    outcome = run_sweep(write(sweep_dir, text), quiet=True, fit=fake_fit)
    counted = Counter(r.state for r in outcome.rows)
    assert counted["PRUNED"] >= 1 and counted["COMPLETE"] >= 1 and counted["FAIL"] == 0
    study = load_study(sweep_dir)
    from convtrain.sweep.study import make_pruner
    assert isinstance(make_pruner(load_sweep(sweep_dir / "sweep.toml")), optuna.pruners.HyperbandPruner)
    for trial in study.get_trials():
        reported = sorted(trial.intermediate_values)
        if trial.state.name == "PRUNED":  # stopped early, at a rung below the full 9 epochs
            assert reported and max(reported) < 9
        else:
            assert reported == list(range(1, 10))


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep_dir):
    path = write(sweep_dir, GRID)
    ran = []  # two trials finish, then Ctrl-C hits the third

    def interrupting_fit(config, **kwargs):
        if len(ran) == 2:
            ran.append("interrupted")
            raise KeyboardInterrupt
        ran.append(config.l2)
        return fake_fit(config, **kwargs)

    with pytest.raises(TrainingInterrupted, match="re-run the same command to resume"):
        run_sweep(path, quiet=True, fit=interrupting_fit)
    study = load_study(sweep_dir)
    assert states(study) == {"COMPLETE": 2, "FAIL": 1, "WAITING": 2}
    finished = {t.number for t in study.get_trials() if t.state.name == "COMPLETE"}

    run_sweep(path, quiet=True, fit=fake_fit)
    study = load_study(sweep_dir)
    assert states(study) == {"COMPLETE": 4, "FAIL": 1}
    records = calls(sweep_dir / "calls.jsonl")
    assert not finished & {r["trial"] for r in records[2:]}  # the second run left them alone
    assert len(set(points(records))) == 4 and len(records) == 2 + 2


def test_a_killed_sweep_process_resumes_and_reruns_only_the_killed_trial(sweep_dir):
    path = write(sweep_dir, GRID)
    env = {**os.environ, "SWEEP_FAKE_HANG_AFTER": "2", "PYTHONPATH": _pythonpath()}
    process = subprocess.Popen([sys.executable, sweep_fakes.__file__, str(path)], cwd=sweep_dir, env=env)
    log = sweep_dir / "calls.jsonl"
    deadline = time.monotonic() + 60
    while len(calls(log)) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    study = load_study(sweep_dir)
    assert states(study) == {"COMPLETE": 2, "RUNNING": 1, "WAITING": 1}

    outcome = run_sweep(path, quiet=True, fit=fake_fit)
    records = calls(log)
    assert len(records) == 5
    # the resumed run did the killed point and the untouched one, not the two finished ones
    assert points(records[3:]) == sorted(set(points(records)) - set(points(records[:2])))
    assert points(records[2:3])[0] in points(records[3:])
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 4, "FAIL": 1}
    failed = next(r for r in outcome.rows if r.state == "FAIL")
    assert "died" in failed.note


def test_ctrl_c_stops_every_worker_and_the_rerun_finishes_the_rest(sweep_dir):
    text = GRID.replace("l2 = [1e-4, 1e-3]", "l2 = [1e-4, 1e-3, 1e-2]")
    path = write(sweep_dir, text)
    log = sweep_dir / "calls.jsonl"
    env = {**os.environ, "SWEEP_FAKE_SLEEP": "1.0", "PYTHONPATH": _pythonpath()}
    process = subprocess.Popen([sys.executable, sweep_fakes.__file__, str(path), "--workers", "2"],
                               cwd=sweep_dir, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(calls(log)) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "re-run the same command to resume" in err
    study = load_study(sweep_dir)
    # it stopped early; a trial caught between two steps may still read RUNNING: its process
    # is gone, so the re-run reclaims it
    assert states(study)["COMPLETE"] < 6
    finished = {t.number for t in study.get_trials() if t.state.name == "COMPLETE"}

    before = len(calls(log))
    outcome = run_sweep(path, quiet=True, fit=fake_fit)
    assert Counter(r.state for r in outcome.rows)["COMPLETE"] == 6
    assert not finished & {r["trial"] for r in calls(log)[before:]}
    assert len(set(points(calls(log)))) == 6


def test_two_workers_share_the_grid_without_duplicates(sweep_dir, monkeypatch):
    monkeypatch.setenv("SWEEP_FAKE_BARRIER", "2")  # both workers get a trial, however slow one starts
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    text = GRID.replace("l2 = [1e-4, 1e-3]", "l2 = [1e-4, 1e-3, 1e-2]")
    outcome = run_sweep(write(sweep_dir, text), workers=2, quiet=True, fit=fake_fit, force_workers=True)
    records = calls(sweep_dir / "calls.jsonl")
    assert len(records) == 6 and len(set(points(records))) == 6
    assert len({r["pid"] for r in records}) == 2 and os.getpid() not in {r["pid"] for r in records}
    assert {r["threads"] for r in records} == {max(1, os.cpu_count() // 2)}
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 6}


def test_one_unexpected_error_is_retried_but_a_data_error_stops_the_sweep(sweep_dir, monkeypatch, capsys):
    path = write(sweep_dir, GRID)
    (sweep_dir / "fail-once").write_text("")
    monkeypatch.setenv("SWEEP_FAKE_FAIL_ONCE", str(sweep_dir / "fail-once"))
    outcome = run_sweep(path, fit=fake_fit)
    assert "warning: trial 0 stopped on RuntimeError" in capsys.readouterr().out
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 4, "FAIL": 1}
    assert next(r for r in outcome.rows if r.state == "FAIL").number == 0

    monkeypatch.setenv("SWEEP_FAKE_DATA_ERROR", "data/mnist")
    with pytest.raises(DataError, match="data/mnist does not exist"):
        run_sweep(write(sweep_dir, GRID, "other.toml"), quiet=True, fit=fake_fit)
    study = load_study(sweep_dir, "other")
    assert states(study) == {"FAIL": 1, "WAITING": 4}  # nothing lost: the failed point is queued again


def test_four_processes_racing_for_sqlite_tickets_never_take_the_same_one(sweep_dir):
    # Without BEGIN IMMEDIATE, SQLite lets two processes both read a ticket as WAITING.
    path = write(sweep_dir, "[fit]\ntrack = false\n[sweep]\nmethod = \"random\"\nn_trials = 60\n"
                            "[space]\nlr = {low = 0.01, high = 0.1}\n")
    url = f"sqlite:///{sweep_dir / 'optuna.db'}"
    spec = load_sweep(path)
    create_or_join(spec, open_storage(url))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        taken = pool.map(sweep_fakes.take_all_tickets, [(str(path), url)] * 4)
    numbers = [n for worker in taken for n in worker]
    assert sorted(numbers) == list(range(60))


def test_a_worker_stopped_in_the_middle_of_a_claim_leaves_a_trial_the_rerun_reclaims(sweep_dir, monkeypatch):
    """Ctrl-C between "RUNNING" and "run by this process": the trial has no owner, but its
    claimant signed it, so a re-run sees the claimant is gone and runs the point again."""
    from convtrain.sweep import study as sweep_study
    from convtrain.sweep.study import OWNER_ATTR, take_ticket

    path = write(sweep_dir, GRID)
    handle = create_or_join(load_sweep(path), open_storage(f"sqlite:///{sweep_dir / 'optuna.db'}"))
    real = handle.storage.set_trial_state_values

    def interrupted_right_after(trial_id, state, values=None):
        real(trial_id, state=state, values=values)
        raise KeyboardInterrupt  # Ctrl-C between the claim's two writes

    monkeypatch.setattr(handle.storage, "set_trial_state_values", interrupted_right_after)
    with pytest.raises(KeyboardInterrupt):
        take_ticket(handle, load_sweep(path))
    monkeypatch.undo()
    (cut,) = [t for t in handle.storage.get_all_trials(handle.study_id) if t.state.name == "RUNNING"]
    assert OWNER_ATTR not in cut.system_attrs
    assert sweep_study.reclaim_dead_trials(handle) == []  # its claimant, this process, still runs
    dead = {**sweep_study.this_process(), "pid": _ended_pid()}
    trial_id = handle.storage.get_trial_id_from_study_id_trial_number(handle.study_id, cut.number)
    for key in [k for k in cut.system_attrs if k.startswith(sweep_study.CLAIM_PREFIX)]:
        handle.storage.set_trial_system_attr(trial_id, key, dead)  # as if its claimant had died
    assert [t.number for t in sweep_study.reclaim_dead_trials(handle)] == [cut.number]


def _ended_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_running_trial_nobody_owns_is_reclaimed_after_the_grace_period(sweep_dir, monkeypatch):
    """A worker SIGKILLed between the two writes of a claim leaves no owner to ask."""
    from convtrain.sweep import study as sweep_study

    path = write(sweep_dir, GRID)
    handle = create_or_join(load_sweep(path), open_storage(f"sqlite:///{sweep_dir / 'optuna.db'}"))
    waiting = handle.storage.get_all_trials(handle.study_id)[0]
    trial_id = handle.storage.get_trial_id_from_study_id_trial_number(handle.study_id, waiting.number)
    handle.storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING)
    assert sweep_study.reclaim_dead_trials(handle) == []  # it may still be being claimed
    monkeypatch.setattr(sweep_study, "_older_than", lambda started, seconds: True)  # a minute later
    assert [t.number for t in sweep_study.reclaim_dead_trials(handle)] == [waiting.number]
    outcome = run_sweep(path, quiet=True, fit=fake_fit)
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 4, "FAIL": 1}


def test_a_study_name_taken_by_another_sweep_is_refused(sweep_dir):
    run_sweep(write(sweep_dir, GRID), quiet=True, fit=fake_fit)
    other = GRID.replace("l2 = [1e-4, 1e-3]", "l2 = [1e-2]")
    with pytest.raises(ConfigError, match="already exists in this storage for a different sweep"):
        run_sweep(write(sweep_dir, other, "other.toml"), study_name="sweep", quiet=True, fit=fake_fit)


def test_a_sweep_name_with_dots_and_slashes_writes_under_runs(sweep_dir):
    (sweep_dir / "deep" / "er").mkdir(parents=True)
    path = write(sweep_dir / "deep" / "er", GRID.replace("[sweep]", '[sweep]\nname = "../../escaped"'))
    before = set(sweep_dir.parent.iterdir())
    import os as _os
    _os.chdir(sweep_dir / "deep" / "er")
    outcome = run_sweep(path, quiet=True, fit=fake_fit)
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 4}
    assert set(sweep_dir.parent.iterdir()) == before and not (sweep_dir / "escaped").exists()
    assert (sweep_dir / "deep/er/runs/escaped/trials.csv").is_file()
    assert {Path(r["out"]).parent for r in calls(sweep_dir / "calls.jsonl")} == {Path("runs/escaped")}


def test_more_workers_than_cores_is_one_line_unless_forced(sweep_dir, monkeypatch):
    from convtrain.sweep import launcher

    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 2)
    path = write(sweep_dir, GRID)
    for workers, force, message in [(500, False, "this machine has 2 cores"), (3, False, "--force-workers"),
                                    (0, False, "at least 1"), (65, True, "at most 64 even with --force-workers")]:
        with pytest.raises(ConfigError, match=message) as info:
            run_sweep(path, workers=workers, force_workers=force, quiet=True, fit=fake_fit)
        assert "\n" not in str(info.value)
    assert not (sweep_dir / "optuna.db").exists()  # refused before anything is written
    launcher.check_workers(2)
    launcher.check_workers(64, force=True)


def test_a_space_whose_trials_all_fail_on_a_bug_stops_with_one_line(sweep_dir, monkeypatch, capsys):
    monkeypatch.setenv("SWEEP_FAKE_BUG", "every trial")
    path = write(sweep_dir, GRID)
    with pytest.raises(ConvtrainError) as info:
        run_sweep(path, quiet=True, fit=fake_fit)
    message = str(info.value)
    assert "\n" not in message and "trials 0 and 1 both stopped on unexpected errors" in message
    assert "ValueError: operands could not be broadcast" in message
    assert isinstance(info.value.__cause__, ValueError)  # kept for --debug
    assert states(load_study(sweep_dir)) == {"FAIL": 2, "WAITING": 4}  # nothing lost

    # with several workers: one line per worker and one for the sweep, no traceback
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    done = subprocess.run([sys.executable, sweep_fakes.__file__, str(write(sweep_dir, GRID, "other.toml")),
                           "--workers", "2"], cwd=sweep_dir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 3 and lines[-1].startswith("error: sweep worker"), done.stderr


def test_workers_stop_when_their_launcher_is_killed(sweep_dir):
    """kill -9 of the launcher: its workers see it gone at their next trial boundary and stop
    (before, they ran the rest of the sweep on their own); the re-run finishes the sweep."""
    text = GRID.replace("l2 = [1e-4, 1e-3]", "l2 = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]")  # 12 points
    path = write(sweep_dir, text)
    log = sweep_dir / "calls.jsonl"
    env = {**os.environ, "SWEEP_FAKE_SLEEP": "0.5", "SWEEP_FAKE_BARRIER": "2", "PYTHONPATH": _pythonpath()}
    launcher = subprocess.Popen([sys.executable, sweep_fakes.__file__, str(path), "--workers", "2"],
                                cwd=sweep_dir, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len({r["pid"] for r in calls(log)}) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = {r["pid"] for r in calls(log)}
        launcher.kill()
        launcher.wait()
        while any(_running(pid) for pid in workers):  # each ends its trial, then sees the launcher gone
            assert time.monotonic() < deadline + 60, "the workers outlived their launcher"
            time.sleep(0.1)
        assert len(calls(log)) <= 4  # at most the trial each had started, and one more each
        assert "the sweep launcher (pid" in launcher.stderr.read()
    finally:
        _kill_group(launcher.pid)
    outcome = run_sweep(path, quiet=True, fit=fake_fit)
    assert Counter(r.state for r in outcome.rows)["COMPLETE"] == 12
    assert len(set(points(calls(log)))) == 12


def test_the_rerun_header_counts_the_trials_a_killed_group_left_running(sweep_dir):
    import io
    import re

    from rich.console import Console

    text = GRID.replace("l2 = [1e-4, 1e-3]", "l2 = [1e-4, 1e-3, 1e-2]")
    path = write(sweep_dir, text)
    log = sweep_dir / "calls.jsonl"
    env = {**os.environ, "SWEEP_FAKE_HANG_AFTER": "2", "SWEEP_FAKE_BARRIER": "2", "PYTHONPATH": _pythonpath()}
    errors = sweep_dir / "launcher-stderr.txt"
    with open(errors, "w") as stderr:
        group = subprocess.Popen([sys.executable, sweep_fakes.__file__, str(path), "--workers", "2"],
                                 cwd=sweep_dir, env=env, start_new_session=True, stderr=stderr)
    try:
        # a liveness bound, not a timing: seconds on an idle machine; generous for a loaded one
        deadline = time.monotonic() + 180
        while len(calls(log)) < 4:  # two trials done, two hanging
            assert group.poll() is None and time.monotonic() < deadline, (calls(log), errors.read_text())
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        _kill_group(group.pid)  # kill -9 of the launcher and its workers at once
    group.wait()
    workers = {r["pid"] for r in calls(log)}
    while any(_exists(pid) for pid in workers):  # until init has reaped them (a zombie looks alive)
        assert time.monotonic() < deadline + 60
        time.sleep(0.05)
    assert states(load_study(sweep_dir))["RUNNING"] == 2
    before = len(calls(log))
    out = io.StringIO()
    outcome = run_sweep(path, fit=fake_fit, console=Console(file=out, width=200))
    announced = int(re.search(r"(\d+) to run", out.getvalue()).group(1))
    assert announced == len(calls(log)) - before == 4  # the two waiting and the two killed
    assert Counter(r.state for r in outcome.rows) == {"COMPLETE": 6, "FAIL": 2}


def test_the_fakes_hang_depends_on_the_calls_place_not_on_what_others_logged_since(sweep_dir, monkeypatch):
    """The killed-group test above once waited out its deadline with three calls logged: the
    worker that logged the second call, held up past the barrier, saw the other's third call
    and hung as well, so the fourth never came. A call's place in the log decides."""
    from types import SimpleNamespace

    log = sweep_dir / "calls.jsonl"
    log.write_text('{"pid": 1, "trial": 0, "call": "other"}\n')  # the other worker's first call
    monkeypatch.setenv("SWEEP_FAKE_HANG_AFTER", "2")
    read = sweep_fakes.calls

    def the_other_worker_runs_ahead(path):
        with open(path, "a") as fh:  # its next call, logged while this one was held up
            fh.write('{"pid": 1, "trial": 2, "call": "other-next"}\n')
        monkeypatch.setattr(sweep_fakes, "calls", read)
        return read(path)

    def hangs(seconds):
        raise AssertionError(f"the second call logged hung ({seconds} s)")

    monkeypatch.setattr(sweep_fakes, "calls", the_other_worker_runs_ahead)
    monkeypatch.setattr(sweep_fakes.time, "sleep", hangs)
    config = SimpleNamespace(filters=[4], l2=1e-3, lr=0.1, threads=1, out="out", epochs=1)
    result = sweep_fakes.fake_fit(config, tags={"convtrain.sweep.trial": "1"})
    assert result.metrics["val_accuracy"] > 0 and len(calls(log)) == 3


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for a parent that will never reap it is stopped
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pythonpath() -> str:
    root = Path(__file__).parents[2]  # the repository: convtrain and tests.support
    return os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])


def test_retries_carry_optunas_retry_lineage(sweep_dir):
    """Optuna's RetryHeartbeatStaleTrialCallback helpers read our retries: the first trial of
    the series, and each trial of it; the report names the one just before."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    from optuna.trial import TrialState

    from convtrain.sweep import study as sweep_study

    path = write(sweep_dir, GRID)
    handle = create_or_join(load_sweep(path), open_storage(f"sqlite:///{sweep_dir / 'optuna.db'}"))
    first = sweep_study.take_ticket(handle, load_sweep(path))
    handle.study.tell(first, state=TrialState.FAIL)
    assert sweep_study.requeue(handle.study, handle.study.get_trials()[first.number], reason="killed")
    retry = handle.study.get_trials()[-1]
    again = handle.storage.get_trial_id_from_study_id_trial_number(handle.study_id, retry.number)
    handle.storage.set_trial_state_values(again, state=TrialState.RUNNING)
    handle.storage.set_trial_state_values(again, state=TrialState.FAIL)
    assert sweep_study.requeue(handle.study, handle.study.get_trials()[retry.number], reason="killed again")
    last = handle.study.get_trials()[-1]
    assert Retry.retried_trial_number(last) == first.number
    assert Retry.retry_history(last) == [first.number, retry.number]
    assert last.system_attrs["fixed_params"] == handle.study.get_trials()[first.number].system_attrs["fixed_params"]
    from convtrain.sweep.report import trial_rows
    (row,) = [r for r in trial_rows(handle.study, load_sweep(path)) if r.number == last.number]
    assert row.note == f"retry of trial {retry.number}"
