"""The three PNG figures of a fit: written, readable as PNG, robust to odd shapes."""

import numpy as np
import pytest

from convtrain.training import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_learning_curves_with_and_without_validation(tmp_path):
    epochs = [{"epoch": e, "train_loss": 1 / e, "train_cost": 1.1 / e, "train_accuracy": 0.5 + e / 10,
               "val_loss": 1.2 / e, "val_cost": 1.3 / e, "val_accuracy": 0.4 + e / 10} for e in (1, 2, 3)]
    batches = [(s / 10, 1.5 / (1 + s / 10)) for s in range(30)]
    assert _is_png(plots.learning_curves(epochs, tmp_path / "curves.png", batch_losses=batches))

    train_only = [{k: v for k, v in row.items() if not k.startswith("val_")} for row in epochs]
    assert _is_png(plots.learning_curves(train_only, tmp_path / "sub" / "train_only.png"))


def test_confusion_matrix_small_and_many_classes(tmp_path):
    counts = np.array([[5, 1], [0, 7]])
    assert _is_png(plots.confusion_matrix(counts, ["cat", "dog"], tmp_path / "cm2.png"))
    many = np.random.default_rng(0).integers(0, 20, size=(25, 25))
    assert _is_png(plots.confusion_matrix(many, [f"c{i}" for i in range(25)], tmp_path / "cm25.png"))


@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (6, 3, 5, 5), (4, 28, 5, 3), (1, 1, 1, 1)])
def test_filter_montage_for_grey_rgb_text_and_tiny_filters(tmp_path, shape):
    weights = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert _is_png(plots.filter_montage(weights, tmp_path / "filters.png"))


def test_filter_tiles_scale_each_filter_to_unit_range():
    weights = np.stack([np.full((1, 2, 2), 3.0), np.arange(4.0).reshape(1, 2, 2)])
    flat, ramp = plots.filter_tiles(weights)
    assert np.all(flat == 0.5)  # a constant filter has no range to show
    assert ramp.min() == 0.0 and ramp.max() == 1.0
    rgb = plots.filter_tiles(np.zeros((2, 3, 4, 5)))
    assert rgb[0].shape == (4, 5, 3)


def test_filter_tiles_refuse_a_non_conv_weight():
    with pytest.raises(ValueError, match=r"\(F, C, kh, kw\)"):
        plots.filter_tiles(np.zeros((3, 3)))


def _drawn_figure(monkeypatch, **kwargs):
    """The learning-curve figure as drawn (its axes), captured before it is saved and closed."""
    captured = {}
    real_save = plots._save

    def keep(fig, path, **kwargs):
        captured["axes"] = fig.axes
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    return captured


def _curves(n, balanced=False):
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5 + e / (3 * n), "val_loss": abs(e - n / 3) / n + 0.1,
               "val_accuracy": 0.4 + e / (3 * n)}
        if balanced:
            row.update(train_balanced_accuracy=0.3 + e / (3 * n), val_balanced_accuracy=0.2 + e / (4 * n))
        rows.append(row)
    return rows


@pytest.mark.parametrize("epochs, markers", [(12, True), (500, False)])
def test_learning_curves_mark_the_best_epoch_and_drop_point_markers_on_long_fits(tmp_path, monkeypatch, epochs, markers):
    captured = _drawn_figure(monkeypatch)
    best = epochs // 3
    assert _is_png(plots.learning_curves(_curves(epochs), tmp_path / "c.png", best_epoch=best, monitor="val_loss"))
    for ax in captured["axes"]:
        epoch_lines = [line for line in ax.get_lines() if line.get_label() in ("train", "val")]
        assert epoch_lines and all((line.get_marker() not in (None, "None", "")) == markers for line in epoch_lines)
        marked = [line for line in ax.get_lines() if line.get_label() == f"best epoch ({best})"]
        assert len(marked) == 1 and list(marked[0].get_xdata()) == [best, best]  # a vertical line at the best epoch


def test_learning_curves_show_balanced_accuracy_when_that_is_the_monitor(tmp_path, monkeypatch):
    captured = _drawn_figure(monkeypatch)
    rows = _curves(10, balanced=True)
    plots.learning_curves(rows, tmp_path / "names.png", best_epoch=4, monitor="val_balanced_accuracy")
    panel = next(ax for ax in captured["axes"] if "accuracy" in ax.get_title())
    assert panel.get_title() == "balanced accuracy"
    val = next(line for line in panel.get_lines() if line.get_label() == "val")
    assert list(val.get_ydata()) == [row["val_balanced_accuracy"] for row in rows]

    plots.learning_curves(rows, tmp_path / "digits.png", best_epoch=4, monitor="val_loss")
    panel = next(ax for ax in captured["axes"] if "accuracy" in ax.get_title())
    assert panel.get_title() == "accuracy"


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("names", [CIFAR_CLASSES, [str(i) for i in range(10)], [f"class {i}" for i in range(14)]])
def test_confusion_matrix_tick_labels_do_not_overlap(tmp_path, monkeypatch, names):
    """Horizontal labels whose boxes do not overlap, or slanted ones whose lines sit further
    apart than a line of text is high."""
    import math

    seen = []
    real_save = plots._save

    def save(fig, path, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labels = [label for label in fig.axes[0].get_xticklabels() if label.get_text()]
        seen.append([(label.get_rotation(), label.get_window_extent(renderer), label.get_fontsize() * fig.dpi / 72,
                      fig.axes[0].transData.transform((tick, 0))[0])
                     for tick, label in zip(fig.axes[0].get_xticks(), labels)])
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", save)
    counts = np.arange(len(names) ** 2).reshape(len(names), len(names))
    plots.confusion_matrix(counts, names, tmp_path / "cm.png")
    [labels] = seen
    assert len(labels) == len(names)
    for (angle, box, height, x), (_, next_box, _, next_x) in zip(labels, labels[1:]):
        if angle == 0:
            assert box.x1 <= next_box.x0, (box, next_box)
        else:
            assert (next_x - x) * math.sin(math.radians(angle)) > height
