"""PNG figures for a fit: learning curves, confusion matrix, first-layer filters.

matplotlib is imported inside each function, so that importing convtrain stays fast, and
only its object API is used: a `Figure` on an Agg canvas (`FigureCanvasAgg`), never pyplot.
That works on machines without a display, leaves the process's backend alone, keeps no global
figure registry (so a figure can be drawn in a thread while the model is logged), and skips
pyplot's import and backend resolution, about a third of the plots' time in a fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _figure(figsize: tuple[float, float]):
    """A new figure on its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, *, laid_out: bool = False) -> Path:
    """Write the PNG. A figure `laid_out` by tight_layout is saved as it is: cropping to its
    tight bounding box would lay out every text a second time, a third of the figure's time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches=None if laid_out else "tight")
    return path


MARKERS_UP_TO = 50  # epochs; past this, per-point markers turn the lines into a smear


def learning_curves(epochs: Sequence[dict], path, *, batch_losses: Sequence[tuple[float, float]] = (),
                    best_epoch: int | None = None, monitor: str | None = None) -> Path:
    """Loss, cost and accuracy per epoch, train against val, as DD2424 plots them.

    `epochs` are the per-epoch log dicts (train_loss, val_loss, ...; 1-based "epoch" key
    optional). `batch_losses` are (fractional epoch, loss) pairs drawn faintly behind the
    train loss so the within-epoch noise is visible. `best_epoch` (the saved model's) is
    marked in every panel. When `monitor` is a balanced accuracy (the names data set, whose
    classes are very unequal), the accuracy panel shows balanced accuracy, with plain
    accuracy thin and dotted behind it.
    """
    x = [row.get("epoch", i + 1) for i, row in enumerate(epochs)]
    balanced = bool(monitor and "balanced_accuracy" in monitor)
    accuracy = ("balanced_accuracy", "balanced accuracy") if balanced else ("accuracy", "accuracy")
    panels = [("loss", "loss"), ("cost", "cost (loss + L2)"), accuracy]
    panels = [(key, title) for key, title in panels
              if any(row.get(f"train_{key}") is not None or row.get(f"val_{key}") is not None for row in epochs)]
    markers = len(x) <= MARKERS_UP_TO
    fig = _figure((4.2 * max(len(panels), 1), 3.4))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        if key == "loss" and len(batch_losses):
            bx, by = zip(*batch_losses)
            ax.plot(bx, by, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (batches)")
        if key == "balanced_accuracy":
            for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
                values = [row.get(f"{split}_accuracy") for row in epochs]
                if any(v is not None for v in values):
                    ax.plot(x, [np.nan if v is None else v for v in values], ":", color=color, linewidth=0.8,
                            alpha=0.7, label=f"{split} (plain accuracy)")
        for split, marker, color in (("train", "o", "tab:blue"), ("val", "s", "tab:orange")):
            values = [row.get(f"{split}_{key}") for row in epochs]
            if any(v is not None for v in values):
                ax.plot(x, [np.nan if v is None else v for v in values], "-", color=color,
                        marker=marker if markers else None, markersize=3, linewidth=1.2 if markers else 1.0,
                        label=split)
        if best_epoch is not None and x:
            ax.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1.0, label=f"best epoch ({best_epoch})")
            row = next((r for r in epochs if r.get("epoch") == best_epoch), None)
            value = row.get(f"val_{key}") if row else None
            if value is not None:
                ax.plot([best_epoch], [value], "*", color="tab:green", markersize=10)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, laid_out=True)


def confusion_matrix(counts: np.ndarray, class_names: Sequence[str], path, *, title: str = "confusion matrix") -> Path:
    """Rows are true classes, columns predicted; cells coloured by row-normalised rate."""
    counts = np.asarray(counts)
    n = counts.shape[0]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * n + 2.0), 14.0)
    fig = _figure((size, size * 0.9))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    names = [str(c) for c in class_names] if len(class_names) == n else [str(i) for i in range(n)]
    if n > 10:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    elif max(len(name) for name in names) > 3:  # CIFAR's "automobile": slanted, ending under its column
        ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    else:
        ax.set_xticks(range(n), names, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:  # beyond that the numbers become unreadable clutter
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _save(fig, path, laid_out=True)


def filter_tiles(weights: np.ndarray, max_channels: int = 8) -> list[np.ndarray]:
    """One image per filter of a (F, C, kh, kw) weight tensor, scaled to [0, 1].

    Three channels become an RGB tile; otherwise the channels sit side by side (at most
    `max_channels`), so a one-hot text filter or a grey-scale filter reads as it is.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 4:
        raise ValueError(f"filter weights: expected shape (F, C, kh, kw), got {weights.shape}")
    tiles = []
    for w in weights:
        lo, hi = w.min(), w.max()
        scaled = (w - lo) / (hi - lo) if hi > lo else np.full_like(w, 0.5)
        if scaled.shape[0] == 3:
            tiles.append(np.transpose(scaled, (1, 2, 0)))
        else:
            channels = scaled[:max_channels]
            gap = np.full((channels.shape[1], 1), np.nan)
            row = [channels[0]]
            for c in channels[1:]:
                row += [gap, c]
            tiles.append(np.hstack(row))
    return tiles


def filter_montage(weights: np.ndarray, path, *, title: str = "first-layer filters") -> Path:
    """A grid of the first conv layer's filters, each numbered above it.

    The grid is one image on one axes: an axes per filter (32 or 64 of them) made this figure
    take half a second, more than the other two together."""
    from matplotlib import colormaps

    tiles = filter_tiles(weights)
    n = len(tiles)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    height, width = tiles[0].shape[:2]
    gap_x = max(1, round(0.15 * width))
    gap_y = max(1, round(0.35 * height))  # the room above each tile for its number
    cell_x, cell_y = width + gap_x, height + gap_y
    canvas = np.ones((rows * cell_y, cols * cell_x - gap_x, 4))  # white, opaque
    grey = colormaps["gray"]
    for index, tile in enumerate(tiles):
        y, x = (index // cols) * cell_y + gap_y, (index % cols) * cell_x
        if tile.ndim == 3:
            canvas[y:y + height, x:x + width, :3] = tile
        else:  # the NaN columns between a filter's channels stay white
            shown = ~np.isnan(tile)
            canvas[y:y + height, x:x + width][shown] = grey(tile[shown])
    aspect = width / height
    fig = _figure((min(1.1 * cols * max(aspect, 0.6), 16), 1.1 * rows + 0.5))
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for index in range(n):
        ax.text((index % cols) * cell_x + (width - 1) / 2, (index // cols) * cell_y + gap_y - 0.6, str(index),
                fontsize=6, ha="center", va="bottom")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
