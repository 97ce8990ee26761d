"""Per-channel standardization statistics, from the training set only.

The formula itself, (x - mean) / std, is the network's (convtrain.nn.standardization): a
fitted Standardizer goes into `Network.normalization`, and `Network.normalize` applies it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from convtrain.errors import DataError

# Rows per chunk when accumulating statistics: bounds the float64 temporaries to a few MB
# even for full MNIST or CIFAR-10.
_CHUNK_ROWS = 2048
# A constant channel (e.g. a border that is always 0) has std 0; dividing by 1 leaves it centred.
_MIN_STD = 1e-8


class Standardizer:
    """The mean[c] and std[c] of each channel c, (C,) float64, for x -> (x - mean[c]) / std[c]."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise DataError(f"standardizer: mean {mean.shape} and std {std.shape} must be finite and of one length")
        if (std <= 0).any():
            raise DataError("standardizer: std must be positive in every channel")
        self.mean = mean
        self.std = std

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        """Channel statistics of training images x (N, C, H, W), accumulated in float64."""
        if x.ndim != 4 or x.shape[0] == 0:
            raise DataError(f"standardizer: expected training images (N, C, H, W) with N > 0, got shape {x.shape}")
        n_values = x.shape[0] * x.shape[2] * x.shape[3]
        total = np.zeros(x.shape[1])
        for start in range(0, x.shape[0], _CHUNK_ROWS):
            total += x[start:start + _CHUNK_ROWS].sum(axis=(0, 2, 3), dtype=np.float64)
        mean = total / n_values
        # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which
        # cancels badly when the mean is large against the spread (pixels around 200).
        squares = np.zeros(x.shape[1])
        for start in range(0, x.shape[0], _CHUNK_ROWS):
            deviation = x[start:start + _CHUNK_ROWS].astype(np.float64) - mean[:, None, None]
            squares += np.einsum("nchw,nchw->c", deviation, deviation)
        std = np.sqrt(squares / n_values)
        return cls(mean, np.where(std < _MIN_STD, 1.0, std))

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays, storable with np.savez (no pickling needed to read them back)."""
        return {"mean": self.mean.copy(), "std": self.std.copy()}

    @classmethod
    def from_dict(cls, values: Mapping[str, np.ndarray]) -> "Standardizer":
        try:
            return cls(values["mean"], values["std"])
        except KeyError as missing:
            raise DataError(f"standardizer: saved statistics lack {missing.args[0]!r}") from None

    def __repr__(self) -> str:
        return f"Standardizer(mean={np.round(self.mean, 4).tolist()}, std={np.round(self.std, 4).tolist()})"
