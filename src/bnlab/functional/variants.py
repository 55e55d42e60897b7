"""The math of the BN variants: folding into the layer before, batch renormalization,
ghost batches, and precise-BN recalibration (conventions: :mod:`bnlab.functional`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._common import _accumulator, _cast, _channel_axes
from .batchnorm import (
    BNCache,
    _normalize,
    batch_norm_backward,
    batch_norm_forward,
)


def fold_batchnorm_params(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of a layer ``z = W x + b`` (Linear, or a convolution with output
    channels on W's axis 0) followed by evaluation-mode BN, as one layer:

        s = gamma / sqrt(running_var + eps)          (C,)
        W' = W * s  (along W's axis 0),   b' = (b - running_mean) * s + beta

    ``bias``, ``gamma``, ``beta`` may be None (0, 1, 0). Computed in float64, returned in
    W's dtype.
    """
    dt = np.asarray(weight).dtype
    var = np.asarray(running_var, np.float64)
    s = (1.0 if gamma is None else np.asarray(gamma, np.float64)) / np.sqrt(var + eps)
    s = np.broadcast_to(s, var.shape)
    w = np.asarray(weight, np.float64) * s.reshape((-1,) + (1,) * (np.ndim(weight) - 1))
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    b = (b - np.asarray(running_mean, np.float64)) * s + (
        0.0 if beta is None else np.asarray(beta, np.float64)
    )
    return w.astype(dt), b.astype(dt)


def renorm_correction(mean, var, eps: float, renorm_mean, renorm_std, rmax: float, dmax: float):
    """Batch renormalization's corrections (Ioffe 2017, as Keras 2 computes them) from the
    batch statistics and the renorm averages *before* this batch's update:

        sigma_B = sqrt(var + eps)                      (var: the biased batch variance)
        sigma   = max(renorm_std, sqrt(eps))
        r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mean - renorm_mean) / sigma, -dmax, dmax)

    Returns float64 (C,) r, d and sigma_B. r and d are constants for the gradient.
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    sigma_b = np.sqrt(var + eps)
    sigma = np.maximum(np.asarray(renorm_std, np.float64), np.sqrt(eps))
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mean - np.asarray(renorm_mean, np.float64)) / sigma, -dmax, dmax)
    return r, d, sigma_b


def update_renorm_stats(renorm_mean, renorm_std, mean, sigma_b, momentum: float) -> None:
    """In place: ``renorm = (1 - momentum) * renorm + momentum * batch`` for the batch mean
    and sigma_B (PyTorch's momentum convention: Keras's ``renorm_momentum=0.99`` is 0.01;
    no debiasing, as Keras 2)."""
    renorm_mean *= 1.0 - momentum
    renorm_mean += momentum * np.asarray(mean).astype(renorm_mean.dtype, copy=False)
    renorm_std *= 1.0 - momentum
    renorm_std += momentum * np.asarray(sigma_b).astype(renorm_std.dtype, copy=False)


@dataclass
class RenormCache:
    """What :func:`batch_renorm_backward` needs: the plain BN cache (gamma 1: its y is
    x_hat), r and d (C,), and gamma (C,)."""

    bn: BNCache
    r: np.ndarray
    d: np.ndarray
    gamma: np.ndarray


def batch_renorm_forward(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    axis: int,
    renorm_mean: np.ndarray,
    renorm_std: np.ndarray,
    rmax: float,
    dmax: float,
    backend: str = "auto",
) -> tuple[np.ndarray, RenormCache]:
    """Batch renormalization in training (Ioffe 2017):

        x_hat = (x - mu_B) / sigma_B          (:func:`batch_norm_forward`, batch statistics)
        y     = gamma * (x_hat * r + d) + beta   (r, d: :func:`renorm_correction`)

    Returns ``(y, cache)`` (a :class:`RenormCache`; ``cache.bn.mean``/``.var`` are the batch
    statistics, for the running and renorm averages). The averages are not updated here.
    """
    x_hat, cache = batch_norm_forward(x, None, None, eps, axis, backend)
    C = cache.mean.shape[0]
    r, d, _ = renorm_correction(cache.mean, cache.var, eps, renorm_mean, renorm_std, rmax, dmax)
    cdt = cache.x.dtype
    g = np.ones(C, cdt) if gamma is None else np.asarray(gamma, cdt)
    _, _, bshape = _channel_axes(cache.x, cache.axis)
    b = 0 if beta is None else np.asarray(beta, cdt).reshape(bshape)
    y = (
        g.reshape(bshape)
        * (
            x_hat.astype(cdt, copy=False) * _cast(r, cdt).reshape(bshape)
            + _cast(d, cdt).reshape(bshape)
        )
        + b
    )
    return y.astype(cache.out_dtype, copy=False), RenormCache(cache, r, d, g)


def batch_renorm_backward(
    dy: ArrayLike, cache: RenormCache, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx, dgamma, dbeta of :func:`batch_renorm_forward` (r and d constant):

    dx     = BN's dx with gamma * r in place of gamma
    dgamma = sum(dy * (x_hat * r + d)),   dbeta = sum(dy)
    """
    dy = np.asarray(dy)
    bn = cache.bn
    _, reduce_axes, bshape = _channel_axes(bn.x, bn.axis)
    cdt = bn.x.dtype
    scale = (cache.gamma * cache.r).astype(cdt).reshape(bshape)
    dx, _, _ = batch_norm_backward(dy.astype(cdt, copy=False) * scale, bn, backend)
    acc = _accumulator(cdt)
    dyc = dy.astype(cdt, copy=False)
    dbeta = dyc.sum(axis=reduce_axes, dtype=acc)
    x_hat = _normalize(bn.x, bn.mean, bn.inv_std, bshape)
    dgamma = (dyc * x_hat).sum(axis=reduce_axes, dtype=acc) * cache.r + dbeta * cache.d
    return dx.astype(bn.out_dtype, copy=False), _cast(dgamma, cdt), _cast(dbeta, cdt)


def check_virtual_batch_size(v) -> int:
    """``v`` as an int, or a ValueError: a virtual batch size is a positive integer."""
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"virtual_batch_size must be a positive integer, got {v!r}")
    return int(v)


def ghost_batch_norm_forward(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    axis: int = 1,
    backend: str = "auto",
):
    """Ghost batch normalization (Hoffer et al. 2017; Keras's ``virtual_batch_size``): the
    batch is cut along axis 0 into virtual batches ``[k*v, (k+1)*v)`` of ``v`` samples,
    each normalized by :func:`batch_norm_forward` with its own statistics.

    Returns ``(y, caches)``: y like x, one :class:`BNCache` per virtual batch. A batch size
    that is not a multiple of ``v`` is a ValueError naming both numbers.
    """
    x = np.asarray(x)
    v = check_virtual_batch_size(virtual_batch_size)
    if x.ndim < 2 or x.shape[0] % v:
        raise ValueError(
            f"the batch size must be a multiple of virtual_batch_size={v}, got a "
            f"batch of {x.shape[0] if x.ndim else 0} (input shape {x.shape})"
        )
    ys, caches = [], []
    for k in range(x.shape[0] // v):
        y, cache = batch_norm_forward(x[k * v : (k + 1) * v], gamma, beta, eps, axis, backend)
        ys.append(y)
        caches.append(cache)
    return np.concatenate(ys), caches


def ghost_batch_norm_backward(
    dy: ArrayLike, caches: list[BNCache], backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx, dgamma, dbeta of :func:`ghost_batch_norm_forward`: each virtual batch's
    :func:`batch_norm_backward`, parameter gradients summed."""
    dy = np.asarray(dy)
    v = caches[0].x.shape[0]
    if dy.shape[0] != v * len(caches):
        raise ValueError(f"dy has {dy.shape[0]} samples, expected {v * len(caches)}")
    parts = [
        batch_norm_backward(dy[k * v : (k + 1) * v], c, backend) for k, c in enumerate(caches)
    ]
    dgamma, dbeta = parts[0][1], parts[0][2]
    for p in parts[1:]:  # in order, as a running sum
        dgamma, dbeta = dgamma + p[1], dbeta + p[2]
    return np.concatenate([p[0] for p in parts]), dgamma, dbeta


def ghost_statistics(caches):
    """The running-statistics update's inputs for ghost BN: the average of the virtual
    batches' means and (biased) variances, and the count per virtual batch. With
    :func:`update_running_stats` that averages the unbiased variances (equal counts)."""
    mean = np.mean([c.mean for c in caches], axis=0)
    var = np.mean([c.var for c in caches], axis=0)
    return mean, var, caches[0].x.size // caches[0].mean.size


def recalibrate_layers(model, bns, batches, reset):
    """The bookkeeping of precise BN, for bnlab and torch models alike: ``reset`` each of
    the BN layers ``bns``, make their running averages cumulative (momentum None), run
    ``batches`` through ``model`` in train mode, then restore the momenta and the mode."""
    if not bns:
        return model
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        reset(bn)
        bn.momentum = None  # cumulative average: 1 / n for the n-th batch
    model.train()
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return model
