"""PyTorch-style batch norm in NumPy: the forward with its cache, the closed-form backward,
inference, the running-statistics update, and ``torch.nn.functional.batch_norm``'s
signature (conventions: :mod:`bnlab.functional`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .. import kernels
from ._common import (
    _accumulator,
    _cast,
    _channel_axes,
    _check_channel_vector,
    _check_finite_stats,
    _check_number,
    _check_running_buffer,
    _compute_dtype,
    _count,
    _moments_keepdims,
    check_float,
)


@dataclass
class BNCache:
    """What the backward pass needs from a forward pass.

    ``x`` is the input in compute precision, ``mean`` and ``inv_std = 1/sqrt(var + eps)``
    are (C,) vectors, ``gamma`` is (C,) (ones when not affine). ``batch_stats`` says whether
    the statistics came from this batch (training) or were frozen running statistics
    (evaluation), which changes the gradient.
    """

    x: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray
    axis: int
    batch_stats: bool
    out_dtype: np.dtype
    var: np.ndarray | None = None  # biased batch variance (training only), (C,)
    mask: np.ndarray | None = None  # statistics' positions: x's shape, 1 on the channel axis
    act: str = "identity"  # the activation fused after BN ("relu": BatchNormAct2d)
    beta: np.ndarray | None = None  # (C,), for the activation's gradient


def _prepare(x, gamma, beta, axis):
    x = np.asarray(x)
    check_float(x)
    axis, reduce_axes, bshape = _channel_axes(x, axis)
    C = x.shape[axis]
    cdt = _compute_dtype(x.dtype)
    gamma = _check_channel_vector(gamma, "gamma (weight)", C, cdt)
    beta = _check_channel_vector(beta, "beta (bias)", C, cdt)
    return x, axis, reduce_axes, bshape, C, cdt, gamma, beta


def _kernels(backend: str, x: np.ndarray):
    """The fast kernel module for ``x`` (compute dtype), or None for the NumPy reference.

    Empty tensors (zero channels) take the reference: there is nothing to be fast at.
    """
    fast = kernels.resolve(backend, x.dtype)
    return None if x.size == 0 else fast


def _normalize(xc, mean, inv_std, bshape):
    """x_hat = (x - mean) * inv_std in xc's precision; the mean is subtracted first, so a
    large common offset cancels exactly instead of in ``x * inv_std - mean * inv_std``."""
    return (xc - mean.reshape(bshape)) * inv_std.reshape(bshape)


def _affine(x_hat, gamma, beta, bshape):
    y = x_hat if gamma is None else x_hat * gamma.reshape(bshape)
    return y if beta is None else y + beta.reshape(bshape)


def _check_mask(mask, x: np.ndarray, axis: int) -> np.ndarray:
    """``mask`` (x's shape without the channel axis, booleans with a True somewhere) as a
    boolean array broadcastable against x (length 1 on the channel axis)."""
    want = x.shape[:axis] + x.shape[axis + 1 :]
    mask = np.asarray(mask)
    if mask.shape != want:
        raise ValueError(
            f"mask must have x's shape without the channel axis {want}, got {mask.shape}"
        )
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be boolean (True: counts in the statistics), got {mask.dtype}")
    if not mask.any():
        raise ValueError("mask has no True entry: there is nothing to take statistics over")
    return np.expand_dims(mask, axis)


def _masked_forward(x, gamma, beta, eps, axis, mask):
    """:func:`batch_norm_forward` with statistics over the positions where ``mask`` holds."""
    xa, axis, reduce_axes, bshape, C, cdt, g0, b0 = _prepare(x, gamma, beta, axis)
    eps = _check_number(eps, "eps", 0.0)
    mask = _check_mask(mask, xa, axis)
    m = int(mask.sum())
    if m <= 1:
        raise ValueError(f"expected more than 1 unmasked value per channel when training, got {m}")
    xc = xa.astype(cdt, copy=False)
    acc = _accumulator(cdt)
    w = mask.astype(acc)
    mean = (xc * w).sum(axis=reduce_axes, dtype=acc) / m  # (C,)
    var = (np.square(xc - mean.reshape(bshape), dtype=acc) * w).sum(axis=reduce_axes) / m
    inv_std = inv_std_of(var, eps, var.dtype)
    mean, var, inv_std = (_cast(v, cdt) for v in (mean, var, inv_std))
    _check_finite_stats(np.where(mask, xa, 0), mean, var)
    y = _affine(_normalize(xc, mean, inv_std, bshape), g0, b0, bshape)  # everywhere
    g = np.ones(C, cdt) if g0 is None else g0
    cache = BNCache(xc, mean, inv_std, g, axis, True, xa.dtype, var, mask)
    return y.astype(xa.dtype, copy=False), cache


ACTS = ("identity", "relu")


def check_act(act: str) -> bool:
    """True for ReLU; a ValueError for an activation bnlab does not fuse."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return act == "relu"


def _activate(y, relu: bool):
    return np.maximum(y, 0, out=y) if relu else y  # NaN stays NaN


def batch_norm_forward(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str = "auto",
    mask: ArrayLike | None = None,
    act: str = "identity",
) -> tuple[np.ndarray, BNCache]:
    """Training-mode batch normalization with batch statistics: Algorithm 1 of the paper.

        mu      = mean(x)                  over every axis except ``axis``   (C,)
        var     = mean((x - mu)^2)         biased                            (C,)
        x_hat   = (x - mu) / sqrt(var + eps)
        y       = gamma * x_hat + beta

    mu, var and 1/sqrt(var + eps) are computed in float64 (see the module docstring) and
    rounded once to the compute dtype; x_hat and y are computed in the compute dtype.

    Args:
        x: input, e.g. (N, C), (N, C, L), (N, C, H, W) or NHWC with ``axis=-1``.
        gamma: (C,) scale, or None for 1.
        beta: (C,) shift, or None for 0.
        eps: added to the variance, a number >= 0; default 1e-5.
        axis: the channel axis; default 1 (see the module docstring).
        backend: "auto" (fused kernels when numba is available and the dtype is one they
            take), "numpy" (this reference) or "numba"; see :mod:`bnlab.kernels`.
        mask: None, or booleans of x's shape without the channel axis (e.g. (N, L) for
            padded sequences (N, C, L)): mu and var are taken only over the True positions
            (m = their count), y is computed everywhere with them (Flax/Keras ``mask``).
            The NumPy reference computes it.
        act: "identity" (default) or "relu": ``y = relu(gamma * x_hat + beta)``, in the same
            pass with the kernels (timm's BatchNormAct2d).

    Returns:
        ``(y, cache)``: ``y`` like ``x`` (same dtype), ``cache`` a :class:`BNCache` for
        :func:`batch_norm_backward`; ``cache.mean`` and ``cache.var`` are the batch statistics.

    Raises:
        ValueError: at most one value per channel (``m <= 1``), or gamma/beta not (C,), or a
            mask of the wrong shape or without a True entry.
        FloatingPointError: the input holds NaN or inf, or its variance is beyond the
            compute dtype's range.
    """
    relu = check_act(act)
    if mask is not None:
        if relu:
            raise ValueError("mask= and act= together are not supported")
        return _masked_forward(x, gamma, beta, eps, axis, mask)
    xa, axis, reduce_axes, bshape, C, cdt, g0, b0 = _prepare(x, gamma, beta, axis)
    eps = _check_number(eps, "eps", 0.0)
    m = _count(xa.shape, reduce_axes)
    if m <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of size {xa.shape}"
        )
    xc = xa.astype(cdt, copy=False)
    fast = _kernels(backend, xc)
    if fast is not None:
        y, mean, var, inv_std = fast.train_forward(xc, g0, b0, eps, axis, act=act)  # float64 stats
        if not np.isfinite(var).all() and np.isfinite(xa).all():
            fast = None  # the kernels' float64 sums overflowed; the reference rescales
    if fast is None:
        mean, var = (s.reshape(C) for s in _moments_keepdims(xc, reduce_axes))  # (C,), biased
        inv_std = inv_std_of(var, eps, var.dtype)  # (C,)
    mean, var, inv_std = (_cast(v, cdt) for v in (mean, var, inv_std))  # compute dtype
    _check_finite_stats(xa, mean, var)
    if fast is None:
        y = _activate(_affine(_normalize(xc, mean, inv_std, bshape), g0, b0, bshape), relu)
    g = np.ones(C, cdt) if g0 is None else g0
    cache = BNCache(xc, mean, inv_std, g, axis, True, xa.dtype, var, act=act, beta=b0)
    return y.astype(xa.dtype, copy=False), cache


def batch_norm_backward(
    dy: ArrayLike, cache: BNCache, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of batch normalization, in one closed-form expression.

    With ``m`` values per channel and sums over every axis except the channel axis:

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)   (batch statistics)
        dx     = gamma * inv_std * dy                                      (frozen statistics)

    The first ``dx`` is the paper's chain rule through mu and sigma^2 collapsed into one
    formula; the second holds in evaluation mode, where mean and variance are constants.
    With a mask (statistics over its m True positions), positions outside it get the second
    formula and those inside the first (dbeta, dgamma still summed over every position).
    The sums are accumulated in float64, like the statistics.

    Args:
        dy: upstream gradient, same shape as the forward input.
        cache: the :class:`BNCache` from the forward pass.
        backend: as in :func:`batch_norm_forward`.

    Returns:
        ``(dx, dgamma, dbeta)``: ``dx`` like ``dy`` (float16 in, float16 out), the others (C,)
        in compute precision.
    """
    dy = np.asarray(dy)
    check_float(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected the forward input's {cache.x.shape}")
    x = cache.x
    cdt = x.dtype
    fast = None if cache.mask is not None else _kernels(backend, x)
    if fast is not None:
        dx, dgamma, dbeta = fast.backward(
            dy,
            x,
            cache.mean,
            cache.inv_std,
            cache.gamma,
            cache.axis,
            cache.batch_stats,
            beta=cache.beta,
            act=cache.act,
        )
        return dx.astype(cache.out_dtype, copy=False), _cast(dgamma, cdt), _cast(dbeta, cdt)
    _, reduce_axes, bshape = _channel_axes(x, cache.axis)
    acc = _accumulator(cdt)
    dyc = dy.astype(cdt, copy=False)
    x_hat = _normalize(x, cache.mean, cache.inv_std, bshape)  # like x
    if cache.act == "relu":  # through the ReLU: dy where its input was positive
        z = _affine(x_hat, cache.gamma, cache.beta, bshape)
        dyc = np.where(z > 0, dyc, 0).astype(cdt, copy=False)
    dbeta = _cast(dyc.sum(axis=reduce_axes, dtype=acc), cdt)  # (C,)
    dgamma = _cast((dyc * x_hat).sum(axis=reduce_axes, dtype=acc), cdt)  # (C,)
    scale = cache.gamma.reshape(bshape) * cache.inv_std.reshape(bshape)  # (1, C, 1, 1)
    if cache.mask is not None:  # the statistics saw only the masked positions
        m = int(cache.mask.sum())
        through_stats = (scale / m) * (dbeta.reshape(bshape) + x_hat * dgamma.reshape(bshape))
        dx = scale * dyc - np.where(cache.mask, through_stats, 0)
    elif cache.batch_stats:
        m = _count(x.shape, reduce_axes)
        dx = (scale / m) * (m * dyc - dbeta.reshape(bshape) - x_hat * dgamma.reshape(bshape))
    else:
        dx = scale * dyc
    return dx.astype(cache.out_dtype, copy=False), dgamma, dbeta


def batch_norm_inference(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str = "auto",
    act: str = "identity",
) -> tuple[np.ndarray, BNCache]:
    """Evaluation-mode batch normalization with fixed statistics, and its cache.

        y = gamma * (x - mean) / sqrt(var + eps) + beta     (then ReLU with ``act="relu"``)

    Shapes and conventions as :func:`batch_norm_forward`; ``mean`` and ``var`` are (C,)
    (typically ``running_mean`` and ``running_var``). Each sample is normalized on its own,
    so the output of one sample does not depend on the rest of the batch.
    """
    xa, axis, _, bshape, C, cdt, g0, b0 = _prepare(x, gamma, beta, axis)
    eps = _check_number(eps, "eps", 0.0)
    mu = _check_channel_vector(mean, "running_mean", C, cdt)
    sigma2 = _check_channel_vector(var, "running_var", C, cdt)
    assert mu is not None and sigma2 is not None  # checked: (C,) vectors
    inv_std = inv_std_of(sigma2, eps, cdt)  # (C,)
    relu = check_act(act)
    xc = xa.astype(cdt, copy=False)
    fast = _kernels(backend, xc)
    if fast is not None:
        y = fast.inference(xc, mu, inv_std, g0, b0, axis, act=act)
    else:
        y = _activate(_affine(_normalize(xc, mu, inv_std, bshape), g0, b0, bshape), relu)
    g = np.ones(C, cdt) if g0 is None else g0
    cache = BNCache(xc, mu, inv_std, g, axis, False, xa.dtype, act=act, beta=b0)
    return y.astype(xa.dtype, copy=False), cache


def inv_std_of(var: ArrayLike, eps: float, dtype) -> np.ndarray:
    """``1 / sqrt(var + eps)``, computed in float64 (or wider) and rounded once to ``dtype``."""
    var = np.asarray(var)
    return _cast(1.0 / np.sqrt(var.astype(_accumulator(var.dtype)) + eps), np.dtype(dtype))


def update_running_stats(running_mean, running_var, mean, var, m: int, momentum: float) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch``.

    ``var`` is the biased batch variance over ``m`` values; the running variance receives
    the unbiased ``var * m / (m - 1)`` (paper Algorithm 2, PyTorch).
    """
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean.astype(running_mean.dtype, copy=False)
    if running_var is not None:
        unbiased = var * (m / (m - 1))
        running_var *= 1.0 - momentum
        running_var += momentum * unbiased.astype(running_var.dtype, copy=False)


def batch_norm(
    x: ArrayLike,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str = "auto",
) -> np.ndarray:
    """Batch normalization with PyTorch's ``torch.nn.functional.batch_norm`` semantics.

    In training, normalizes with the batch statistics and, if the buffers are given, updates
    them in place: ``running_mean`` with the batch mean and ``running_var`` with the
    *unbiased* batch variance, each as ``(1 - momentum) * running + momentum * batch``.
    Otherwise normalizes with ``running_mean`` and ``running_var``.

    Args:
        x: input with channels on ``axis`` (default 1; -1 for NHWC).
        running_mean, running_var: (C,) float arrays, or None (only when ``training``).
            In training they are updated in place, so they must be writeable NumPy arrays.
        weight, bias: (C,) gamma and beta, or None.
        training: use batch statistics; default False.
        momentum: weight of the new batch, in [0, 1]; default 0.1 (Keras 0.99 is 0.01
            here). The layers' ``momentum=None`` (a cumulative average) is theirs alone:
            it needs the count of batches seen, which a function does not keep; pass
            ``momentum=1 / num_batches_tracked`` for the same update.
        eps: default 1e-5.
        backend: as in :func:`batch_norm_forward`.

    Returns:
        ``y`` like ``x``.
    """
    if training:
        if momentum is None:
            raise TypeError(
                "momentum=None (a cumulative average) needs the number of batches seen, which "
                "the functional form does not keep: pass momentum=1/num_batches_tracked (what "
                "nn.BatchNorm1d/2d(momentum=None) do), or use those layers"
            )
        momentum = _check_number(momentum, "momentum", 0.0)
        if momentum > 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        x = np.asarray(x)
        channel, reduce_axes, _ = _channel_axes(x, axis)
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            _check_running_buffer(buf, name, x.shape[channel])
        y, cache = batch_norm_forward(x, weight, bias, eps=eps, axis=axis, backend=backend)
        update_running_stats(
            running_mean,
            running_var,
            cache.mean,
            cache.var,
            _count(x.shape, reduce_axes),
            momentum,
        )
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    y, _ = batch_norm_inference(
        x, running_mean, running_var, weight, bias, eps=eps, axis=axis, backend=backend
    )
    return y
