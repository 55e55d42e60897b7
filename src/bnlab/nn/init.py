"""Weight initializers. Each fills a Parameter in place from a NumPy Generator.

fan_in of a weight (out, in, *k) is ``in * prod(k)``; fan_out is ``out * prod(k)``.
``rng=None`` uses bnlab's global generator, seeded with :func:`manual_seed`.
"""

from __future__ import annotations

import math

import numpy as np

_global_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator that layers use when no ``rng`` is given."""
    global _global_rng
    _global_rng = np.random.default_rng(seed)


def _rng(rng):
    return _global_rng if rng is None else rng


def fans(shape) -> tuple[int, int]:
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def normal_(param, std: float, mean: float = 0.0, rng=None):
    """W ~ N(mean, std^2): the paper's "small Gaussian"."""
    param.data[...] = _rng(rng).normal(mean, std, size=param.shape)
    return param


def uniform_(param, bound: float, rng=None):
    """W ~ U(-bound, bound)."""
    param.data[...] = _rng(rng).uniform(-bound, bound, size=param.shape)
    return param


def zeros_(param):
    param.data[...] = 0
    return param


def he_normal_(param, rng=None):
    """He (Kaiming) normal for ReLU: W ~ N(0, 2 / fan_in)."""
    return normal_(param, math.sqrt(2.0 / fans(param.shape)[0]), rng=rng)


def xavier_normal_(param, rng=None):
    """Xavier (Glorot) normal: W ~ N(0, 2 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(param.shape)
    return normal_(param, math.sqrt(2.0 / (fan_in + fan_out)), rng=rng)


def xavier_uniform_(param, rng=None):
    """Xavier (Glorot) uniform: W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(param.shape)
    return uniform_(param, math.sqrt(6.0 / (fan_in + fan_out)), rng=rng)


def default_(weight, bias, rng=None):
    """PyTorch's default for Linear and Conv2d: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fans(weight.shape)[0])
    uniform_(weight, bound, rng)
    if bias is not None:
        uniform_(bias, bound, rng)
