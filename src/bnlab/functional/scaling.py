"""Feature scaling before a network: z-score and min-max (the lesson's first step)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from ._common import (
    _accumulator,
    _cast,
    _check_number,
    _compute_dtype,
    _moments_keepdims,
    _normalize_axes,
    check_float,
)
from .batchnorm import _normalize


def standardize(
    x: ArrayLike, axis: int | tuple[int, ...] | None = None, eps: float = 0.0
) -> np.ndarray:
    """z-score: ``(x - mean) / sqrt(var + eps)`` with the biased variance.

    The statistics are accumulated in float64, as everywhere in bnlab (see the module
    docstring); the subtraction and scaling are done in the compute dtype.

    Args:
        x: floating-point array.
        axis: axis or axes to take mean and variance over; None (default) for all of ``x``.
            ``axis=0`` on (N, D) standardizes each feature over the samples.
        eps: a number >= 0, default 0.0 (pure z-score: a constant feature gives 0/0 = NaN,
            with NumPy's warning); add a small value to map constant features to 0.

    Returns:
        Array like ``x``: zero mean and unit variance over ``axis``.
    """
    x = np.asarray(x)
    check_float(x)
    axes = tuple(range(x.ndim)) if axis is None else _normalize_axes(axis, x.ndim)
    eps = _check_number(eps, "eps", 0.0)
    if x.size == 0:
        return x.copy()
    cdt = _compute_dtype(x.dtype)
    mean, var = _moments_keepdims(x, axes)  # keepdims, float64
    with np.errstate(divide="ignore"):  # eps = 0, constant: 0 * inf
        inv_std = 1.0 / np.sqrt(var + eps)
    z = _normalize(x.astype(cdt, copy=False), _cast(mean, cdt), _cast(inv_std, cdt), mean.shape)
    return z.astype(x.dtype, copy=False)


def minmax_scale(
    x: ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    feature_range: tuple[float, float] = (0, 1),
) -> np.ndarray:
    """Min-max scaling, the other usual preprocessing beside the z-score (:func:`standardize`):

        y = (x - min) / (max - min) * (hi - lo) + lo        over ``axis``

    A constant slice (max == min) maps to ``lo``, as scikit-learn's ``MinMaxScaler`` does (it
    treats a zero range as 1). Unlike the z-score, the result depends on the two extreme
    values only, so a single outlier squeezes everything else.

    Args:
        x: floating-point array, finite (NaN/inf are a ValueError: scikit-learn would skip
            NaN as missing values, which bnlab does not guess).
        axis: axis or axes to take min and max over; None (default) for all of ``x``.
            ``axis=0`` on (N, D) scales each feature over the samples (``MinMaxScaler``).
        feature_range: ``(lo, hi)`` with lo < hi; default (0, 1).

    Returns:
        Array like ``x``, in [lo, hi] over ``axis``.
    """
    x = np.asarray(x)
    check_float(x)
    lo, hi = (float(v) for v in feature_range)
    if not lo < hi:
        raise ValueError(f"feature_range must be (lo, hi) with lo < hi, got {feature_range!r}")
    axes = tuple(range(x.ndim)) if axis is None else _normalize_axes(axis, x.ndim)
    if x.size == 0:
        return x.copy()
    if not np.isfinite(x).all():
        raise ValueError("minmax_scale takes finite values; x holds NaN or inf")
    acc = _accumulator(x.dtype)
    xmin = x.min(axis=axes, keepdims=True).astype(acc)
    span = x.max(axis=axes, keepdims=True).astype(acc) - xmin
    span = np.where(span == 0, 1.0, span)  # constant: maps to lo
    y = (x.astype(acc) - xmin) * ((hi - lo) / span) + lo
    return y.astype(x.dtype)
