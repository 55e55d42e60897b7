"""TensorFlow's API: ``tf.nn.moments`` and ``tf.nn.batch_normalization`` in NumPy (conventions:
:mod:`bnlab.functional`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from ._common import (
    _cast,
    _check_number,
    _compute_dtype,
    _count,
    _moments_keepdims,
    _normalize_axes,
    check_float,
)


def moments(
    x: ArrayLike, axes: int | Sequence[int], shift: object = None, keepdims: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance of ``x`` over ``axes``, as ``tf.nn.moments``.

        mean     = 1/m * sum(x)
        variance = 1/m * sum((x - mean)^2)      (two passes: no E[x^2] - E[x]^2)

    Both sums are accumulated in float64 (see the module docstring), so the result is the
    float64 statistic rounded once to ``x``'s dtype.

    Args:
        x: floating-point array.
        axes: int or sequence of ints, the axes to reduce. ``axes=[0]`` on (N, C) gives
            per-feature statistics of shape (C,); ``[0, 1, 2]`` on NHWC gives per-channel ones.
        shift: accepted for signature compatibility and unused, as in TensorFlow 2.
        keepdims: keep the reduced axes with length 1 (for broadcasting back onto ``x``).

    Returns:
        ``(mean, variance)`` in ``x``'s dtype (float16 in, float16 out, as TensorFlow; a
        variance beyond float16's range, 65504, is then inf, as there).

    Raises:
        ValueError: ``axes`` cover no values while other axes do (statistics of nothing).

    Example:
        >>> mean, var = moments(np.array([[1.0, 2.0], [3.0, 6.0]]), axes=[0])
        >>> mean, var
        (array([2., 4.]), array([1., 4.]))
    """
    del shift  # unused, as in tf.nn.moments
    x = np.asarray(x)
    check_float(x)
    axes = _normalize_axes(axes, x.ndim)
    kept = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    if _count(x.shape, axes) == 0 and math.prod(kept) > 0:
        raise ValueError(
            f"moments over no values: axes {list(axes)} of x with shape {x.shape} are empty"
        )
    if x.size == 0:  # then there are no statistics to compute either: kept has a 0
        mean = variance = np.zeros(kept, x.dtype)
    else:
        mean, variance = _moments_keepdims(x, axes)
    if not keepdims:
        mean, variance = mean.squeeze(axis=axes), variance.squeeze(axis=axes)
    return _cast(mean, x.dtype), _cast(variance, x.dtype)


def batch_normalization(
    x: ArrayLike,
    mean: ArrayLike,
    variance: ArrayLike,
    offset: ArrayLike | None,
    scale: ArrayLike | None,
    variance_epsilon: float,
    name=None,
) -> np.ndarray:
    """Normalize ``x`` with given statistics, exactly as ``tf.nn.batch_normalization``.

        inv = 1 / sqrt(variance + variance_epsilon)
        inv = inv * scale                        (if scale is given)
        y   = x * inv + (offset - mean * inv)    (offset = 0 if None)

    Every operation is done in ``x``'s dtype, as TensorFlow does (float16 included: this
    function takes given statistics, so it does not widen them); the result matches
    TensorFlow bit for bit. Statistics and parameters broadcast against ``x`` by NumPy's
    rules (so per-channel (C,) vectors fit NHWC and (N, C) directly, and keepdims
    statistics fit any layout). ``mean``, ``variance`` and ``variance_epsilon`` are
    required; ``offset`` and ``scale`` may be None.
    ``name`` is accepted for signature compatibility and ignored.

    Returns:
        ``y`` with ``x``'s dtype and shape.

    Example:
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> m, v = moments(x, [0])
        >>> batch_normalization(x, m, v, None, None, 0.0)
        array([[-1., -1.],
               [ 1.,  1.]])
    """
    del name
    x = np.asarray(x)
    check_float(x)
    arrays = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    for k, v in arrays.items():
        if v is None and k in ("mean", "variance"):
            raise TypeError(
                f"{k} is required (an array that broadcasts against x of shape "
                f"{x.shape}), got None"
            )
        if v is not None:
            check_float(np.asarray(v), k)
    variance_epsilon = _check_number(variance_epsilon, "variance_epsilon")
    # TensorFlow computes every op in x's dtype (float16 too), rsqrt through float32 with one
    # rounding; doing the same makes the result identical bit for bit, float16 included.
    dt = x.dtype
    mean = np.asarray(mean, dtype=dt)
    var_eps = np.asarray(variance, dtype=dt) + dt.type(variance_epsilon)
    inv = (1.0 / np.sqrt(var_eps.astype(_compute_dtype(dt)))).astype(dt)
    if scale is not None:
        inv = inv * np.asarray(scale, dtype=dt)
    shift = -mean * inv if offset is None else np.asarray(offset, dtype=dt) - mean * inv
    try:
        y = x * inv + shift
    except ValueError as e:
        raise ValueError(
            f"statistics/parameters do not broadcast against x of shape {x.shape}: "
            f"mean {mean.shape}, inv {np.shape(inv)}"
        ) from e
    return y
