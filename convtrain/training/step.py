"""One update on one batch: forward -> softmax cross-entropy (optionally label-smoothed) ->
backward -> + 2*l2*W -> (clip the gradients to a global norm) -> the optimizer's step."""

from __future__ import annotations

import math

import numpy as np

from convtrain.nn.losses import mixed_cross_entropy, softmax_cross_entropy
from convtrain.nn.optim import clip_grad_norm_


def train_step(network, optimizer, xb, yb, lr: float, *, l2: float, label_smoothing: float = 0.0,
               clip_norm: float | None = None, mixed: tuple[np.ndarray, float] | None = None,
               tally=None) -> tuple[float | None, float, float]:
    """(loss, cost, accuracy) of the batch before the update. A non-finite loss leaves the
    weights untouched and returns (None, loss, nan). `mixed` = (partner labels, lam) for a
    mixup batch: the loss is against lam * yb + (1 - lam) * partner labels (accuracy against yb).
    `tally` (a metrics.RunningMetrics) gets the batch's scores, so the epoch's training metrics
    need no second forward pass (plain cross-entropy against yb, whatever the training loss)."""
    # Overflow on the way to a non-finite loss is reported as divergence (by the caller, or
    # at the next batch), not as numpy RuntimeWarnings around that one-line error.
    with np.errstate(over="ignore", invalid="ignore"):
        scores = network.forward(xb, train=True)
        if mixed is None:
            loss, dscores = softmax_cross_entropy(scores, yb, label_smoothing)
        else:
            loss, dscores = mixed_cross_entropy(scores, yb, mixed[0], mixed[1], label_smoothing)
        if not math.isfinite(loss):
            return None, loss, float("nan")
        network.backward(dscores)
        network.add_l2_gradients(l2)
        penalty = l2 * network.l2_penalty() if l2 else 0.0
        cost = loss + penalty if l2 else loss
        grads = network.gradients()
        if clip_norm:
            clip_grad_norm_(grads, clip_norm)  # the cost's gradient, L2 term included
        optimizer.step(grads, lr)
        if tally is not None:
            tally.add(scores, yb, None if label_smoothing or mixed is not None else loss, penalty)
    accuracy = float(np.count_nonzero(scores.argmax(axis=1) == yb)) / len(yb)
    return loss, cost, accuracy
