"""Training-time augmentation for images: random horizontal flips and small translations."""

from __future__ import annotations

import numpy as np


def augment_batch(x: np.ndarray, rng: np.random.Generator, flip: bool = True,
                  max_shift: int = 2) -> np.ndarray:
    """A new batch (N, C, H, W): each image flipped left-right with probability 1/2 and
    shifted by up to max_shift pixels in each direction, the uncovered border filled with 0.

    Meant for standardized batches, where 0 is the channel mean. Not for the names data, whose
    width axis is the position of a letter.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {x.shape}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    n, _, height, width = x.shape
    out = x.copy()
    if flip:
        flipped = rng.random(n) < 0.5
        out[flipped] = out[flipped][:, :, :, ::-1]
    if max_shift == 0:
        return out
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    shifted = np.zeros_like(out)
    for i, (dy, dx) in enumerate(shifts):
        # Image row r moves to r + dy; rows falling off the edge are dropped.
        dst_rows, src_rows = _overlap(dy, height)
        dst_cols, src_cols = _overlap(dx, width)
        shifted[i, :, dst_rows, dst_cols] = out[i, :, src_rows, src_cols]
    return shifted


def _overlap(shift: int, size: int) -> tuple[slice, slice]:
    """(destination, source) slices along one axis for a shift by `shift` pixels."""
    shift = max(-size, min(size, int(shift)))  # a shift past the edge leaves nothing
    if shift >= 0:
        return slice(shift, size), slice(0, size - shift)
    return slice(0, size + shift), slice(-shift, size)
