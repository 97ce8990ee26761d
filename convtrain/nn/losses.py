"""Softmax and softmax cross-entropy, numerically stable through log-sum-exp."""

from __future__ import annotations

import numpy as np


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise probabilities for scores (N, K); shifting by the row max avoids overflow."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def softmax_cross_entropy(scores: np.ndarray, y: np.ndarray,
                          label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of scores (N, K) against labels y (N,) and its gradient dscores (N, K).

    loss = mean_i( logsumexp(s_i) - s_i[y_i] ),  dscores = (softmax(s) - onehot(y)) / N

    With label smoothing e the target is q = (1 - e) * onehot(y) + e / K, as in PyTorch's
    CrossEntropyLoss(label_smoothing=e): loss = mean_i( logsumexp(s_i) - sum_k q_ik s_ik ),
    dscores = (softmax(s) - q) / N.
    """
    n, k = scores.shape
    rows = np.arange(n)
    shifted = scores - scores.max(axis=1, keepdims=True)
    dscores = np.exp(shifted)
    sum_exp = dscores.sum(axis=1, keepdims=True)
    target = float(shifted[rows, y].sum(dtype=np.float64))
    if label_smoothing:
        e = float(label_smoothing)
        target = (1 - e) * target + (e / k) * float(shifted.sum(dtype=np.float64))
    loss = (float(np.log(sum_exp).sum(dtype=np.float64)) - target) / n
    dscores *= (1.0 / n) / sum_exp
    if label_smoothing:
        dscores -= e / (k * n)
        dscores[rows, y] -= (1 - e) / n
    else:
        dscores[rows, y] -= 1.0 / n
    return loss, dscores


def mixed_cross_entropy(scores: np.ndarray, y: np.ndarray, partner_y: np.ndarray, lam: float,
                        label_smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """The cross-entropy of a mixup batch: against the soft targets lam * q(y) + (1 - lam) *
    q(partner_y), with q the (label-smoothed) target of softmax_cross_entropy; (loss, dscores).

    The loss is linear in the target, so it is lam * L(y) + (1 - lam) * L(partner_y), and the
    two differ only in the labels' scores:
        loss    = L(y) + (1 - lam) (1 - e) / N * sum_i( s_i[y_i] - s_i[partner_i] )
        dscores = dL(y) + (1 - lam) (1 - e) / N * (onehot(y) - onehot(partner))
    """
    loss, dscores = softmax_cross_entropy(scores, y, label_smoothing)
    n = scores.shape[0]
    rows = np.arange(n)
    weight = (1.0 - float(lam)) * (1.0 - float(label_smoothing)) / n
    gap = scores[rows, y].astype(np.float64) - scores[rows, partner_y]
    loss += weight * float(gap.sum(dtype=np.float64))
    np.add.at(dscores, (rows, y), weight)
    np.add.at(dscores, (rows, partner_y), -weight)
    return loss, dscores


def cross_entropy_sum(scores: np.ndarray, y: np.ndarray) -> float:
    """The summed loss alone, for evaluating a data set batch by batch (no gradient kept)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_sum_exp = np.log(np.exp(shifted).sum(axis=1))
    return float((log_sum_exp - shifted[np.arange(scores.shape[0]), y]).sum(dtype=np.float64))
