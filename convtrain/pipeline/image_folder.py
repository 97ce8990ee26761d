"""What a command hands the image-folder reader: the options from a config or a saved model, and
a progress bar (rich, on a terminal only) while the first read of a folder decodes it."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from convtrain.data.folder import FolderOptions


def options_from_config(config, progress=None) -> FolderOptions:
    """FolderOptions of a fit config (the defaults for the other data sets, which refuse any other)."""
    return FolderOptions.from_settings(config.image_size, config.channels, config.skip_bad_images,
                                       progress if config.data == "folder" else None)


def options_from_meta(meta: dict) -> FolderOptions:
    """The options a folder-trained model was trained with (network.meta), for evaluate."""
    size = meta.get("image_size")
    return FolderOptions(image_size=tuple(size) if size else None, channels=meta.get("channels"),
                         skip_bad=bool(meta.get("skip_bad_images", False)))


@contextmanager
def decode_progress(enabled: bool = True):
    """A progress callback (done, total) drawing a rich bar on stderr if it is a terminal; else None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("decode", total=total)
        bar.update(task, completed=done)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()
