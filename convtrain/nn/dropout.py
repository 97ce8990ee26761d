"""Inverted dropout, as torch.nn.Dropout: in train mode each value is kept with probability
1 - p and scaled by 1 / (1 - p), so eval mode is the identity.

The mask is drawn from a numpy Generator the caller owns (the Trainer, which checkpoints its
state): a resumed fit draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from convtrain.errors import ArchitectureError, ConfigError
from convtrain.nn.layers import Layer


class Dropout(Layer):
    def __init__(self, p: float, *, name: str = "dropout"):
        super().__init__(name)
        if not 0 <= p < 1:
            raise ArchitectureError(f"{name}: dropout probability {p!r} must be in [0, 1)")
        self.p = float(p)
        self.rng: np.random.Generator | None = None  # set by Network.set_dropout_generator
        self._mask = None

    def draw_mask(self, shape, dtype) -> np.ndarray:
        """keep / (1 - p) with keep ~ Bernoulli(1 - p): the factor each value is multiplied by."""
        if self.rng is None:
            raise ConfigError(f"{self.name}: dropout in train mode needs a random generator "
                              f"(Network.set_dropout_generator)")
        keep = self.rng.random(shape) >= self.p
        return keep.astype(dtype) * np.asarray(1.0 / (1.0 - self.p), dtype=dtype)

    def forward(self, x, train=False, mask: np.ndarray | None = None):
        """`mask` (the scale factors, as draw_mask gives them) replaces the draw: for tests."""
        if not train or self.p == 0:
            return x
        self._mask = self.draw_mask(x.shape, x.dtype) if mask is None else np.asarray(mask, dtype=x.dtype)
        return x * self._mask

    def backward(self, dout):
        if self._mask is None:  # p == 0: the identity
            return dout
        dx = dout * self._mask
        self._mask = None
        return dx

    def describe(self) -> dict:
        return {"type": "dropout", "name": self.name, "p": self.p}
