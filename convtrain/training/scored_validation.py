"""The validation predictions a fit made after its epochs, kept with the digest of the model that
made them, so the final evaluation of a data set without a test split need not score the same
model on the same images again."""

from __future__ import annotations

import hashlib

import numpy as np


class ScoredValidation:
    """{epoch: (model digest, predicted labels)} for the last epoch scored and the best before it:
    the final model is one of the two, unless a resume came between."""

    def __init__(self):
        self.kept: dict[int, tuple[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.kept)

    def keep(self, epoch: int, best_epoch: int | None, network, predictions: np.ndarray) -> None:
        """This epoch's predictions, and the best epoch's (History.best_epoch, not yet updated
        for this one); any older ones are dropped."""
        self.kept = {e: kept for e, kept in self.kept.items() if e == best_epoch}
        self.kept[epoch] = (model_digest(network), predictions)

    def predictions_for(self, network) -> np.ndarray | None:
        """The predicted labels made by a model bit for bit equal to `network` as it is now
        (weights and batch norm's statistics), else None."""
        if not self.kept:
            return None
        digest = model_digest(network)
        return next((p for d, p in self.kept.values() if d == digest), None)


def model_digest(network) -> str:
    """SHA-256 of everything an eval-mode forward pass reads from the network: each parameter's
    and buffer's name, dtype, shape and bytes. Equal digests: bit-identical models."""
    digest = hashlib.sha256()
    for group in (network.parameters(), network.buffers()):
        for key, value in sorted(group.items()):
            value = np.ascontiguousarray(value)
            digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()
