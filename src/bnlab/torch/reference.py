"""The definition of batch norm in torch operations: bnlab.torch's "reference" engine.

    mean = E[x],  var = E[(x - mean)^2]  (biased; over every dimension but 1, or over the
                                          positions where ``mask`` is True)
    y    = (x - mean) / sqrt(var + eps) * weight + bias

Statistics are two-pass (the mean first, then the mean of squared deviations), so they do
not depend on any element's value or on a common offset, computed in float64 for float64
input and in float32 otherwise (float16/bfloat16 are upcast once; torch's reductions are
pairwise on CPU and tree-shaped on CUDA, never a plain sequential float32 sum).

Everything here is ordinary differentiable torch code on any device and dtype, so it is
what runs where bnlab's kernels cannot: under ``torch.func`` transforms (vmap, grad,
jacrev, jvp) and forward-mode AD, for ``mask=`` on every device, and as the formula that
the kernels' autograd Functions differentiate when a second derivative is asked for
(:func:`grads`). The kernels' math is the same (:mod:`bnlab.functional`,
:mod:`bnlab.kernels`); the engine layer (:mod:`bnlab.torch.engine`) decides which runs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel(v: Tensor, x: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...), broadcastable against x."""
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def statistics(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Batch mean, biased var ((C,), in :func:`compute_dtype`) and the count of values per
    channel (a 0-d tensor), two-pass. With ``mask`` (x's shape without dimension 1), only
    True positions count; NaN at False positions is ignored."""
    dims = _dims(x)
    xc = x.to(compute_dtype(x.dtype))
    if mask is None:
        count = torch.tensor(x.numel() // x.shape[1], dtype=xc.dtype, device=x.device)
        mean = xc.mean(dims)
        var = (xc - _channel(mean, x)).square().mean(dims)
        return mean, var, count
    keep = mask.unsqueeze(1)  # (N, 1, *)
    count = mask.sum().to(xc.dtype)
    zero = xc.new_zeros(())
    mean = torch.where(keep, xc, zero).sum(dims) / count
    var = torch.where(keep, xc - _channel(mean, x), zero).square().sum(dims) / count
    return mean, var, count


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in :func:`compute_dtype`, returned
    in x's dtype."""
    cdt = compute_dtype(x.dtype)
    y = (x.to(cdt) - _channel(mean.to(cdt), x)) * _channel(torch.rsqrt(var.to(cdt) + eps), x)
    if weight is not None:
        y = y * _channel(weight.to(cdt), x)
    if bias is not None:
        y = y + _channel(bias.to(cdt), x)
    return y.to(x.dtype)


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    training: bool,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y and the statistics it used: (y, mean, var, count). Training: x's own (under
    ``mask``); evaluation: the given ``mean`` and ``var`` (count 0)."""
    if training:
        mean, var, count = statistics(x, mask)
    else:
        assert mean is not None and var is not None, "evaluation needs mean and var"
        count = x.new_zeros((), dtype=compute_dtype(x.dtype))
    return normalize(x, mean, var, weight, bias, eps), mean, var, count


def grads(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    training: bool,
    mean: Tensor | None = None,
    inv_std: Tensor | None = None,
    act: str = "identity",
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgamma, dbeta) of ``act(normalize(x, ...))`` in the closed form, written in
    differentiable torch operations (:func:`bnlab.functional.batch_norm_backward`'s formula):

        g = dy (with act="relu": dy where the ReLU's input was positive, else 0)
        dbeta = sum(g),  dgamma = sum(g * x_hat)
        training:    dx = weight * inv_std * (g - dbeta / m - x_hat * dgamma / m)
        evaluation:  dx = weight * inv_std * g          (mean, inv_std: given constants)

    What the kernels' autograd Functions return when a graph of the gradient is asked for
    (``create_graph=True``, ``torch.func``'s batched gradients): differentiable in dy, x,
    weight and bias, so second derivatives are exact. In training the statistics are
    recomputed from x (they depend on it). dgamma and dbeta in :func:`compute_dtype`."""
    cdt = compute_dtype(x.dtype)
    dims = _dims(x)
    if training:
        mean, var, count = statistics(x)
        inv_std = torch.rsqrt(var + eps)
    assert mean is not None and inv_std is not None, "evaluation needs mean and inv_std"
    inv_std = inv_std.to(cdt)
    x_hat = (x.to(cdt) - _channel(mean.to(cdt), x)) * _channel(inv_std, x)
    g = dy.to(cdt)
    scale = inv_std if weight is None else inv_std * weight.to(cdt)
    if act == "relu":
        pre = x_hat if weight is None else x_hat * _channel(weight.to(cdt), x)
        if bias is not None:
            pre = pre + _channel(bias.to(cdt), x)
        g = torch.where(pre > 0, g, g.new_zeros(()))
    dbeta = g.sum(dims)
    dgamma = (g * x_hat).sum(dims)
    if training:
        g = g - _channel(dbeta / count, x) - x_hat * _channel(dgamma / count, x)
    return (g * _channel(scale, x)).to(x.dtype), dgamma, dbeta
