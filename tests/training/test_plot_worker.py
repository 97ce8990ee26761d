"""The fit's figures drawn by worker processes: the same pixels as drawn in the fit, a failed
worker reported and its figures drawn in the fit instead, no worker left running."""

import os
import signal

import numpy as np
import pytest

from convtrain.training.plot_worker import PlotWorkers
from tests.support.proc import children_of

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
    with workers:
        workers.draw(first)
        workers.draw(second)
        return workers.results()


def test_workers_draw_the_same_figures_as_the_fit_itself_and_end(tmp_path):
    workers = PlotWorkers(2, fork_now=True)
    pids = [p.pid for p in workers.processes]
    assert len(pids) == 2 and set(pids) <= set(children_of(os.getpid()))
    paths, problems = draw(workers, tmp_path / "workers")
    here, here_problems = draw(PlotWorkers(0), tmp_path / "here")
    assert problems == here_problems == []
    assert [p.name for p in paths] == [p.name for p in here] == ["curves.png", "filters.png", "cm.png"]
    for drawn, reference in zip(paths, here):
        assert np.array_equal(pixels(drawn), pixels(reference)), drawn.name
    assert not set(pids) & set(children_of(os.getpid()))


def test_a_killed_worker_is_reported_and_its_figures_drawn_in_the_fit(tmp_path):
    workers = PlotWorkers(2, fork_now=True)
    os.kill(workers.processes[1].pid, signal.SIGKILL)
    paths, problems = draw(workers, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert all(p.is_file() for p in paths)
    assert len(problems) == 1 and "plot worker failed" in problems[0], problems


def test_a_figure_that_cannot_be_drawn_fails_the_fit_as_it_would_in_process(tmp_path):
    bad = [("confusion_matrix", (np.ones(3), ["a"], tmp_path / "cm.png"), {})]  # not a matrix
    with PlotWorkers(1, fork_now=True) as workers:
        workers.draw(bad)
        with pytest.raises(Exception):
            workers.results()
    assert not (tmp_path / "cm.png").exists()


def test_one_worker_draws_every_call_in_order(tmp_path):
    paths, problems = draw(PlotWorkers(1, fork_now=True), tmp_path)
    assert problems == []
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert all(p.is_file() for p in paths)


def test_unused_workers_end_with_the_fit_and_an_orphaned_worker_ends_by_itself(tmp_path):
    workers = PlotWorkers(2, fork_now=True)
    pids = [p.pid for p in workers.processes]
    workers.close()
    assert not set(pids) & set(children_of(os.getpid()))
    # a worker whose fit died (SIGKILL closes the fit's end of its pipe) exits without drawing
    workers = PlotWorkers(1, fork_now=True)
    worker = workers.processes[0]
    os.close(worker.calls_fd)
    worker.calls_fd = -1
    _, status = os.waitpid(worker.pid, 0)
    worker.exit_status = os.waitstatus_to_exitcode(status)
    assert worker.exit_status == 0
    assert os.read(worker.answer_fd, 10) == b""
    workers.close()


def test_a_worker_that_never_answers_is_stopped_and_its_figures_drawn_in_the_fit(tmp_path):
    workers = PlotWorkers(1, fork_now=True)
    worker = workers.processes[0]
    os.kill(worker.pid, signal.SIGSTOP)  # hung
    first, second = calls(tmp_path)
    workers.draw(first + second)
    worker.done()
    assert worker.answer(timeout=0.5) is None
    assert worker.exit_status == -signal.SIGKILL
    workers.close()


def test_a_worker_dies_with_its_fit(tmp_path):
    import subprocess
    import sys
    import time

    script = ("import sys, time\n"
              "from convtrain.training.plot_worker import PlotWorkers\n"
              "workers = PlotWorkers(1, fork_now=True)\n"
              "print(workers.processes[0].pid, flush=True)\n"
              "time.sleep(60)\n")
    fit = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(fit.stdout.readline())
    fit.kill()
    fit.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the worker outlived its killed fit")


def test_with_matplotlib_imported_the_figures_are_drawn_in_the_process(tmp_path):
    from convtrain.training.plot_worker import preload

    preload()
    workers = PlotWorkers(1)
    assert workers.processes == []  # nothing forked: a sweep worker draws its own figures
    paths, problems = draw(workers, tmp_path)
    assert workers.processes == [] and problems == []
    assert [p.name for p in paths] == ["curves.png", "filters.png", "cm.png"]
    assert all(p.is_file() for p in paths)
