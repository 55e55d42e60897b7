"""Losses."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from . import ops


class CrossEntropyLoss:
    """Softmax + negative log-likelihood, averaged over the batch (``torch.nn.CrossEntropyLoss``).

        loss = 1/N sum_n [ log sum_k exp(z_nk) - z_n,label_n ]

    ``loss(logits, labels)`` returns a float; ``loss.backward()`` returns dloss/dlogits.

    Shape: logits (N, K) float, labels (N,) integers in [0, K).
    """

    def __init__(self):
        self._cache = None

    def __call__(self, logits, labels) -> float:
        logits, labels = np.asarray(logits), np.asarray(labels)
        F.check_float(logits, "logits")
        if logits.ndim != 2:
            raise ValueError(f"expected 2D logits (N, K), got shape {logits.shape}")
        if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"expected integer labels of shape ({logits.shape[0]},), "
                f"got {labels.dtype} array of shape {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(
                f"labels must be in [0, {logits.shape[1]}), "
                f"got values in [{labels.min()}, {labels.max()}]"
            )
        loss, self._cache = ops.cross_entropy_forward(logits, labels)
        return float(loss)

    def backward(self):
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss")
        return ops.cross_entropy_backward(self._cache)
