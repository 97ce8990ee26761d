"""scikit-learn's bundled 8x8 handwritten digits: the default data set, nothing to download."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .base import RawData

N_PIXELS = 64


def load_digits_data() -> RawData:
    """1797 images (N, 1, 8, 8), pixel values 0..16, classes 0..9; no test set."""
    table = _read_bundled_csv()
    if table is None:  # a scikit-learn that keeps the file elsewhere: ask it
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target
    else:
        images, target = table[:, :N_PIXELS].reshape(-1, 8, 8), table[:, N_PIXELS]
    x = images.astype(np.float32)[:, None]
    return RawData(x=x, y=target.astype(np.int64), class_names=[str(k) for k in range(10)],
                   source=f"sklearn.datasets.load_digits: {len(x)} images of 8x8")


def _read_bundled_csv() -> np.ndarray | None:
    """The rows of scikit-learn's digits.csv.gz (64 pixels, then the label), read without
    importing scikit-learn, which takes a second, most of `convtrain fit`'s start-up."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)
            if table.ndim == 2 and table.shape[1] == N_PIXELS + 1:
                return table
    return None
