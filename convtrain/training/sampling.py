"""Which examples an epoch draws, in which order, and which rows the per-epoch training
evaluation looks at."""

from __future__ import annotations

import numpy as np


def steps_per_epoch(y, balanced: bool, batch_size: int) -> int:
    """Updates an epoch makes (the last batch may be short)."""
    return -(-epoch_size(y, balanced) // batch_size)


def epoch_size(y, balanced: bool) -> int:
    """Examples an epoch draws: all of them, or with balanced batches the rarest class's count
    from every class."""
    if not balanced:
        return len(y)
    counts = np.bincount(y)
    counts = counts[counts > 0]
    return int(counts.size * counts.min())


def epoch_order(y, rng: np.random.Generator, balanced: bool) -> np.ndarray:
    """The sample order of one epoch, drawn from the shuffling generator."""
    if balanced:
        from convtrain.data import class_balanced_indices
        return class_balanced_indices(y, rng)
    return rng.permutation(len(y))


def train_eval_rows(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """The fixed, seeded subset of `limit` training rows evaluated after each epoch (None: all n),
    recomputed from the seed so it needs no place in a checkpoint."""
    if limit is None or n <= limit:
        return None
    return np.sort(np.random.default_rng([seed, 2]).choice(n, limit, replace=False))
