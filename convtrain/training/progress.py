"""Training progress on the terminal: a bar per epoch, a line per epoch, a table at the end.

In an interactive terminal a rich progress bar runs over the batches of each epoch
(loss, accuracy and images/s of the epoch so far) and is replaced by a one-line epoch
summary. Anywhere else (CI logs, pipes, files) only the plain summary lines are written:
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


def seconds_text(seconds: float) -> str:
    """1.2 for most epochs; 0.04 for the sub-second ones of small data sets (not 0.0)."""
    return f"{seconds:.2f}" if seconds < 0.95 else f"{seconds:.1f}"


def history_table(epochs: list[dict], *, best_epoch: int | None = None, max_rows: int = 30) -> Table:
    """The per-epoch history as a rich table; long histories keep their first and last rows."""
    table = Table(title="training history", title_justify="left", show_edge=False, pad_edge=False)
    columns = [("epoch", None), ("train loss", "train_loss"), ("train acc", "train_accuracy"),
               ("val loss", "val_loss"), ("val acc", "val_accuracy"),
               ("val bal acc", "val_balanced_accuracy"), ("lr", "learning_rate"), ("s", "epoch_seconds")]
    present = [(title, key) for title, key in columns
               if key is None or any(row.get(key) is not None for row in epochs)]
    for title, _ in present:
        table.add_column(title, justify="right")
    rows = list(enumerate(epochs, start=1))
    if len(rows) > max_rows:
        rows = rows[: max_rows // 2] + [None] + rows[-(max_rows // 2):]
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


class ProgressCallback(Callback):
    """Shows a fit's progress; `quiet` keeps only the final table."""

    key = "progress"

    def __init__(self, *, epochs: int | None = None, steps_per_epoch: int | None = None,
                 console: Console | None = None, quiet: bool = False):
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.console = console or Console(highlight=False)
        self.quiet = quiet
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
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f}"),
                TextColumn("{task.fields[speed]:,.0f} img/s"), TimeElapsedColumn(),
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
            self._task = self._progress.add_task(f"epoch {epoch:>{width}}/{self.epochs}",
                                                 total=self.steps_per_epoch,
                                                 completed=getattr(trainer, "batches_done", 0),
                                                 loss=0.0, acc=0.0, speed=0.0)

    def on_batch_end(self, trainer, step, logs):
        n = logs.get("batch_size", 1)
        self._seen += n
        self._loss_sum += logs.get("loss", 0.0) * n
        self._correct += logs.get("accuracy", 0.0) * n
        if self._progress is not None and self._task is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(self._task, advance=1, loss=self._loss_sum / self._seen,
                                  acc=self._correct / self._seen, speed=self._seen / elapsed)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.quiet:
            return
        line = epoch_summary(epoch, self.epochs, logs)
        if self._progress is not None:
            self._progress.console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)

    def on_fit_end(self, trainer, history):
        self._stop()
        epochs = list(getattr(history, "epochs", []) or [])
        if epochs:
            self.console.print(history_table(epochs, best_epoch=getattr(history, "best_epoch", None)))

    def on_exception(self, trainer, exc):
        self._stop()

    def _stop(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None
