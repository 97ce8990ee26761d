"""Training progress on the terminal: a bar per epoch, a line per epoch, a table at the end.

In an interactive terminal a rich progress bar runs over the batches of each epoch (the
mean loss and accuracy of the batches trained so far, labelled "batch avg" as they are measured
in training mode on changing weights, unlike the epoch line's train loss; and images/s) and is
replaced by a one-line epoch summary. A resumed fit says so first. Anywhere else (CI logs, pipes, files) only the plain summary lines are written:
no cursor movement, no colour codes, no carriage returns. Quiet mode keeps the final table.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from convtrain.training.callbacks import Callback


def epoch_summary(epoch: int, epochs: int, logs: dict) -> str:
    """One line such as `epoch  3/12  train loss 0.412 acc 0.873 | val loss ... | lr 0.05 | 2.1s`."""
    width = len(str(epochs))
    parts = [f"epoch {epoch:>{width}}/{epochs}"]
    for split in ("train", "val"):
        loss, acc = logs.get(f"{split}_loss"), logs.get(f"{split}_accuracy")
        if loss is not None:
            text = f"{split} loss {loss:.4f} acc {acc:.4f}" if acc is not None else f"{split} loss {loss:.4f}"
            if split == "val" and logs.get("val_balanced_accuracy") is not None:
                text += f" bal {logs['val_balanced_accuracy']:.4f}"
            parts.append(text)
    if logs.get("learning_rate") is not None:
        parts.append(f"lr {logs['learning_rate']:.3g}")
    timing = []
    if logs.get("epoch_seconds") is not None:
        timing.append(f"{seconds_text(logs['epoch_seconds'])}s")
    if logs.get("images_per_second") is not None:
        timing.append(f"{logs['images_per_second']:,.0f} img/s")
    if timing:
        parts.append(" ".join(timing))
    return "  ".join(parts[:1]) + "  " + " | ".join(parts[1:])


def running_stats(loss: float, accuracy: float, images_per_second: float) -> str:
    """The bar's text: the mean over the epoch's batches so far (training mode, changing weights)."""
    return f"batch avg loss {loss:.4f} acc {accuracy:.3f}  {images_per_second:,.0f} img/s"


def seconds_text(seconds: float) -> str:
    """1.2 for most epochs; 0.04 for the sub-second ones of small data sets (not 0.0)."""
    return f"{seconds:.2f}" if seconds < 0.95 else f"{seconds:.1f}"


def history_table(epochs: list[dict], *, best_epoch: int | None = None, max_rows: int = 30) -> Table:
    """The per-epoch history as a rich table; long histories keep their first and last rows
    and the best epoch's."""
    table = Table(title="training history", title_justify="left", show_edge=False, pad_edge=False)
    columns = [("epoch", None), ("train loss", "train_loss"), ("train acc", "train_accuracy"),
               ("val loss", "val_loss"), ("val acc", "val_accuracy"),
               ("val bal acc", "val_balanced_accuracy"), ("lr", "learning_rate"), ("s", "epoch_seconds")]
    present = [(title, key) for title, key in columns
               if key is None or any(row.get(key) is not None for row in epochs)]
    for title, _ in present:
        table.add_column(title, justify="right")
    rows = _shown_rows(list(enumerate(epochs, start=1)), best_epoch, max_rows)
    for item in rows:
        if item is None:
            table.add_row(*["…"] * len(present))
            continue
        number, row = item
        number = row.get("epoch", number)
        cells = []
        for title, key in present:
            if key is None:
                cells.append(f"{number}*" if number == best_epoch else str(number))
            else:
                value = row.get(key)
                cells.append("" if value is None else (f"{value:.3g}" if key == "learning_rate" else
                                                       seconds_text(value) if key == "epoch_seconds" else f"{value:.4f}"))
        table.add_row(*cells)
    if best_epoch is not None:
        table.caption = f"* best epoch ({best_epoch})"
        table.caption_justify = "left"
    return table


def _shown_rows(rows: list, best_epoch: int | None, max_rows: int) -> list:
    """At most about max_rows rows: the first and the last ones, and the best epoch's row
    wherever it is (None marks an elision)."""
    if len(rows) <= max_rows:
        return rows
    half = max_rows // 2
    best = next((i for i, (number, row) in enumerate(rows) if row.get("epoch", number) == best_epoch), None)
    if best is None or best < half or best >= len(rows) - half:
        return rows[:half] + [None] + rows[-half:]
    head = max(1, (max_rows - 1) // 2)
    tail = max(1, max_rows - 1 - head)
    middle = [rows[best]]
    before = [None] if best > head else []
    after = [None] if best < len(rows) - tail - 1 else []
    return rows[:head] + before + middle + after + rows[-tail:]


def resume_notice(trainer) -> str | None:
    """`resuming run <name> at epoch 3/10 from <checkpoint>`, for a trainer restored from a
    checkpoint; None for a fresh one."""
    source = getattr(trainer, "resumed_from", None)
    if source is None:
        return None
    name = next((c.run_name for c in getattr(trainer, "callbacks", ()) if getattr(c, "run_name", None)), None)
    where = f"epoch {trainer.epoch + 1}/{trainer.epochs}"
    if getattr(trainer, "batches_done", 0):
        where += f", batch {trainer.batches_done + 1}/{trainer.steps_per_epoch}"
    return f"resuming {f'run {name}' if name else 'the fit'} at {where} from {source}"


class ProgressCallback(Callback):
    """Shows a fit's progress; `quiet` keeps only the final table. `bar_only` shows nothing but
    the transient bar on a terminal (a sweep trial, whose worker prints one line per trial)."""

    key = "progress"

    def __init__(self, *, epochs: int | None = None, steps_per_epoch: int | None = None,
                 console: Console | None = None, quiet: bool = False, bar_only: bool = False,
                 label: str = ""):
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.console = console or Console(highlight=False)
        self.quiet = quiet
        self.bar_only = bar_only
        self.label = label  # before the bar's "epoch 3/10", e.g. "trial 4 "
        self.live = self.console.is_terminal and not quiet
        self._progress = None
        self._task = None
        self._reset_epoch()

    def _reset_epoch(self):
        self._started = time.perf_counter()
        self._seen = 0
        self._loss_sum = 0.0
        self._correct = 0.0

    # ---- callback hooks -------------------------------------------------------------

    def on_fit_start(self, trainer):
        # the trainer knows the real lengths (a cyclic schedule sets the epochs from its cycles,
        # a balanced epoch is as long as the smallest class allows)
        self.epochs = getattr(trainer, "epochs", None) or self.epochs
        self.steps_per_epoch = getattr(trainer, "steps_per_epoch", None) or self.steps_per_epoch
        notice = None if self.quiet or self.bar_only else resume_notice(trainer)
        if notice:
            self.console.print(notice, soft_wrap=True, highlight=False, markup=False)
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                # empty until the first batch ends: no "loss 0.0000" that was never measured
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                console=self.console, transient=True,
            )
            self._progress.start()

    def on_epoch_start(self, trainer, epoch):
        self._reset_epoch()
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            width = len(str(self.epochs))
            # an epoch resumed mid-way starts with the batches done before the interruption
            self._task = self._progress.add_task(f"{self.label}epoch {epoch:>{width}}/{self.epochs}",
                                                 total=self.steps_per_epoch,
                                                 completed=getattr(trainer, "batches_done", 0),
                                                 stats="")

    def on_batch_end(self, trainer, step, logs):
        n = logs.get("batch_size", 1)
        self._seen += n
        self._loss_sum += logs.get("loss", 0.0) * n
        self._correct += logs.get("accuracy", 0.0) * n
        if self._progress is not None and self._task is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(self._task, advance=1, stats=running_stats(
                self._loss_sum / self._seen, self._correct / self._seen, self._seen / elapsed))

    def on_epoch_end(self, trainer, epoch, logs):
        if self.quiet or self.bar_only:
            return
        line = epoch_summary(epoch, self.epochs, logs)
        if self._progress is not None:
            self._progress.console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)

    def on_fit_end(self, trainer, history):
        self._stop()
        epochs = list(getattr(history, "epochs", []) or [])
        if epochs and not self.bar_only:
            self.console.print(history_table(epochs, best_epoch=getattr(history, "best_epoch", None)))

    def on_exception(self, trainer, exc):
        self._stop()

    def _stop(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
