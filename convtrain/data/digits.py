"""scikit-learn's bundled 8x8 handwritten digits: the default data set, nothing to download."""

from __future__ import annotations

import numpy as np

from .base import RawData


def load_digits_data() -> RawData:
    """1797 images (N, 1, 8, 8), pixel values 0..16, classes 0..9; no test set."""
    # Imported here: scikit-learn takes about a second to import and only this loader needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]
    return RawData(x=x, y=bunch.target.astype(np.int64),
                   class_names=[str(name) for name in bunch.target_names],
                   source=f"sklearn.datasets.load_digits: {len(x)} images of 8x8")
