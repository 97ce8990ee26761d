"""The fit's figures drawn by worker processes: the same pixels as drawn in the fit, each share
drawn the moment it is handed out, a failed worker reported and its figures drawn in the fit
instead, a sweep's shared workers serving round after round, no worker left running."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convtrain.training import plot_worker
from convtrain.training.plot_worker import PlotWorkers
from tests.support.proc import children_of, running

EPOCHS = [{"epoch": e, "train_loss": 1 / e, "train_cost": 1.1 / e, "train_accuracy": 0.5 + e / 10,
           "val_loss": 1.2 / e, "val_cost": 1.3 / e, "val_accuracy": 0.4 + e / 10} for e in (1, 2, 3)]


def calls(folder):
    weights = np.random.default_rng(0).standard_normal((6, 1, 3, 3))
    return ([("learning_curves", (EPOCHS, folder / "curves.png"), {"best_epoch": 2, "monitor": "val_loss"}),
             ("filter_montage", (weights, folder / "filters.png"), {})],
            [("confusion_matrix", (np.array([[5, 1], [0, 7]]), ["cat", "dog"], folder / "cm.png"), {"title": "t"})])


def pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def draw(workers, folder):
    first, second = calls(folder)
    workers.draw(first)
    workers.draw(second)
    return workers.results()


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        children = children_of(todo.pop())
        found += children
        todo += children
    return found


@pytest.fixture
def new_descendants():
    """The processes under this one that the test started (multiprocessing's resource tracker,
    started by an earlier test, is not the workers')."""
    before = set(descendants(os.getpid()))
    return lambda: described(sorted(set(descendants(os.getpid())) - before))


def described(pids):
    def line(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            return "gone"
    return {pid: line(pid) for pid in pids}


def wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_workers_draw_the_same_figures_as_the_fit_itself_and_end(tmp_path, new_descendants):
    workers = PlotWorkers(2, fork_now=True)
    first = workers.processes[0].pid
    assert len(workers.processes) == 2 and first in children_of(os.getpid())
    # the first worker forks its sibling once it has imported matplotlib: no second import
    assert wait_for(lambda: len(children_of(first)) == 1)
    with workers:
        paths, problems = draw(workers, tmp_path / "workers")
    with PlotWorkers(0) as here_workers:
        here, here_problems = draw(here_workers, tmp_path / "here")
    assert problems == here_problems == []
    assert [p.name for p in paths] == [p.name for p in here] == ["curves.png", "filters.png", "cm.png"]
    for drawn, reference in zip(paths, here):
        assert np.array_equal(pixels(drawn), pixels(reference)), drawn.name
    assert new_descendants() == {}


def test_a_share_is_drawn_as_soon_as_it_is_handed_out(tmp_path):
    first, _ = calls(tmp_path)
    with PlotWorkers(1, fork_now=True) as workers:
        workers.draw(first)
        # nothing asked for yet: the fit is still evaluating and logging its model
        assert wait_for(lambda: (tmp_path / "filters.png").is_file())
        paths, problems = workers.results()
    assert problems == [] and [p.name for p in paths] == ["curves.png", "filters.png"]


def test_a_killed_worker_is_reported_and_its_figures_drawn_in_the_fit(tmp_path, new_descendants):
    with PlotWorkers(2, fork_now=True) as workers:
        first = workers.processes[0].pid
        assert wait_for(lambda: len(children_of(first)) == 1)
        os.kill(children_of(first)[0], signal.SIGKILL)  # the sibling, which draws the second share
        paths, problems = draw(workers, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert all(p.is_file() for p in paths)
    assert len(problems) == 1 and "plot worker failed" in problems[0], problems
    assert new_descendants() == {}


def test_a_figure_that_cannot_be_drawn_fails_the_fit_as_it_would_in_process(tmp_path):
    bad = [("confusion_matrix", (np.ones(3), ["a"], tmp_path / "cm.png"), {})]  # not a matrix
    with PlotWorkers(1, fork_now=True) as workers:
        workers.draw(bad)
        with pytest.raises(Exception):
            workers.results()
    assert not (tmp_path / "cm.png").exists()


def test_one_worker_draws_every_call_in_order(tmp_path):
    with PlotWorkers(1, fork_now=True) as workers:
        paths, problems = draw(workers, tmp_path)
    assert problems == []
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert all(p.is_file() for p in paths)


def test_unused_workers_end_with_the_fit_and_an_orphaned_worker_ends_by_itself(tmp_path, new_descendants):
    workers = PlotWorkers(2, fork_now=True)
    workers.close()
    assert new_descendants() == {}
    # a worker whose fit died (SIGKILL closes the fit's end of its pipe) exits without drawing
    workers = PlotWorkers(1, fork_now=True)
    worker = workers.processes[0]
    worker.done()
    _, status = os.waitpid(worker.pid, 0)
    worker.exit_status = os.waitstatus_to_exitcode(status)
    assert worker.exit_status == 0
    assert os.read(worker.answer_fd, 10) == b""
    workers.close()


def test_a_worker_that_never_answers_is_stopped_and_its_figures_drawn_in_the_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(plot_worker, "ANSWER_TIMEOUT", 0.5)
    with PlotWorkers(1, fork_now=True) as workers:
        worker = workers.processes[0]
        os.kill(worker.pid, signal.SIGSTOP)  # hung
        paths, problems = draw(workers, tmp_path)
        assert worker.exit_status == -signal.SIGKILL
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert len(problems) == 1 and "no answer" not in problems[0] and "killed by signal" in problems[0]


def test_shared_workers_draw_round_after_round_and_a_forgotten_round_leaves_nothing_behind(tmp_path, new_descendants):
    with plot_worker.shared_workers(2) as shared:
        assert wait_for(lambda: len(new_descendants()) == 2)
        pids = new_descendants()
        for trial in range(3):
            with plot_worker.for_fit() as workers:
                assert workers is shared
                paths, problems = draw(workers, tmp_path / str(trial))
            assert problems == [] and all(p.is_file() for p in paths)
            assert [p.parent.name for p in paths] == [str(trial)] * 3
        with plot_worker.for_fit() as workers:  # a trial that failed after handing out its figures
            workers.draw(calls(tmp_path / "failed")[0])
        with plot_worker.for_fit() as workers:
            paths, problems = draw(workers, tmp_path / "next")
        assert problems == [] and [p.parent.name for p in paths] == ["next"] * 3
        assert new_descendants() == pids  # the same workers throughout
    assert new_descendants() == {}
    with plot_worker.for_fit() as workers:  # outside the block, a fit has workers of its own
        assert workers is not shared


def test_every_worker_dies_with_its_fit(tmp_path):
    script = ("import time\n"
              "from convtrain.training.plot_worker import PlotWorkers\n"
              "workers = PlotWorkers(2, fork_now=True)\n"
              "print(workers.processes[0].pid, flush=True)\n"
              "time.sleep(60)\n")
    fit = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        first = int(fit.stdout.readline())
        assert wait_for(lambda: len(children_of(first)) == 1)
        workers = [first, *children_of(first)]
    finally:
        fit.kill()
        fit.wait()

    def all_gone():  # a killed worker may stay a zombie until init reaps it: not running
        return not any(running(pid) for pid in workers)

    assert wait_for(all_gone, 10), "a worker outlived its killed fit"


def test_with_matplotlib_imported_the_figures_are_drawn_in_the_process(tmp_path):
    from convtrain.training.plot_worker import preload

    preload()
    with PlotWorkers(1) as workers:
        assert workers.processes == []  # nothing forked: matplotlib has nothing left to hide
        paths, problems = draw(workers, tmp_path)
    assert problems == []
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert all(p.is_file() for p in paths)
