"""Fused, multi-threaded batch-normalization kernels (numba).

Every layout is one of two views of a C-contiguous array:

* channels-first ``(N, C, L)``: NCHW (L = H*W) and (N, C, L); the N*C contiguous slabs
  of length L are split over threads;
* channels-last ``(M, C)``: NHWC (M = N*H*W) and (N, C); tiles of rows x channels are split
  over threads, each tile keeping its per-channel partial sums in a row of its own.

Each operation is one compiled call: a parallel reduction, a short serial combination of
the partial sums (C values), then a parallel elementwise pass. Memory passes over the
tensor (the cost that matters; BN does almost no arithmetic):

* training forward: read x for the statistics, read x and write y  (3)
* backward: read x and dy for both reductions, read both and write dx  (5)
* inference: read x, write y  (2)

Statistics are accumulated in float64 as sums of ``x - k`` and ``(x - k)^2`` with ``k`` one
sample of the channel, so ``E[x^2] - E[x]^2`` cannot cancel the variance away
(``x = 1e4 + noise`` keeps it). Elementwise passes run in the input's precision and always
subtract the mean first (``(x - mean) * a + beta``), never ``x * a + (beta - mean * a)``,
which would cancel in float32 for a large common offset.

Threads: tensors of at least ``PARALLEL_MIN_SIZE`` elements use all of numba's threads
(or ``bnlab.kernels.num_threads(n)``); smaller ones run on the calling thread, where
waking a thread pool costs more than it saves. Between GEMMs there is a worse cost:
OpenBLAS threads keep spinning after each matrix product and fight numba's threads for
the cores. Measured on 2 cores: the paper's MLP step took 44 ms with two kernel threads
against 0.7 ms with one; a CNN with 64x64x32x32 BN tensors 353 ms against 238 ms. So
``bnlab.train`` runs the kernels on one thread; a pure-BN workload (``bnlab bench``) uses
all of them. A caller with its own threads passes a :class:`Threads` policy instead:
``bnlab.torch`` goes parallel from torch's grain size, capped at torch's thread count
(measured in docs/performance.md).

Compiled functions are cached on disk (``cache=True``): the first use in a fresh
environment compiles them (tools/compile_times.py measures it); later processes load
them in well under a second.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads

from .memory import OUTPUTS

# Reassociation lets LLVM vectorize the reductions; no flags that would drop NaN/inf handling.
_FM = {"reassoc", "contract"}


@njit(cache=True)
def _combine(S, Q, shift, m, eps):
    """Partial shifted sums (parts, C) -> float64 mean, biased var, inv_std (C,)."""
    C = S.shape[1]
    mean = np.empty(C)
    var = np.empty(C)
    for c in range(C):
        s = 0.0
        q = 0.0
        for p in range(S.shape[0]):
            s += S[p, c]
            q += Q[p, c]
        d = s / m
        mean[c] = shift[c] + d
        var[c] = max(q / m - d * d, 0.0)
    return mean, var, 1.0 / np.sqrt(var + eps)


@njit(inline="always")
def _act(v, relu):
    """The activation after BN: identity, or ReLU (NaN stays NaN, as torch's)."""
    return v - v if relu and v < 0 else v  # v - v: +0.0 in v's type


@njit(inline="always")
def _gate(g, xv, mu, za, zb, relu):
    """dy through the activation: 0 where ReLU's input (x - mu) * za + zb is not > 0."""
    return g - g if relu and not (xv - mu) * za + zb > 0 else g


@njit(cache=True)
def _dx_coefficients(dbeta, dgamma, inv_std, gamma, m, batch_stats):
    """dx = A * dy + B * (x - mean) + D per channel (see batch_norm_backward's formula)."""
    k = gamma * inv_std
    if not batch_stats:
        return k, np.zeros_like(k), np.zeros_like(k)
    return k, -k * inv_std * dgamma / m, -k * dbeta / m


# --- channels-first (N, C, L) --------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=_FM)
def _cf_sums(x):
    """Partial shifted sums (N, C) of x - k and (x - k)^2, and the shift k (C,)."""
    N, C, L = x.shape
    shift = np.empty(C)
    for c in range(C):
        shift[c] = x[0, c, 0]
    S = np.empty((N, C))
    Q = np.empty((N, C))
    for t in prange(N * C):
        n, c = t // C, t % C
        k = shift[c]
        s = 0.0
        q = 0.0
        for i in range(L):
            v = np.float64(x[n, c, i]) - k
            s += v
            q += v * v
        S[n, c] = s
        Q[n, c] = q
    return S, Q, shift


@njit(cache=True, fastmath=_FM)  # calls the parallel passes
def _cf_forward(x, gamma, beta, eps, out, relu):
    S, Q, shift = _cf_sums(x)
    mean, var, inv_std = _combine(S, Q, shift, x.shape[0] * x.shape[2], eps)
    _cf_normalize(x, mean, inv_std, gamma, beta, out, relu)
    return mean, var, inv_std


@njit(cache=True, fastmath=_FM)  # calls the parallel passes
def _cf_moments(x):
    S, Q, shift = _cf_sums(x)
    mean, var, _ = _combine(S, Q, shift, x.shape[0] * x.shape[2], 1.0)
    return mean, var


@njit(parallel=True, cache=True, fastmath=_FM)
def _cf_normalize(x, mean, inv_std, gamma, beta, out, relu):
    """out = act((x - mean) * (gamma * inv_std) + beta), in x's precision."""
    N, C, L = x.shape
    for t in prange(N * C):
        n, c = t // C, t % C
        mu = x.dtype.type(mean[c])
        a = x.dtype.type(gamma[c] * inv_std[c])
        b = x.dtype.type(beta[c])
        for i in range(L):
            out[n, c, i] = _act((x[n, c, i] - mu) * a + b, relu)


@njit(parallel=True, cache=True, fastmath=_FM)
def _cf_grad_sums(x, dy, mean, za, zb, relu):
    """sum(g) and sum(g * (x - mean)) per channel, float64 (C,) each; g = dy, or with
    ``relu`` dy gated by the ReLU after BN (input (x - mean) * za + zb)."""
    N, C, L = x.shape
    S = np.empty((N, C))
    P = np.empty((N, C))
    for t in prange(N * C):
        n, c = t // C, t % C
        mu = mean[c]
        s = 0.0
        p = 0.0
        for i in range(L):
            g = _gate(np.float64(dy[n, c, i]), np.float64(x[n, c, i]), mu, za[c], zb[c], relu)
            s += g
            p += g * (np.float64(x[n, c, i]) - mu)
        S[n, c] = s
        P[n, c] = p
    return S.sum(axis=0), P.sum(axis=0)


@njit(cache=True, fastmath=_FM)  # calls the parallel passes
def _cf_backward(x, dy, mean, inv_std, gamma, batch_stats, out, beta, relu):
    za = gamma * inv_std
    dbeta, p = _cf_grad_sums(x, dy, mean, za, beta, relu)
    dgamma = p * inv_std
    A, B, D = _dx_coefficients(dbeta, dgamma, inv_std, gamma, x.shape[0] * x.shape[2], batch_stats)
    _cf_dx(x, dy, mean, A, B, D, out, za, beta, relu)
    return dgamma, dbeta


@njit(parallel=True, cache=True, fastmath=_FM)
def _cf_dx(x, dy, mean, A, B, D, out, za, zb, relu):
    """out = A * g + B * (x - mean) + D, in x's precision (g: dy, gated as in
    :func:`_cf_grad_sums`)."""
    N, C, L = x.shape
    for t in prange(N * C):
        n, c = t // C, t % C
        mu = x.dtype.type(mean[c])
        a, b, d = x.dtype.type(A[c]), x.dtype.type(B[c]), x.dtype.type(D[c])
        za_, zb_ = x.dtype.type(za[c]), x.dtype.type(zb[c])
        for i in range(L):
            xv = x[n, c, i]
            g = _gate(dy[n, c, i], xv, mu, za_, zb_, relu)
            out[n, c, i] = a * g + b * (xv - mu) + d


# --- channels-last (M, C) ------------------------------------------------------------------
# Inner loops run over per-row slices with range(n): numba then knows the index is
# non-negative and skips the negative-index wraparound that would block vectorization.


@njit(cache=True)
def _tile(t, cb, M, C, rb):
    """Rows [r0, r1) and channels [c0, c1) of tile t in an rb x cb grid."""
    rows_per, cols_per = (M + rb - 1) // rb, (C + cb - 1) // cb
    i, j = t // cb, t % cb
    r0, c0 = i * rows_per, j * cols_per
    return i, r0, min(M, r0 + rows_per), c0, min(C, c0 + cols_per)


@njit(parallel=True, cache=True, fastmath=_FM)
def _cl_sums(x, rb, cb):
    """Partial shifted sums (rb, C) of x - k and (x - k)^2, and the shift k (C,)."""
    M, C = x.shape
    shift = np.empty(C)
    for c in range(C):
        shift[c] = x[0, c]
    S = np.zeros((rb, C))
    Q = np.zeros((rb, C))
    for t in prange(rb * cb):
        i, r0, r1, c0, c1 = _tile(t, cb, M, C, rb)
        s, q, k = S[i, c0:c1], Q[i, c0:c1], shift[c0:c1]
        r = r0
        while r + 4 <= r1:  # four rows per accumulator update: 4x fewer loads/stores of s, q
            x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
            for c in range(x0.shape[0]):
                v0, v1 = np.float64(x0[c]) - k[c], np.float64(x1[c]) - k[c]
                v2, v3 = np.float64(x2[c]) - k[c], np.float64(x3[c]) - k[c]
                s[c] += (v0 + v1) + (v2 + v3)
                q[c] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
            r += 4
        for rest in range(r, r1):
            xr = x[rest, c0:c1]
            for c in range(xr.shape[0]):
                v = np.float64(xr[c]) - k[c]
                s[c] += v
                q[c] += v * v
    return S, Q, shift


@njit(cache=True, fastmath=_FM)  # calls the parallel passes
def _cl_forward(x, gamma, beta, eps, out, relu, rb, cb):
    S, Q, shift = _cl_sums(x, rb, cb)
    mean, var, inv_std = _combine(S, Q, shift, x.shape[0], eps)
    _cl_normalize(x, mean, inv_std, gamma, beta, out, relu, rb, cb)
    return mean, var, inv_std


@njit(cache=True, fastmath=_FM)  # calls the parallel passes
def _cl_moments(x, rb, cb):
    S, Q, shift = _cl_sums(x, rb, cb)
    mean, var, _ = _combine(S, Q, shift, x.shape[0], 1.0)
    return mean, var


@njit(parallel=True, cache=True, fastmath=_FM)
def _cl_normalize(x, mean, inv_std, gamma, beta, out, relu, rb, cb):
    """out = act((x - mean) * (gamma * inv_std) + beta), in x's precision."""
    M, C = x.shape
    mu = mean.astype(x.dtype)
    a = (gamma * inv_std).astype(x.dtype)
    b = beta.astype(x.dtype)
    for t in prange(rb * cb):
        _, r0, r1, c0, c1 = _tile(t, cb, M, C, rb)
        mu_, a_, b_ = mu[c0:c1], a[c0:c1], b[c0:c1]
        for r in range(r0, r1):
            xr, yr = x[r, c0:c1], out[r, c0:c1]
            for c in range(xr.shape[0]):
                yr[c] = _act((xr[c] - mu_[c]) * a_[c] + b_[c], relu)


@njit(parallel=True, cache=True, fastmath=_FM)
def _cl_grad_sums(x, dy, mean, za, zb, relu, rb, cb):
    """sum(g) and sum(g * (x - mean)) per channel, float64 (C,) each (g: dy, gated as in
    :func:`_cf_grad_sums`)."""
    M, C = x.shape
    S = np.zeros((rb, C))
    P = np.zeros((rb, C))
    for t in prange(rb * cb):
        i, r0, r1, c0, c1 = _tile(t, cb, M, C, rb)
        s, p, mu = S[i, c0:c1], P[i, c0:c1], mean[c0:c1]
        za_, zb_ = za[c0:c1], zb[c0:c1]
        r = r0
        while r + 4 <= r1:  # as in _cl_forward
            x0, x1, x2, x3 = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
            g0, g1, g2, g3 = dy[r, c0:c1], dy[r + 1, c0:c1], dy[r + 2, c0:c1], dy[r + 3, c0:c1]
            for c in range(x0.shape[0]):
                m, u, v = mu[c], za_[c], zb_[c]
                a0 = _gate(np.float64(g0[c]), np.float64(x0[c]), m, u, v, relu)
                a1 = _gate(np.float64(g1[c]), np.float64(x1[c]), m, u, v, relu)
                a2 = _gate(np.float64(g2[c]), np.float64(x2[c]), m, u, v, relu)
                a3 = _gate(np.float64(g3[c]), np.float64(x3[c]), m, u, v, relu)
                s[c] += (a0 + a1) + (a2 + a3)
                p[c] += (a0 * (np.float64(x0[c]) - mu[c]) + a1 * (np.float64(x1[c]) - mu[c])) + (
                    a2 * (np.float64(x2[c]) - mu[c]) + a3 * (np.float64(x3[c]) - mu[c])
                )
            r += 4
        for rest in range(r, r1):
            xr, gr = x[rest, c0:c1], dy[rest, c0:c1]
            for c in range(xr.shape[0]):
                g = _gate(np.float64(gr[c]), np.float64(xr[c]), mu[c], za_[c], zb_[c], relu)
                s[c] += g
                p[c] += g * (np.float64(xr[c]) - mu[c])
    return S.sum(axis=0), P.sum(axis=0)


@njit(cache=True, fastmath=_FM)  # calls the parallel passes
def _cl_backward(x, dy, mean, inv_std, gamma, batch_stats, out, beta, relu, rb, cb):
    za = gamma * inv_std
    dbeta, p = _cl_grad_sums(x, dy, mean, za, beta, relu, rb, cb)
    dgamma = p * inv_std
    A, B, D = _dx_coefficients(dbeta, dgamma, inv_std, gamma, x.shape[0], batch_stats)
    _cl_dx(x, dy, mean, A, B, D, out, za, beta, relu, rb, cb)
    return dgamma, dbeta


@njit(parallel=True, cache=True, fastmath=_FM)
def _cl_dx(x, dy, mean, A, B, D, out, za, zb, relu, rb, cb):
    """out = A * g + B * (x - mean) + D, in x's precision (g: dy, gated as in
    :func:`_cf_grad_sums`)."""
    M, C = x.shape
    mu = mean.astype(x.dtype)
    A, B, D = A.astype(x.dtype), B.astype(x.dtype), D.astype(x.dtype)
    za, zb = za.astype(x.dtype), zb.astype(x.dtype)
    for t in prange(rb * cb):
        _, r0, r1, c0, c1 = _tile(t, cb, M, C, rb)
        mu_, A_, B_, D_ = mu[c0:c1], A[c0:c1], B[c0:c1], D[c0:c1]
        za_, zb_ = za[c0:c1], zb[c0:c1]
        for r in range(r0, r1):
            xr, gr, dr = x[r, c0:c1], dy[r, c0:c1], out[r, c0:c1]
            for c in range(xr.shape[0]):
                g = _gate(gr[c], xr[c], mu_[c], za_[c], zb_[c], relu)
                dr[c] = A_[c] * g + B_[c] * (xr[c] - mu_[c]) + D_[c]


# --- dispatch (called by bnlab.functional with validated float32/float64 arrays) -----------

PARALLEL_MIN_SIZE = 1 << 20  # elements (4 MiB of float32); see the module docstring


def _threads_from_env() -> int | None:
    """``BNLAB_NUM_THREADS``: a positive integer cap for the whole process; unset: no cap."""
    text = os.environ.get("BNLAB_NUM_THREADS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"BNLAB_NUM_THREADS must be a positive integer, got {text!r}")
    return int(text)


# set by bnlab.kernels.num_threads(); None: all of numba's threads
max_threads: int | None = _threads_from_env()


class Threads(NamedTuple):
    """A caller's thread policy: at most ``cap`` threads (None: no cap of its own) for
    tensors of at least ``parallel_min_size`` elements (None: ``PARALLEL_MIN_SIZE``)."""

    cap: int | None = None
    parallel_min_size: int | None = None


def _run(kernel, size: int, policy: Threads, *args):
    """Call ``kernel`` on up to min(cap, ``max_threads``, numba's) threads for large inputs,
    on the calling thread for small ones."""
    least = PARALLEL_MIN_SIZE if policy.parallel_min_size is None else policy.parallel_min_size
    caps = [n for n in (policy.cap, max_threads) if n is not None]
    threads = 1 if size < least else min(caps + [get_num_threads()])
    previous = get_num_threads()
    if threads == previous:
        return kernel(*args)
    set_num_threads(min(threads, previous))
    try:
        return kernel(*args)
    finally:
        set_num_threads(previous)


def _view(x: np.ndarray, axis: int):
    """A contiguous (N, C, L) or (M, C) view of ``x`` with channels on ``axis``."""
    x = np.ascontiguousarray(x)
    axis %= x.ndim
    C = x.shape[axis]
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    if inner == 1:
        return x.reshape(outer, C), True
    return x.reshape(outer, C, inner), False


_CHANNEL_TILE = 512  # channels per tile: the tile's float64 partial sums stay in L1


def _tiles(M: int, C: int) -> tuple[int, int]:
    """(row blocks, channel blocks) giving every thread a few tiles."""
    cb = max(1, C // _CHANNEL_TILE)
    rb = max(1, min(M, -(-4 * get_num_threads() // cb)))
    return rb, cb


def _call(v, last: bool, policy: Threads, cl_kernel, cf_kernel, *args):
    """Run the channels-last or channels-first kernel on view ``v`` (tiles for the former)."""
    if last:
        return _run(cl_kernel, v.size, policy, v, *args, *_tiles(*v.shape))
    return _run(cf_kernel, v.size, policy, v, *args)


def _params(gamma, beta, C):
    g = np.ones(C) if gamma is None else gamma.astype(np.float64)
    b = np.zeros(C) if beta is None else beta.astype(np.float64)
    return g, b


def _out(out, v):
    """A new array like ``v`` (large ones on reused memory, :mod:`bnlab.kernels.memory`), or
    ``out`` (any C-contiguous array of x's shape and dtype, e.g. a NumPy view of a torch
    tensor) reshaped like ``v``."""
    if out is None:
        return OUTPUTS.empty(v.shape, v.dtype)
    if out.dtype != v.dtype or out.size != v.size or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous {v.dtype} array of {v.size} elements, "
            f"got {out.dtype} {out.shape}"
        )
    return out.reshape(v.shape)


ACTS = ("identity", "relu")  # activations fused into the passes (BatchNormAct2d)


def _relu(act: str) -> bool:
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return act == "relu"


def train_forward(
    x, gamma, beta, eps: float, axis: int, out=None, threads=Threads(), act: str = "identity"
):
    """y, mean, biased var, inv_std for x with channels on ``axis``; statistics float64 (C,).

    ``out``: where to write y (see :func:`_out`); y is returned in x's shape either way.
    ``threads``: the caller's :class:`Threads` policy (the same for every function here).
    ``act``: "identity" or "relu", applied to y in the same pass (BN followed by ReLU).
    """
    v, last = _view(x, axis)
    g, b = _params(gamma, beta, v.shape[1])
    out = _out(out, v)
    mean, var, inv_std = _call(
        v, last, threads, _cl_forward, _cf_forward, g, b, float(eps), out, _relu(act)
    )
    return out.reshape(x.shape), mean, var, inv_std


def inference(
    x, mean, inv_std, gamma, beta, axis: int, out=None, threads=Threads(), act: str = "identity"
):
    """y = act(gamma * (x - mean) * inv_std + beta), one pass (inv_std = 1/sqrt(var + eps))."""
    v, last = _view(x, axis)
    g, b = _params(gamma, beta, v.shape[1])
    mean, inv_std = mean.astype(np.float64), inv_std.astype(np.float64)
    out = _out(out, v)
    _call(v, last, threads, _cl_normalize, _cf_normalize, mean, inv_std, g, b, out, _relu(act))
    return out.reshape(x.shape)


def backward(
    dy,
    x,
    mean,
    inv_std,
    gamma,
    axis: int,
    batch_stats: bool,
    out=None,
    threads=Threads(),
    beta=None,
    act: str = "identity",
):
    """dx, dgamma, dbeta; the formula is :func:`bnlab.functional.batch_norm_backward`'s.

    ``act="relu"``: the gradient of ReLU(BN(x)) (``beta`` needed): dy is zeroed where the
    ReLU's input was not positive, recomputed from x in both passes (no saved output read).
    """
    v, last = _view(x, axis)
    d, _ = _view(dy.astype(x.dtype, copy=False), axis)
    g, b = _params(gamma, beta, v.shape[1])
    mean, inv_std = mean.astype(np.float64), inv_std.astype(np.float64)
    out = _out(out, v)
    dgamma, dbeta = _call(
        v,
        last,
        threads,
        _cl_backward,
        _cf_backward,
        d,
        mean,
        inv_std,
        g,
        batch_stats,
        out,
        b,
        _relu(act),
    )
    return out.reshape(x.shape), dgamma, dbeta


# --- pieces for distributed BN (bnlab.torch.SyncBatchNorm): local sums, global coefficients


def moments(x, axis: int, threads=Threads()):
    """Batch mean and biased var (float64, (C,)) of x with channels on ``axis``: the first
    half of :func:`train_forward`."""
    v, last = _view(x, axis)
    return _call(v, last, threads, _cl_moments, _cf_moments)


def grad_sums(dy, x, mean, axis: int, threads=Threads()):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel (float64, (C,)): the reductions
    of :func:`backward`."""
    v, last = _view(x, axis)
    d, _ = _view(dy.astype(x.dtype, copy=False), axis)
    C = v.shape[1]
    return _call(
        v,
        last,
        threads,
        _cl_grad_sums,
        _cf_grad_sums,
        d,
        mean.astype(np.float64),
        np.ones(C),
        np.zeros(C),
        False,
    )


def dx_from_sums(
    dy,
    x,
    mean,
    inv_std,
    gamma,
    sum_dy,
    sum_dy_xmu,
    count: int,
    axis: int,
    out=None,
    threads=Threads(),
):
    """dx of :func:`backward` (batch statistics) from given sums over ``count`` values per
    channel, e.g. summed over every process: the elementwise half of :func:`backward`."""
    v, last = _view(x, axis)
    d, _ = _view(dy.astype(x.dtype, copy=False), axis)
    g, _ = _params(gamma, None, v.shape[1])
    mean, inv_std = mean.astype(np.float64), inv_std.astype(np.float64)
    A, B, D = _dx_coefficients(
        np.asarray(sum_dy, np.float64),
        np.asarray(sum_dy_xmu, np.float64) * inv_std,
        inv_std,
        g,
        count,
        True,
    )
    out = _out(out, v)
    C = v.shape[1]
    _call(v, last, threads, _cl_dx, _cf_dx, d, mean, A, B, D, out, np.ones(C), np.zeros(C), False)
    return out.reshape(x.shape)


# --- BN + add + activation (BatchNormAddAct2d): one pass, a 1-bit ReLU mask ------------------
# y = act((x - mean) * a + b + r). The ReLU's mask is kept as bits in memory order (bit i of
# byte i // 8 for element i of x's memory), so the backward never reads y or z = BN(x) + r.
# The passes walk x's memory in contiguous chunks of a multiple of 8 elements (each chunk owns
# its bytes of the mask); element i's channel is (i // L) % C, tracked as the walk goes.


def mask_bytes(size: int) -> int:
    """Bytes of the 1-bit mask of ``size`` elements."""
    return (size + 7) // 8


@njit(cache=True)
def _chunk(p, parts, n, C, L):
    """Elements [i0, i1) of chunk p of ``parts`` (i0 a multiple of 8), and where i0 is: its
    position l in its channel's run of L values, and its channel c."""
    per = ((n + parts - 1) // parts + 7) // 8 * 8
    i0 = p * per
    slab = i0 // L
    return i0, min(n, i0 + per), i0 - slab * L, slab % C


@njit(inline="always")
def _next(l, c, run, C, L):
    """(l, c) after ``run`` more values of channel c."""
    l += run
    if l == L:
        return 0, c + 1 if c + 1 < C else 0
    return l, c


@njit(parallel=True, cache=True, fastmath=_FM)
def _add_act(x, r, out, bits, mean, a, b, C, L, relu, parts):
    """out = act((x - mean) * a + b + r) over flat x, r, out; with ``relu`` the bits of
    not out <= 0 (out > 0, or NaN: torch's ReLU backward passes dy where its output is NaN). mean, a, b: (C,) in x's dtype; L: values of a channel in a row (1: channels
    last)."""
    n = x.shape[0]
    for p in prange(parts):
        i0, i1, l, c = _chunk(p, parts, n, C, L)
        if relu:
            for j in range(i0 >> 3, (i1 + 7) >> 3):
                bits[j] = 0
        i = i0
        while i < i1:
            run = min(L - l, i1 - i)
            mu, aa, bb = mean[c], a[c], b[c]
            for j in range(i, i + run):
                v = _act((x[j] - mu) * aa + bb + r[j], relu)
                out[j] = v
                if relu and not v <= 0:  # NaN passes dy, as torch's ReLU backward
                    bits[j >> 3] |= np.uint8(1 << (j & 7))
            i += run
            l, c = _next(l, c, run, C, L)


@njit(parallel=True, cache=True, fastmath=_FM)
def _gate_sums(x, dy, bits, dr, mean, C, L, relu, parts):
    """g = dy where the mask bit is set (``relu``; else dy) written to dr, and per-channel
    sum(g), sum(g * (x - mean)) in float64 (C,) each."""
    n = x.shape[0]
    S = np.zeros((parts, C))
    P = np.zeros((parts, C))
    for p in prange(parts):
        i0, i1, l, c = _chunk(p, parts, n, C, L)
        i = i0
        while i < i1:
            run = min(L - l, i1 - i)
            mu = mean[c]
            s = 0.0
            q = 0.0
            for j in range(i, i + run):
                g = dy[j]
                if relu and not (bits[j >> 3] >> (j & 7)) & 1:
                    g = g - g
                dr[j] = g
                gg = np.float64(g)
                s += gg
                q += gg * (np.float64(x[j]) - mu)
            S[p, c] += s
            P[p, c] += q
            i += run
            l, c = _next(l, c, run, C, L)
    return S.sum(axis=0), P.sum(axis=0)


def _flat(x, axis: int):
    """x's memory as 1-D, with C and L (values of one channel in a row of memory)."""
    x = np.ascontiguousarray(x)
    axis %= x.ndim
    return x.reshape(-1), x.shape[axis], math.prod(x.shape[axis + 1 :])


def _parts() -> int:
    return 4 * get_num_threads()


def add_act_forward(
    x,
    mean,
    inv_std,
    gamma,
    beta,
    residual,
    axis: int,
    out=None,
    bits=None,
    threads=Threads(),
    act: str = "relu",
):
    """y = act(gamma * (x - mean) * inv_std + beta + residual) in one pass over x and the
    residual (BN + add + ReLU, the tail of a ResNet block). With ``act="relu"`` the mask
    not y <= 0 (as torch's ReLU backward: dy passes where y > 0 or y is NaN) is written to ``bits`` (uint8, :func:`mask_bytes` of x.size; bit i of byte i // 8
    for element i of x's memory); returns (y, bits) (bits None for "identity")."""
    relu = _relu(act)
    v, C, L = _flat(x, axis)
    r = np.ascontiguousarray(residual, dtype=x.dtype).reshape(-1)
    if r.shape != v.shape:
        raise ValueError(f"residual must have x's shape {x.shape}, got {residual.shape}")
    g, b = _params(gamma, beta, C)
    a = (g * inv_std.astype(np.float64)).astype(v.dtype)
    out = _out(out, v)
    if bits is None:
        bits = np.empty(mask_bytes(v.size) if relu else 0, np.uint8)
    _run(
        _add_act,
        v.size,
        threads,
        v,
        r,
        out,
        bits,
        mean.astype(v.dtype),
        a,
        b.astype(v.dtype),
        C,
        L,
        relu,
        _parts(),
    )
    return out.reshape(x.shape), bits if relu else None


def add_act_backward(
    dy,
    x,
    bits,
    mean,
    inv_std,
    gamma,
    axis: int,
    batch_stats: bool,
    out=None,
    out_residual=None,
    threads=Threads(),
    act: str = "relu",
):
    """Gradients of :func:`add_act_forward`: g = dy gated by the mask bits (ReLU) is the
    residual's gradient; dx, dgamma, dbeta are BN's for g (:func:`backward`'s formula).
    Two passes: the gated sums (writing g), then dx. Returns (dx, d_residual, dgamma,
    dbeta)."""
    relu = _relu(act)
    v, C, L = _flat(x, axis)
    d = np.ascontiguousarray(dy, dtype=x.dtype).reshape(-1)
    g, _ = _params(gamma, None, C)
    mean, inv_std = mean.astype(np.float64), inv_std.astype(np.float64)
    dr = _out(out_residual, v)
    dbeta, p = _run(
        _gate_sums,
        v.size,
        threads,
        v,
        d,
        bits if relu else np.empty(0, np.uint8),
        dr,
        mean,
        C,
        L,
        relu,
        _parts(),
    )
    dgamma = p * inv_std
    view, last = _view(x, axis)
    A, B, D = _dx_coefficients(dbeta, dgamma, inv_std, g, v.size // C, batch_stats)
    dx = _out(out, view)
    _call(
        view,
        last,
        threads,
        _cl_dx,
        _cf_dx,
        dr.reshape(view.shape),
        mean,
        A,
        B,
        D,
        dx,
        np.ones(C),
        np.zeros(C),
        False,
    )
    return dx.reshape(x.shape), dr.reshape(x.shape), dgamma, dbeta
