"""The arrays a fit trains and validates on, checked against the network before the first update."""

from __future__ import annotations

import numpy as np

from convtrain.errors import DataError


def checked_inputs(network, x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    """x as a contiguous (N, C, H, W) array of the network's dtype and y as int64 labels in
    [0, classes); DataError naming `what` ("training", "validation") otherwise."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or x.shape[1:] != network.input_shape:
        raise DataError(f"{what} images have shape {x.shape}, expected (N, {', '.join(map(str, network.input_shape))})")
    if y.shape != (x.shape[0],):
        raise DataError(f"{what} labels have shape {y.shape}, expected ({x.shape[0]},) for {x.shape[0]} images")
    if x.shape[0] == 0:
        raise DataError(f"the {what} set is empty")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= network.num_classes:
        raise DataError(f"{what} labels must be integers in [0, {network.num_classes}), "
                        f"got {y.dtype} in [{y.min()}, {y.max()}]")
    return np.ascontiguousarray(x, dtype=network.dtype), y.astype(np.int64, copy=False)
