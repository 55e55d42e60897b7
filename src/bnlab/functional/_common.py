"""Checks, dtypes and the two-pass statistics every function of the package shares
(conventions: :mod:`bnlab.functional`)."""

from __future__ import annotations

import math

import numpy as np


def check_float(x: np.ndarray, name: str = "x") -> None:
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"expected a floating-point array for {name} (float16, float32, float64 or "
            f"longdouble), got dtype {x.dtype}"
        )


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 is computed in float32; other float dtypes in themselves."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _accumulator(dtype: np.dtype) -> np.dtype:
    """Sums accumulate in float64 at least: float16/float32 in float64, longdouble in itself."""
    return np.promote_types(dtype, np.float64)


def _check_number(v, name: str, minimum: float | None = None) -> float:
    """A finite real scalar (eps, momentum); ``minimum`` bounds it from below when given."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {v!r} ({type(v).__name__})")
    v = float(v)
    if not np.isfinite(v) or (minimum is not None and v < minimum):
        bound = "a finite number" if minimum is None else f"a finite number >= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {v!r}")
    return v


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    if np.ndim(axes) == 0:
        axes = (axes,)
    out = []
    for a in axes:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axes must be integers, got {a!r} ({type(a).__name__})")
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in axes={tuple(axes)}")
    return tuple(out)


def _channel_axes(x: np.ndarray, axis: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """For channel axis ``axis`` return (axis, reduced axes, broadcast shape of a (C,) array)."""
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (N, C, ...), got {x.ndim}D input")
    (axis,) = _normalize_axes(axis, x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
    bshape = tuple(x.shape[axis] if a == axis else 1 for a in range(x.ndim))
    return axis, reduce_axes, bshape


def _check_channel_vector(v, name: str, C: int, dtype: np.dtype) -> np.ndarray | None:
    """A per-channel parameter (gamma, beta, running stats) must have shape (C,)."""
    if v is None:
        return None
    v = np.asarray(v)
    check_float(v, name)
    if v.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},), got {v.shape}")
    return v.astype(dtype, copy=False)


def _check_running_buffer(buf, name: str, C: int) -> None:
    """A running-statistics buffer is updated in place: a float NumPy array of shape (C,)."""
    if buf is None:
        return
    if not isinstance(buf, np.ndarray):
        raise TypeError(
            f"{name} is updated in place, so it must be a NumPy array of shape "
            f"({C},), got {type(buf).__name__}"
        )
    _check_channel_vector(buf, name, C, buf.dtype)
    if not buf.flags.writeable:
        raise ValueError(f"{name} is updated in place, but the array given is read-only")


def _count(shape, axes) -> int:
    """Number of values reduced over ``axes`` (m, per channel)."""
    return math.prod(shape[a] for a in axes)


def _check_finite_stats(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
    """Non-finite batch statistics: NaN/inf in x, or a variance beyond the dtype's range.

    Checked on the (C,) statistics; x itself is scanned only on this failure path, to say
    which of the two it is.
    """
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if not bad.any():
        return
    ch = np.flatnonzero(bad)
    where = f"channel(s) {ch[:8].tolist()} (mean={mean[ch[0]]}, var={var[ch[0]]})"
    if np.isfinite(x).all():
        wider = "" if var.dtype.itemsize >= 8 else " or compute in float64"
        raise FloatingPointError(
            f"input of size {tuple(x.shape)} is finite, but the batch variance of {where} "
            f"overflows {var.dtype}: rescale the input{wider}"
        )
    raise FloatingPointError(
        f"input of size {tuple(x.shape)} contains NaN or inf: batch statistics of {where} "
        f"are not finite"
    )


def _cast(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round to ``dtype``; a value past its range becomes inf (IEEE), without a warning."""
    with np.errstate(over="ignore"):
        return v.astype(dtype, copy=False)


def _two_pass(x: np.ndarray, axes: tuple[int, ...]):
    acc = _accumulator(x.dtype)
    mean = x.mean(axis=axes, dtype=acc, keepdims=True)
    dev = np.subtract(x, mean, dtype=acc)  # like x, in acc
    return mean, np.square(dev, out=dev).mean(axis=axes, keepdims=True)


def _moments_keepdims(x: np.ndarray, axes: tuple[int, ...]):
    """Mean and biased variance over ``axes`` (kept with length 1), in float64 or wider.

    Two passes, both accumulated in float64 (longdouble in itself): the mean, then the mean
    of the squared deviations from it. A float32 running sum would not do: its rounding
    error grows with m, and for ``x = 1e4 + noise`` it leaves nothing of the variance by
    m = 1e5. Finite inputs do not overflow: float16/float32 values cannot overflow float64
    sums, and float64 sums past 1.8e308 are redone on x scaled by a power of two (exact).
    A variance that is itself beyond the dtype's range is inf.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled below
        mean, var = _two_pass(x, axes)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()) and np.isfinite(x).all():
            scale = np.ldexp(1.0, int(np.frexp(np.abs(x).max())[1]) - 1)  # max|x| / scale < 2
            mean, var = _two_pass(x / scale, axes)
            mean, var = mean * scale, var * scale * scale
    return mean, var
