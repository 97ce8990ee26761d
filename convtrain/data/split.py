"""Stratified, seeded selection: the validation split and the --limit subsample."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from convtrain.errors import ConfigError


def allocate(class_counts: np.ndarray, total: int, caps: np.ndarray) -> np.ndarray:
    """Split `total` over classes in proportion to class_counts, at most caps[c] each.

    Largest remainder: floor the exact shares, then hand the leftover one by one to the
    classes with the largest fractional part (ties to the lower class index), so that the
    result is deterministic and sums exactly to `total`.
    """
    exact = total * class_counts / max(int(class_counts.sum()), 1)
    taken = np.minimum(np.floor(exact).astype(np.int64), caps)
    while (left := total - int(taken.sum())) > 0:
        eligible = np.flatnonzero(taken < caps)
        if eligible.size == 0:
            raise ValueError(f"cannot take {total} from classes capped at {int(caps.sum())}")
        shortfall = exact[eligible] - taken[eligible]
        ranked = eligible[np.argsort(-shortfall, kind="stable")]
        taken[ranked[:left]] += 1
    return taken


def stratified_choice(y: np.ndarray, count: int, rng: np.random.Generator,
                      *, keep_one_per_class: bool = False) -> np.ndarray:
    """Sorted indices of `count` rows of y, each class represented in proportion to its size.

    keep_one_per_class leaves at least one row of every class unchosen where possible, so that
    carving a validation set never removes a class from training.
    """
    classes, inverse, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    caps = class_counts.copy()
    if keep_one_per_class and count <= int((class_counts - 1).sum()):
        caps = class_counts - 1
    per_class = allocate(class_counts, count, caps)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate(([0], np.cumsum(class_counts)[:-1]))
    chosen = [rng.permutation(order[start:start + size])[:take]
              for start, size, take in zip(starts, class_counts, per_class)]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def validation_count(val_fraction: float | int, n: int, limit: int | None) -> int:
    """How many rows the validation set gets: a fraction in (0, 1), a whole count >= 1, or 0.

    With a limit, a fraction is taken of the rows actually used (limit training rows plus the
    validation rows), so that a quick --limit run does not validate on far more than it trains on.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, Real):
        raise ConfigError(f"val_fraction: got {val_fraction!r}, expected a fraction in [0, 1) or a whole count")
    value = float(val_fraction)
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise ConfigError(f"val_fraction: got {val_fraction!r}, expected a fraction in [0, 1) or a whole count")
    if value == 0:
        return 0
    if value < 1:
        used = n if limit is None else min(n, limit / (1 - value))
        count = max(1, round(value * used))
    else:
        count = int(value)
    if count >= n:
        raise ConfigError(f"val_fraction: {val_fraction!r} leaves no training data ({n} examples in all)")
    return count


def split_indices(y: np.ndarray, val_fraction: float | int, *, seed: int,
                  limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(train rows, validation rows or None), both stratified by y and fixed by seed."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: got {limit!r}, expected a positive count")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: got {seed!r}, expected a whole number >= 0")
    n = len(y)
    # Separate streams: for a given validation count, the limit changes which training rows
    # are kept but never which rows validate.
    val_rng, limit_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))

    n_val = validation_count(val_fraction, n, limit)
    val_idx = stratified_choice(y, n_val, val_rng, keep_one_per_class=True) if n_val else None
    train_idx = np.setdiff1d(np.arange(n), val_idx, assume_unique=True) if n_val else np.arange(n)
    if limit is not None and limit < len(train_idx):
        train_idx = train_idx[stratified_choice(y[train_idx], limit, limit_rng)]
    return train_idx, val_idx
