"""Correctness cases for bnlab.torch's kernels against bnlab's float64 NumPy reference
(a test harness: it lives in tools/, beside tools/gpu_check.py, not in the package).

One list of cases serves two places: ``make test`` runs the small ones on CPU tensors with
the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``), and
``tools/gpu_check.py`` runs all of them on a GPU. Each case trains one step (forward with
the running-statistics update, backward) and evaluates one step (forward, backward) through
:func:`bnlab.torch.batch_norm`, exactly as a user calls it, and compares with
:mod:`bnlab.functional` in float64 on the same (rounded) input.

Tolerances ("within the dtype's rounding"), as errors relative to the reference's largest
magnitude:

* outputs (y, dx) in dtype d: ``4 eps(d) + 128 eps(float32)``: the output's own rounding,
  plus float32 arithmetic on the way (statistics are float32);
* reductions (dgamma, dbeta) and the running statistics: ``128 eps(float32)`` of the sum of
  the terms' magnitudes, the bound for float32 summation of that depth.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from bnlab import functional as F
from bnlab.torch.functional import batch_norm

EPS32 = float(torch.finfo(torch.float32).eps)


class Case(NamedTuple):
    """One check: shape, memory format ("contiguous", "channels_last", "channels_last_3d"),
    dtype name, a common offset of the values (large offsets test the statistics' numerics),
    whether weight and bias are given, and whether the case is small enough for the
    interpreter (``make test``)."""

    shape: tuple
    fmt: str = "contiguous"
    dtype: str = "float32"
    offset: float = 0.0
    affine: bool = True
    small: bool = True

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return (
            f"{dims} {self.dtype} {self.fmt}"
            + (f" +{self.offset:g}" if self.offset else "")
            + ("" if self.affine else " no-affine")
        )


def _cases():
    cases = []
    layouts = [
        ((13, 3), "contiguous"),  # (N, C): an (M, C) matrix
        ((5, 4, 37), "contiguous"),  # (N, C, L)
        ((6, 3, 5, 7), "contiguous"),  # NCHW, odd sizes
        ((6, 3, 5, 7), "channels_last"),
        ((3, 2, 3, 4, 5), "contiguous"),  # NCDHW
        ((3, 2, 3, 4, 5), "channels_last_3d"),
        ((9, 1, 4, 5), "contiguous"),  # C = 1
        ((9, 1, 4, 5), "channels_last"),
        ((3, 2, 25, 27), "contiguous"),  # several tiles along L
        ((20, 130), "contiguous"),  # several channel blocks
        ((4, 130, 3, 3), "channels_last"),
    ]
    for dtype in ("float32", "float16", "bfloat16"):
        for shape, fmt in layouts:
            cases.append(Case(shape, fmt, dtype))
        offset = 1e4 if dtype == "float32" else 1e2  # keeps noise representable in the dtype
        cases.append(Case((7, 3, 5, 5), "contiguous", dtype, offset))
        cases.append(Case((7, 3, 5, 5), "channels_last", dtype, offset))
    cases.append(Case((6, 3, 5, 7), "contiguous", "float32", affine=False))
    cases.append(Case((6, 3, 5, 7), "channels_last", "float16", affine=False))
    # the GPU bench's shapes (too large for the interpreter)
    for dtype, fmt in [
        ("float32", "contiguous"),
        ("float32", "channels_last"),
        ("float16", "contiguous"),
        ("float16", "channels_last"),
        ("bfloat16", "channels_last"),
    ]:
        cases.append(Case((256, 64, 56, 56), fmt, dtype, small=False))
    cases.append(Case((8192, 4096), small=False))
    cases.append(Case((64, 64, 32, 32), small=False))
    cases.append(Case((64, 64, 32, 32), dtype="float32", offset=1e4, small=False))
    return cases


CASES = _cases()
FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _rel(ours: torch.Tensor, ref: np.ndarray, scale: float | None = None) -> float:
    """max |ours - ref| / scale (default: max |ref|)."""
    scale = float(np.abs(ref).max()) if scale is None else scale
    return float(np.abs(_np(ours) - ref).max() / max(scale, np.finfo(np.float64).tiny))


def inputs(case: Case, device, seed: int = 0):
    """x, dy (the case's dtype and memory format), weight, bias, running mean and var
    (float32 (C,), as a module holds them)."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    C = case.shape[1]
    x = (case.offset + 2.0 * torch.randn(case.shape, generator=g)).to(dtype)
    dy = torch.randn(case.shape, generator=g).to(dtype)
    fmt = FORMATS[case.fmt]
    x, dy = (t.to(device).contiguous(memory_format=fmt) for t in (x, dy))
    weight = (0.5 + torch.rand(C, generator=g)).to(device) if case.affine else None
    bias = torch.randn(C, generator=g).to(device) if case.affine else None
    running_mean = (case.offset + torch.randn(C, generator=g)).to(device)
    running_var = (0.5 + torch.rand(C, generator=g)).to(device)
    return x, dy, weight, bias, running_mean, running_var


def run_case(
    case: Case, device="cpu", backend: str = "triton", momentum: float = 0.1, eps: float = 1e-5
) -> dict:
    """Errors of one case (train step and eval step) and whether each is within tolerance.

    Returns a dict: ``errors`` {name: relative error}, ``tolerances`` {name: tolerance},
    ``ok`` (all within), ``deterministic`` (a second training step on the same input gave
    bitwise the same outputs and gradients), ``torch_running_stats`` (ours against torch's
    own kernel's, relative; within ``128 * eps32`` plus ``torch_running_stats_error``,
    torch's own against the float64 reference).
    """
    x, dy, weight, bias, rm, rv = inputs(case, device)
    dtype = x.dtype
    errors, tol = {}, {}
    out_tol = 4 * _eps(dtype) + 128 * EPS32
    sum_tol = 128 * EPS32
    ref_w = None if weight is None else _np(weight)
    ref_b = None if bias is None else _np(bias)
    xr, dyr = _np(x), _np(dy)
    m = x.numel() // x.shape[1]
    reduce_axes = (0, *range(2, x.dim()))

    def grads(xx, w, b):
        xx = xx.detach().requires_grad_()
        w = None if w is None else w.detach().requires_grad_()
        b = None if b is None else b.detach().requires_grad_()
        return xx, w, b

    # training: one step, twice (determinism), from the same running statistics
    results = []
    for _ in range(2):
        xx, w, b = grads(x, weight, bias)
        rm1, rv1 = rm.clone(), rv.clone()
        y = batch_norm(
            xx, rm1, rv1, w, b, training=True, momentum=momentum, eps=eps, backend=backend
        )
        y.backward(dy)
        results.append((y, xx.grad, rm1, rv1, w, b))
    (y, dx, rm1, rv1, w, b), again = results
    deterministic = all(torch.equal(p, q) for p, q in zip((y, dx, rm1, rv1), again[:4])) and (
        w is None or (torch.equal(w.grad, again[4].grad) and torch.equal(b.grad, again[5].grad))
    )
    y_ref, cache = F.batch_norm_forward(xr, ref_w, ref_b, eps, axis=1, backend="numpy")
    dx_ref, dgamma_ref, dbeta_ref = F.batch_norm_backward(dyr, cache, backend="numpy")
    rm_ref, rv_ref = _np(rm), _np(rv)
    F.update_running_stats(rm_ref, rv_ref, cache.mean, cache.var, m, momentum)
    errors["train y"], tol["train y"] = _rel(y, y_ref), out_tol
    errors["train dx"], tol["train dx"] = _rel(dx, dx_ref), out_tol
    x_hat = (
        xr - cache.mean.reshape(cache.mean.shape + (1,) * (x.dim() - 2))
    ) * cache.inv_std.reshape(cache.inv_std.shape + (1,) * (x.dim() - 2))
    if w is not None:
        errors["train dgamma"] = _rel(
            w.grad, dgamma_ref, np.abs(dyr * x_hat).sum(reduce_axes).max()
        )
        errors["train dbeta"] = _rel(b.grad, dbeta_ref, np.abs(dyr).sum(reduce_axes).max())
        tol["train dgamma"] = tol["train dbeta"] = sum_tol
    errors["running_mean"], tol["running_mean"] = _rel(rm1, rm_ref), sum_tol
    errors["running_var"], tol["running_var"] = _rel(rv1, rv_ref), sum_tol

    # torch's own kernel from the same state: the running statistics it leaves
    rm2, rv2 = rm.clone(), rv.clone()
    torch.nn.functional.batch_norm(x, rm2, rv2, weight, bias, True, momentum, eps)
    torch_stats = max(_rel(rm1, _np(rm2)), _rel(rv1, _np(rv2)))
    # torch's own rounding, against the same float64 reference: where torch is the one off
    # (its channels-last CUDA kernel at x = 1e4 + noise: 2e-5), agreement is up to that
    torch_error = max(_rel(rm2, rm_ref), _rel(rv2, rv_ref))

    # evaluation with the running statistics, and its backward
    xx, w, b = grads(x, weight, bias)
    y = batch_norm(xx, rm, rv, w, b, training=False, eps=eps, backend=backend)
    y.backward(dy)
    y_ref, cache = F.batch_norm_inference(
        xr, _np(rm), _np(rv), ref_w, ref_b, eps, axis=1, backend="numpy"
    )
    dx_ref, dgamma_ref, dbeta_ref = F.batch_norm_backward(dyr, cache, backend="numpy")
    errors["eval y"], tol["eval y"] = _rel(y, y_ref), out_tol
    errors["eval dx"], tol["eval dx"] = _rel(xx.grad, dx_ref), out_tol
    if w is not None:
        x_hat = (xr - _np(rm).reshape(-1, *(1,) * (x.dim() - 2))) / np.sqrt(
            _np(rv).reshape(-1, *(1,) * (x.dim() - 2)) + eps
        )
        errors["eval dgamma"] = _rel(
            w.grad, dgamma_ref, np.abs(dyr * x_hat).sum(reduce_axes).max()
        )
        errors["eval dbeta"] = _rel(b.grad, dbeta_ref, np.abs(dyr).sum(reduce_axes).max())
        tol["eval dgamma"] = tol["eval dbeta"] = sum_tol
    ok = all(errors[k] <= tol[k] for k in errors) and torch_stats <= sum_tol + torch_error
    return dict(
        case=case.name,
        errors=errors,
        tolerances=tol,
        ok=bool(ok and deterministic),
        deterministic=bool(deterministic),
        torch_running_stats=torch_stats,
        torch_running_stats_error=torch_error,
        memory_format_kept=bool(y.stride() == x.stride()),
    )
