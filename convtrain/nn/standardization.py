"""The network's input scaling: per channel, (x - mean) / std.

Written once: the network applies it to raw images (Network.normalize), and the statistics
come from the training set (convtrain.data.Standardizer.fit).
"""

from __future__ import annotations

import numpy as np


def standardize(x: np.ndarray, mean, std, dtype) -> np.ndarray:
    """(x[c] - mean[c]) / std[c] for every channel c of x, (N, C, H, W) or one image (C, H, W),
    as a new array of `dtype` (x is cast first, so the arithmetic is in `dtype`)."""
    channel = (-1, 1, 1)  # broadcasts over (C, H, W) and (N, C, H, W) alike
    out = np.subtract(x, np.asarray(mean, dtype=dtype).reshape(channel), dtype=dtype)
    out /= np.asarray(std, dtype=dtype).reshape(channel)
    return out
