"""Progress output: live bars on a terminal, plain lines elsewhere, the table at the end."""

import io
import re

from rich.console import Console

from convtrain.training.progress import ProgressCallback, epoch_summary, history_table, seconds_text

LOGS = {"train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75,
        "val_balanced_accuracy": 0.74, "learning_rate": 0.05, "epoch_seconds": 1.25, "images_per_second": 1234.0}


class History:
    def __init__(self, epochs):
        self.epochs = epochs
        self.best_epoch = 2


def drive(callback, epochs=2, steps=3):
    callback.on_fit_start(None)
    for epoch in range(1, epochs + 1):
        callback.on_epoch_start(None, epoch)
        for step in range(steps):
            callback.on_batch_end(None, step + 1, {"loss": 0.5, "accuracy": 0.75, "batch_size": 10})
        callback.on_epoch_end(None, epoch, LOGS)
    callback.on_fit_end(None, History([{"epoch": e, **LOGS} for e in range(1, epochs + 1)]))


def console(terminal: bool):
    return Console(file=io.StringIO(), force_terminal=terminal, width=120, highlight=False)


def test_epoch_summary_line():
    line = epoch_summary(3, 12, LOGS)
    assert line == ("epoch  3/12  train loss 0.5000 acc 0.8000 | val loss 0.6000 acc 0.7500 bal 0.7400"
                    " | lr 0.05 | 1.2s 1,234 img/s")
    assert epoch_summary(1, 1, {"train_loss": 0.1}) == "epoch 1/1  train loss 0.1000"


def test_non_terminal_gets_plain_lines_and_the_table():
    out = console(terminal=False)
    drive(ProgressCallback(epochs=2, steps_per_epoch=3, console=out))
    text = out.file.getvalue()
    assert "\x1b[" not in text and "\r" not in text
    assert len(re.findall(r"^epoch \d/2 ", text, flags=re.M)) == 2
    assert "training history" in text and "best epoch (2)" in text


def test_quiet_keeps_only_the_table():
    out = console(terminal=False)
    drive(ProgressCallback(epochs=2, steps_per_epoch=3, console=out, quiet=True))
    text = out.file.getvalue()
    assert not re.findall(r"^epoch \d/2 ", text, flags=re.M) and "training history" in text


def test_terminal_gets_a_live_bar_that_is_stopped_on_errors():
    out = console(terminal=True)
    callback = ProgressCallback(epochs=2, steps_per_epoch=3, console=out)
    drive(callback)
    assert "epoch 2/2" in out.file.getvalue()
    callback.on_fit_start(None)
    callback.on_epoch_start(None, 1)
    callback.on_exception(None, KeyboardInterrupt())
    assert callback._progress is None  # the terminal is handed back


def test_long_histories_are_shortened_in_the_table():
    table = history_table([{"epoch": e, **LOGS} for e in range(1, 101)], best_epoch=98, max_rows=10)
    assert table.row_count == 11  # 5 first, an ellipsis row, 5 last


def shown_epochs(table) -> list[str]:
    return list(table.columns[0]._cells)


def test_a_shortened_table_keeps_the_best_epochs_row():
    # seen: a 488-epoch names fit whose best epoch (338) was elided, with "* best epoch (338)" below
    table = history_table([{"epoch": e, **LOGS} for e in range(1, 489)], best_epoch=338, max_rows=30)
    epochs = shown_epochs(table)
    assert "338*" in epochs
    assert epochs[:2] == ["1", "2"] and epochs[-1] == "488"
    position = epochs.index("338*")
    assert epochs[position - 1] == epochs[position + 1] == "…"
    assert len(epochs) <= 30 + 2
    # the best epoch next to the kept rows needs no ellipsis on that side
    near = shown_epochs(history_table([{"epoch": e, **LOGS} for e in range(1, 101)], best_epoch=5, max_rows=10))
    assert "5*" in near and near.count("…") == 1


def test_the_bar_shows_no_numbers_before_the_first_batch_and_labels_the_batch_mean():
    out = console(terminal=True)
    callback = ProgressCallback(epochs=2, steps_per_epoch=3, console=out)
    callback.on_fit_start(None)
    callback.on_epoch_start(None, 1)
    task = callback._progress.tasks[0]
    assert task.fields["stats"] == ""  # not "loss 0.0000 acc 0.000"
    callback.on_batch_end(None, 1, {"loss": 0.5, "accuracy": 0.75, "batch_size": 10})
    callback.on_batch_end(None, 2, {"loss": 0.25, "accuracy": 0.25, "batch_size": 10})
    stats = callback._progress.tasks[0].fields["stats"]
    assert stats.startswith("batch avg loss 0.3750 acc 0.500 ") and stats.endswith(" img/s")
    callback.on_exception(None, KeyboardInterrupt())


class Resumed:
    epochs, steps_per_epoch, epoch, batches_done = 10, 7, 2, 0
    resumed_from = "runs/mnist/checkpoint.npz"

    def __init__(self, run_name=None, batches_done=0):
        self.batches_done = batches_done

        class Tracker:
            pass

        tracker = Tracker()
        tracker.run_name = run_name
        self.callbacks = [tracker]


def test_a_resumed_fit_says_so_first():
    out = console(terminal=False)
    drive_resumed = ProgressCallback(console=out)
    drive_resumed.on_fit_start(Resumed("mnist-run"))
    assert out.file.getvalue().splitlines()[0] == "resuming run mnist-run at epoch 3/10 from runs/mnist/checkpoint.npz"
    out = console(terminal=False)
    ProgressCallback(console=out).on_fit_start(Resumed(batches_done=4))
    assert out.file.getvalue().startswith("resuming the fit at epoch 3/10, batch 5/7 from runs/mnist/")
    out = console(terminal=False)
    ProgressCallback(console=out, quiet=True).on_fit_start(Resumed("x"))
    ProgressCallback(console=out).on_fit_start(None)  # a fresh fit
    assert out.file.getvalue() == ""


def test_sub_second_epochs_show_their_time_not_zero():
    assert [seconds_text(s) for s in (0.043, 0.5, 1.25, 12.0)] == ["0.04", "0.50", "1.2", "12.0"]
    assert "| 0.04s" in epoch_summary(1, 3, {"train_loss": 0.5, "epoch_seconds": 0.043})


def test_an_epoch_resumed_mid_way_starts_its_bar_at_the_batches_done():
    class Trainer:
        epochs, steps_per_epoch, batches_done = 3, 5, 2

    callback = ProgressCallback(console=console(terminal=True))
    callback.on_fit_start(Trainer())
    callback.on_epoch_start(Trainer(), 2)
    task = callback._progress.tasks[0]
    assert (task.completed, task.total, callback.epochs) == (2, 5, 3)
    callback.on_exception(Trainer(), KeyboardInterrupt())


def test_bar_only_leaves_nothing_but_the_transient_bar():
    for terminal in (True, False):
        out = console(terminal=terminal)
        drive(ProgressCallback(epochs=2, steps_per_epoch=3, console=out, bar_only=True, label="trial 4 "))
        text = out.file.getvalue()
        assert "train loss" not in text and "training history" not in text
        assert ("trial 4 epoch" in text) == terminal  # drawn on a terminal only
