"""Batch-normalization kernels for GPUs (Triton), on torch tensors.

The same math as :mod:`bnlab.kernels.numba_bn` (and :mod:`bnlab.functional`, the
reference), written for Triton 3.6 and newer. On CUDA tensors they compile for the GPU; on
CPU tensors they run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), which is how ``make test`` checks them.

Layouts. Every input is one strided view ``x[n, c, l]`` at ``n*sN + c*sC + l*sL``:

* channels-first: NCHW, NCDHW and (N, C, L) contiguous, L = the spatial size,
  strides (C*L, L, 1);
* channels-last: NHWC / NDHWC memory (``torch.channels_last``) and (N, C), as an (M, C)
  matrix: n runs over the M = N*H*W rows, L = 1, strides (C, 1, 1).

A program works on 3-D tiles ``[BN, BC, BL]``: channels-first tiles are one channel's
``BN`` rows of ``BL`` contiguous values (BC = 1); channels-last tiles are ``BN`` rows of
``BC`` contiguous channels (BL = 1). So every load is contiguous in memory.

Grid. Programs are ``(channel block, part)``: each channel block's tiles are cut into ``P``
parts (many when C is small and N*L large), enough parts to give the GPU at most
``PROGRAMS_PER_SM`` programs per multiprocessor (rounded down: a grid never spills a second
wave of a few programs). Reductions write one partial per part
into a ``(2, P, C)`` float32 buffer, summed in a fixed order: results are the same from run
to run (no float atomics). Few partials (``P * BC <= FUSED_PARTIALS``) are summed by every
program of the next kernel; many (channels-last with small C: a thousand parts) once, by a
small kernel of their own, so that no program re-reads them all.

Passes over memory (the cost that matters; BN does almost no arithmetic), and launches:

* training forward: read x for the statistics, read x and write y (3); 2 launches (3 with
  many parts). The kernel that has the statistics also updates the running statistics.
* backward: read x and dy for the two reductions, read both and write dx (5); 2 launches
  (3 with many parts).
* inference: read x, write y (2); 1 launch.

Numerics. Statistics are Welford/Chan merges, so no result depends on which element comes
first or on a common offset: every lane of a tile keeps (count, mean, M2) of ``x - k``
(Welford's update per value), a part merges its lanes, and the parts are merged in a fixed
order by Chan's formula. ``k = x[0, c, 0]`` only shifts the values (it changes no
statistic): the batch mean is kept as the float32 pair ``k + d`` (``d`` the mean of
``x - k``; passed between kernels as one float64), and elementwise passes compute
``((x - k) - d) * scale + beta``: ``x - k`` is exact for values near ``k``, so a large
common offset costs no precision (a float32 mean would: its rounding alone is 5e-4 at 1e4).
Never ``x * scale + (beta - mean * scale)``, which cancels. Per-channel divisions and square
roots are IEEE-rounded (``div_rn``, ``sqrt_rn``). float16 and bfloat16 inputs are computed in
float32 and rounded once on the way out. (C,) parameters and buffers of any stride are read
and written through contiguous copies where they are not contiguous.

NaN guard (bnlab's contract): a training batch whose statistics are not finite in some
channel updates no running statistic and not ``num_batches_tracked``.
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl

from ..torch.layout import TRITON_DTYPES, memory_format
from . import triton_interpreted

DTYPES = TRITON_DTYPES  # inputs; statistics are float32
PROGRAMS_PER_SM = 8  # programs per multiprocessor to aim for
INTERPRETER_SMS = 4  # "multiprocessors" under TRITON_INTERPRET=1: small tests still split
MAX_PARTS = 1024  # parts per channel block
FUSED_PARTIALS = 1024  # at most this many partial sums (P * BC) per program: added in place
FINALIZE_PARTIALS = 4096  # partial sums read at a time when many parts are added once
# (both powers of two: block sizes are)
TILE_BYTES = 8192  # bytes of x per tile: 2048 float32 or 4096 float16 values


# --- device functions ------------------------------------------------------------------------


@triton.jit
def _channels(c_block, C, BC: tl.constexpr):
    cc = c_block * BC + tl.arange(0, BC)
    return cc, cc < C


@triton.jit
def _tile(
    t,
    TL,
    N,
    L,
    sN,
    sC,
    sL,
    c_block,
    C,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BL: tl.constexpr,
    INT64: tl.constexpr,
):
    """Offsets and mask [BN, BC, BL] of tile t of a channel block (tiles run over l first).

    BL = 1 is the (M, C) view (L = 1): then l is 0, said outright so that the compiler
    sees the offsets' alignment along the channels and vectorizes the loads."""
    c = c_block * BC + tl.arange(0, BC)[None, :, None]
    if BL == 1:
        n = t * BN + tl.arange(0, BN)[:, None, None]
        if INT64:
            n = n.to(tl.int64)
        return n * sN + c * sC, (n < N) & (c < C)  # [BN, BC, 1]
    nb = t // TL
    n = nb * BN + tl.arange(0, BN)[:, None, None]
    l = (t - nb * TL) * BL + tl.arange(0, BL)[None, None, :]
    if INT64:
        n = n.to(tl.int64)
    return n * sN + c * sC + l * sL, (n < N) & (c < C) & (l < L)


@triton.jit
def _parts(part_ptr, P, C, cc, c_mask, PB: tl.constexpr):
    """Sums over the P parts, in a fixed order, of the two partial sums of channels cc
    (part[0, p, c] and part[1, p, c]): [BC] each."""
    s1 = tl.zeros(cc.shape, dtype=tl.float32)
    s2 = tl.zeros(cc.shape, dtype=tl.float32)
    for p0 in range(0, P, PB):
        p = p0 + tl.arange(0, PB)[:, None]
        mask = (p < P) & c_mask[None, :]
        offset = p * C + cc[None, :]
        s1 += tl.sum(tl.load(part_ptr + offset, mask=mask, other=0.0), axis=0)
        s2 += tl.sum(tl.load(part_ptr + P * C + offset, mask=mask, other=0.0), axis=0)
    return s1, s2


@triton.jit
def _batch_stats(x_ptr, part_ptr, P, C, sC, cc, c_mask, m, PB: tl.constexpr):
    """Batch mean as the pair k + d (k = x[0, c, 0], d = mean of x - k) and biased var,
    from the parts' (count, mean, M2) of x - k (part[0..2, p, c]), merged in a fixed
    order: each block of PB parts at once, then into the running total by Chan's formula."""
    n = tl.zeros(cc.shape, dtype=tl.float32)
    d = tl.zeros(cc.shape, dtype=tl.float32)
    m2 = tl.zeros(cc.shape, dtype=tl.float32)
    for p0 in range(0, P, PB):
        p = p0 + tl.arange(0, PB)[:, None]
        mask = (p < P) & c_mask[None, :]
        offset = p * C + cc[None, :]
        bn = tl.load(part_ptr + offset, mask=mask, other=0.0)
        bmu = tl.load(part_ptr + P * C + offset, mask=mask, other=0.0)
        bm2 = tl.load(part_ptr + 2 * P * C + offset, mask=mask, other=0.0)
        n_b, d_b, m2_b = _merge_lanes(bn, bmu, bm2, 0)
        n, d, m2 = _chan(n, d, m2, n_b, d_b, m2_b)
    k = tl.load(x_ptr + cc * sC, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.maximum(
        tl.div_rn(m2, m), 0.0, propagate_nan=tl.PropagateNan.ALL
    )  # NaN stays NaN, as in torch
    return k, d, var


@triton.jit
def _merge_lanes(n, mu, m2, axis: tl.constexpr):
    """(count, mean, M2) of several groups merged along ``axis``: the pooled mean and
    M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)."""
    total = tl.sum(n, axis=axis)
    mean = tl.sum(n * mu, axis=axis) / tl.maximum(total, 1.0)
    dev = mu - tl.expand_dims(mean, axis)
    return total, mean, tl.sum(m2 + n * dev * dev, axis=axis)


@triton.jit
def _chan(n_a, mu_a, m2_a, n_b, mu_b, m2_b):
    """Chan's merge of two (count, mean, M2)."""
    n = n_a + n_b
    delta = mu_b - mu_a
    w = n_b / tl.maximum(n, 1.0)
    return n, mu_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _split(mean):
    """A float64 mean [BC] as float32 hi + lo."""
    hi = mean.to(tl.float32)
    return hi, (mean - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def _gate(dy, x, hi, lo, za, zb, RELU: tl.constexpr):
    """dy through the activation after BN: with RELU, 0 where its input
    ((x - hi) - lo) * za + zb was not positive (recomputed from x: no saved output read)."""
    if RELU:
        dy = tl.where(((x - hi) - lo) * za + zb > 0, dy, 0.0)
    return dy


@triton.jit
def _act_input(
    inv_std_ptr,
    w_ptr,
    b_ptr,
    cc,
    c_mask,
    RELU: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    """za = w * inv_std and zb = b ([1, BC, 1] each): the activation's input is
    (x - mean) * za + zb (only read with RELU)."""
    za = tl.zeros(cc.shape, dtype=tl.float32)
    zb = tl.zeros(cc.shape, dtype=tl.float32)
    if RELU:
        za = tl.load(inv_std_ptr + cc, mask=c_mask, other=0.0)
        if HAS_W:
            za = za * tl.load(w_ptr + cc, mask=c_mask, other=1.0).to(tl.float32)
        if HAS_B:
            zb = tl.load(b_ptr + cc, mask=c_mask, other=0.0).to(tl.float32)
    return za[None, :, None], zb[None, :, None]


@triton.jit
def _finite(v):
    return tl.abs(v) < float("inf")  # False for NaN and +-inf


@triton.jit
def _update(rm_ptr, rv_ptr, cc, c_mask, ok, mean, unbiased_var, momentum):
    """running = (1 - momentum) * running + momentum * batch if ok (a scalar), else as is."""
    rm = tl.load(rm_ptr + cc, mask=c_mask, other=0.0)
    rv = tl.load(rv_ptr + cc, mask=c_mask, other=0.0)
    new_rm = (1.0 - momentum) * rm.to(tl.float32) + momentum * mean
    new_rv = (1.0 - momentum) * rv.to(tl.float32) + momentum * unbiased_var
    tl.store(rm_ptr + cc, tl.where(ok, new_rm.to(rm.dtype), rm), mask=c_mask)
    tl.store(rv_ptr + cc, tl.where(ok, new_rv.to(rv.dtype), rv), mask=c_mask)


@triton.jit
def _store_stats(
    mean_ptr,
    var_ptr,
    inv_std_ptr,
    rm_ptr,
    rv_ptr,
    nbt_ptr,
    bad_ptr,
    n_bad,
    c_block,
    cc,
    c_mask,
    mean_hi,
    mean_lo,
    var,
    inv_std,
    momentum,
    unbias,
    BADB: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_NBT: tl.constexpr,
):
    """Write a channel block's batch statistics (mean as float64 = hi + lo exactly) and,
    with UPDATE, the running statistics (unbiased var = var * unbias) if no channel's sums
    were non-finite (bad[] from _stats_kernel); channel block 0 counts the batch in nbt."""
    mean = mean_hi.to(tl.float64) + mean_lo.to(tl.float64)
    tl.store(mean_ptr + cc, mean, mask=c_mask)
    tl.store(var_ptr + cc, var, mask=c_mask)
    tl.store(inv_std_ptr + cc, inv_std, mask=c_mask)
    if UPDATE:
        i = tl.arange(0, BADB)
        ok = tl.sum(tl.load(bad_ptr + i, mask=i < n_bad, other=0)) == 0
        _update(rm_ptr, rv_ptr, cc, c_mask, ok, mean.to(tl.float32), var * unbias, momentum)
        if HAS_NBT:
            if c_block == 0:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + ok.to(tl.int64))


# --- kernels ---------------------------------------------------------------------------------
# Integer arguments that only bound loops are not specialized (fewer recompilations); the
# sizes and strides that decide vectorized loads (C, L, sN, sC, sL) are.


@triton.jit(do_not_specialize=["N", "TL", "T", "P"])
def _stats_kernel(
    x_ptr,
    part_ptr,
    bad_ptr,
    N,
    C,
    L,
    sN,
    sC,
    sL,
    TL,
    T,
    P,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BL: tl.constexpr,
    INT64: tl.constexpr,
):
    """Part p's (count, mean, M2) of x - k per channel (k = x[0, c, 0]) into part[0..2, p, c]:
    Welford's update in every lane of the tile, then the lanes merged; bad[p, c_block] =
    how many of the block's channels have a non-finite mean or M2."""
    c_block = tl.program_id(0)
    p = tl.program_id(1)
    cc, c_mask = _channels(c_block, C, BC)
    k = tl.load(x_ptr + cc * sC, mask=c_mask, other=0.0).to(tl.float32)[None, :, None]
    n = tl.zeros((BN, BC, BL), dtype=tl.float32)
    mu = tl.zeros((BN, BC, BL), dtype=tl.float32)
    m2 = tl.zeros((BN, BC, BL), dtype=tl.float32)
    for t in range(p * T // P, (p + 1) * T // P):
        offset, mask = _tile(t, TL, N, L, sN, sC, sL, c_block, C, BN, BC, BL, INT64)
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        n = n + mask.to(tl.float32)
        delta = tl.where(mask, (x - k) - mu, 0.0)
        mu = mu + delta / tl.maximum(n, 1.0)
        m2 = m2 + tl.where(mask, delta * ((x - k) - mu), 0.0)
    n, mu, m2 = _merge_lanes(n, mu, m2, 2)  # [BN, BC]
    n, mu, m2 = _merge_lanes(n, mu, m2, 0)  # [BC]
    tl.store(part_ptr + p * C + cc, n, mask=c_mask)
    tl.store(part_ptr + P * C + p * C + cc, mu, mask=c_mask)
    tl.store(part_ptr + 2 * P * C + p * C + cc, m2, mask=c_mask)
    bad = tl.where(c_mask & ~(_finite(mu) & _finite(m2)), 1, 0)
    tl.store(bad_ptr + p * tl.num_programs(0) + c_block, tl.sum(bad))


@triton.jit(do_not_specialize=["P", "n_bad"])
def _finalize_stats_kernel(
    x_ptr,
    part_ptr,
    bad_ptr,
    mean_ptr,
    var_ptr,
    inv_std_ptr,
    rm_ptr,
    rv_ptr,
    nbt_ptr,
    P,
    C,
    sC,
    n_bad,
    m,
    eps,
    momentum,
    unbias,
    BC: tl.constexpr,
    PB: tl.constexpr,
    BADB: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_NBT: tl.constexpr,
):
    """Batch statistics of a block of channels from many parts, once (not in every program
    of _normalize_kernel), with the running-statistics update."""
    c_block = tl.program_id(0)
    cc, c_mask = _channels(c_block, C, BC)
    k, d, var = _batch_stats(x_ptr, part_ptr, P, C, sC, cc, c_mask, m, PB)
    inv_std = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    _store_stats(
        mean_ptr,
        var_ptr,
        inv_std_ptr,
        rm_ptr,
        rv_ptr,
        nbt_ptr,
        bad_ptr,
        n_bad,
        c_block,
        cc,
        c_mask,
        k,
        d,
        var,
        inv_std,
        momentum,
        unbias,
        BADB,
        UPDATE,
        HAS_NBT,
    )


@triton.jit(do_not_specialize=["N", "TL", "T", "P", "n_bad"])
def _normalize_kernel(
    x_ptr,
    y_ptr,
    part_ptr,
    bad_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    var_ptr,
    stat_mean_ptr,
    stat_var_ptr,
    stat_inv_std_ptr,
    rm_ptr,
    rv_ptr,
    nbt_ptr,
    N,
    C,
    L,
    sN,
    sC,
    sL,
    TL,
    T,
    P,
    n_bad,
    m,
    eps,
    momentum,
    unbias,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BL: tl.constexpr,
    INT64: tl.constexpr,
    PB: tl.constexpr,
    BADB: tl.constexpr,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_NBT: tl.constexpr,
    RELU: tl.constexpr,
):
    """y = (x - mean) * (w * inv_std) + b over part p's tiles, inv_std = 1 / sqrt(var + eps);
    with RELU, max(y, 0) in the same pass (BatchNormAct2d).

    MODE 0 (training, few parts): mean and biased var from the partial sums (over m values
    per channel); the first part of each channel block stores them (_store_stats, with the
    running-statistics update). MODE 1 (training, many parts): mean and inv_std from
    _finalize_stats_kernel. MODE 2 (evaluation): mean and var given (running statistics);
    the first part stores mean (float64) and inv_std for the backward.
    """
    c_block = tl.program_id(0)
    p = tl.program_id(1)
    cc, c_mask = _channels(c_block, C, BC)
    if MODE == 0:  # mean = hi + lo exactly: x - mean is computed as (x - hi) - lo
        mean_hi, mean_lo, var = _batch_stats(x_ptr, part_ptr, P, C, sC, cc, c_mask, m, PB)
        inv_std = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    elif MODE == 1:
        mean_hi, mean_lo = _split(tl.load(stat_mean_ptr + cc, mask=c_mask, other=0.0))
        inv_std = tl.load(stat_inv_std_ptr + cc, mask=c_mask, other=0.0)
    else:  # a float64 mean (as SyncBatchNorm's global one) is split; others have lo = 0
        mean_hi, mean_lo = _split(tl.load(mean_ptr + cc, mask=c_mask, other=0.0).to(tl.float64))
        var = tl.load(var_ptr + cc, mask=c_mask, other=1.0).to(tl.float32)
        inv_std = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    scale = inv_std
    if HAS_W:
        scale = scale * tl.load(w_ptr + cc, mask=c_mask, other=1.0).to(tl.float32)
    beta = tl.zeros((BC,), dtype=tl.float32)
    if HAS_B:
        beta = tl.load(b_ptr + cc, mask=c_mask, other=0.0).to(tl.float32)
    hi3 = mean_hi[None, :, None]
    lo3 = mean_lo[None, :, None]
    scale3 = scale[None, :, None]
    beta3 = beta[None, :, None]
    for t in range(p * T // P, (p + 1) * T // P):
        offset, mask = _tile(t, TL, N, L, sN, sC, sL, c_block, C, BN, BC, BL, INT64)
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        y = ((x - hi3) - lo3) * scale3 + beta3
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
        tl.store(y_ptr + offset, y.to(y_ptr.dtype.element_ty), mask=mask)
    if p == 0:
        if MODE == 0:
            _store_stats(
                stat_mean_ptr,
                stat_var_ptr,
                stat_inv_std_ptr,
                rm_ptr,
                rv_ptr,
                nbt_ptr,
                bad_ptr,
                n_bad,
                c_block,
                cc,
                c_mask,
                mean_hi,
                mean_lo,
                var,
                inv_std,
                momentum,
                unbias,
                BADB,
                UPDATE,
                HAS_NBT,
            )
        elif MODE == 2:
            tl.store(
                stat_mean_ptr + cc, mean_hi.to(tl.float64) + mean_lo.to(tl.float64), mask=c_mask
            )
            tl.store(stat_inv_std_ptr + cc, inv_std, mask=c_mask)


@triton.jit(do_not_specialize=["N", "TL", "T", "P"])
def _grad_sums_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr,
    part_ptr,
    inv_std_ptr,
    w_ptr,
    b_ptr,
    bits_ptr,
    dr_ptr,
    N,
    C,
    L,
    sN,
    sC,
    sL,
    TL,
    T,
    P,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BL: tl.constexpr,
    INT64: tl.constexpr,
    RELU: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Partial sums: part[0, p, c] = sum(dy), part[1, p, c] = sum(dy * (x - mean)); with
    RELU, dy gated by the ReLU after BN (:func:`_gate`). MASKED (BN + add + ReLU): dy gated
    by the saved 1-bit mask instead (bit i of bits[i // 8] for element i of memory), and the
    gated dy (the residual's gradient) stored to dr."""
    c_block = tl.program_id(0)
    p = tl.program_id(1)
    cc, c_mask = _channels(c_block, C, BC)
    hi, lo = _split(tl.load(mean_ptr + cc, mask=c_mask, other=0.0))
    hi = hi[None, :, None]
    lo = lo[None, :, None]
    za, zb = _act_input(inv_std_ptr, w_ptr, b_ptr, cc, c_mask, RELU, HAS_W, HAS_B)
    s1 = tl.zeros((BN, BC, BL), dtype=tl.float32)
    s2 = tl.zeros((BN, BC, BL), dtype=tl.float32)
    for t in range(p * T // P, (p + 1) * T // P):
        offset, mask = _tile(t, TL, N, L, sN, sC, sL, c_block, C, BN, BC, BL, INT64)
        dy = tl.load(dy_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        dy = _gate(dy, x, hi, lo, za, zb, RELU)
        if MASKED:
            byte = tl.load(bits_ptr + (offset >> 3), mask=mask, other=0).to(tl.int32)
            dy = tl.where(((byte >> (offset & 7).to(tl.int32)) & 1) != 0, dy, 0.0)
            tl.store(dr_ptr + offset, dy.to(dr_ptr.dtype.element_ty), mask=mask)
        s1 += dy
        s2 += dy * tl.where(mask, (x - hi) - lo, 0.0)
    tl.store(part_ptr + p * C + cc, tl.sum(tl.sum(s1, axis=2), axis=0), mask=c_mask)
    tl.store(part_ptr + P * C + p * C + cc, tl.sum(tl.sum(s2, axis=2), axis=0), mask=c_mask)


@triton.jit(do_not_specialize=["P"])
def _finalize_grads_kernel(
    part_ptr, inv_std_ptr, dgamma_ptr, dbeta_ptr, P, C, BC: tl.constexpr, PB: tl.constexpr
):
    """dbeta = sum(dy), dgamma = inv_std * sum(dy * (x - mean)) from many parts, once."""
    cc, c_mask = _channels(tl.program_id(0), C, BC)
    dbeta, s_dyxmu = _parts(part_ptr, P, C, cc, c_mask, PB)
    inv_std = tl.load(inv_std_ptr + cc, mask=c_mask, other=0.0)
    tl.store(dgamma_ptr + cc, s_dyxmu * inv_std, mask=c_mask)
    tl.store(dbeta_ptr + cc, dbeta, mask=c_mask)


@triton.jit(do_not_specialize=["N", "TL", "T", "P"])
def _dx_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    part_ptr,
    mean_ptr,
    inv_std_ptr,
    w_ptr,
    b_ptr,
    dgamma_ptr,
    dbeta_ptr,
    N,
    C,
    L,
    sN,
    sC,
    sL,
    TL,
    T,
    P,
    m,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BL: tl.constexpr,
    INT64: tl.constexpr,
    PB: tl.constexpr,
    FUSED: tl.constexpr,
    HAS_W: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    RELU: tl.constexpr,
    HAS_B: tl.constexpr,
):
    """dx over part p's tiles.

        dbeta = sum(dy),  dgamma = sum(dy * x_hat) = inv_std * sum(dy * (x - mean))
        batch statistics:  dx = w * inv_std * (dy - dbeta / m - x_hat * dgamma / m)
        given statistics:  dx = w * inv_std * dy
    computed as dy * k1 + (x - mean) * k2 + k3 with per-channel k1, k2, k3. FUSED (few
    parts): dgamma and dbeta from the partial sums, stored by the first part; else read
    from _finalize_grads_kernel.
    """
    c_block = tl.program_id(0)
    p = tl.program_id(1)
    cc, c_mask = _channels(c_block, C, BC)
    inv_std = tl.load(inv_std_ptr + cc, mask=c_mask, other=0.0)
    if FUSED:
        dbeta, s_dyxmu = _parts(part_ptr, P, C, cc, c_mask, PB)
        dgamma = s_dyxmu * inv_std
        if p == 0:
            tl.store(dgamma_ptr + cc, dgamma, mask=c_mask)
            tl.store(dbeta_ptr + cc, dbeta, mask=c_mask)
    else:
        dgamma = tl.load(dgamma_ptr + cc, mask=c_mask, other=0.0)
        dbeta = tl.load(dbeta_ptr + cc, mask=c_mask, other=0.0)
    k1 = inv_std
    if HAS_W:
        k1 = k1 * tl.load(w_ptr + cc, mask=c_mask, other=1.0).to(tl.float32)
    hi, lo = _split(tl.load(mean_ptr + cc, mask=c_mask, other=0.0))
    hi = hi[None, :, None]
    lo = lo[None, :, None]
    k2 = tl.div_rn(-k1 * inv_std * dgamma, m)[None, :, None]
    k3 = tl.div_rn(-k1 * dbeta, m)[None, :, None]
    k1 = k1[None, :, None]
    za, zb = _act_input(inv_std_ptr, w_ptr, b_ptr, cc, c_mask, RELU, HAS_W, HAS_B)
    for t in range(p * T // P, (p + 1) * T // P):
        offset, mask = _tile(t, TL, N, L, sN, sC, sL, c_block, C, BN, BC, BL, INT64)
        dy = tl.load(dy_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        if BATCH_STATS or RELU:
            x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            dy = _gate(dy, x, hi, lo, za, zb, RELU)
        if BATCH_STATS:
            dx = dy * k1 + ((x - hi) - lo) * k2 + k3
        else:
            dx = dy * k1
        tl.store(dx_ptr + offset, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit  # n specialized: a multiple of 16 lets the loads be vectorized
def _add_act_kernel(
    x_ptr,
    r_ptr,
    y_ptr,
    bits_ptr,
    mean_ptr,
    inv_std_ptr,
    w_ptr,
    b_ptr,
    n,
    C,
    L,
    BLOCK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RELU: tl.constexpr,
    INT64: tl.constexpr,
):
    """y = act(((x - hi) - lo) * (w * inv_std) + b + r) over BLOCK elements of memory (any
    layout: element i is in channel (i // L) % C); with RELU the mask not y <= 0 as bits
    (torch's ReLU backward passes dy where y > 0 or y is NaN), one byte
    per 8 elements (BLOCK is a multiple of 8, so a program owns its bytes)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        i = i.to(tl.int64)
    inside = i < n
    c = (i // L) % C
    hi, lo = _split(tl.load(mean_ptr + c, mask=inside, other=0.0))
    scale = tl.load(inv_std_ptr + c, mask=inside, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=inside, other=1.0).to(tl.float32)
    x = tl.load(x_ptr + i, mask=inside, other=0.0).to(tl.float32)
    y = ((x - hi) - lo) * scale
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=inside, other=0.0).to(tl.float32)
    y = y + tl.load(r_ptr + i, mask=inside, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=inside)
    if RELU:
        on = tl.reshape((~(y <= 0) & inside).to(tl.int32), (BLOCK // 8, 8))  # NaN: 1
        byte = tl.sum(on << tl.arange(0, 8)[None, :], axis=1)
        j = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(bits_ptr + j, byte.to(tl.uint8), mask=j < (n + 7) // 8)


# --- host side -------------------------------------------------------------------------------


def check_device(x: torch.Tensor) -> None:
    """A clear error for a tensor these kernels cannot run on."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and triton_interpreted():
        return
    where = (
        "CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before "
        "bnlab imports Triton"
        if x.device.type == "cpu"
        else "CUDA tensors"
    )
    raise ValueError(f"the Triton kernels run on {where}; got a tensor on {x.device}")


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (``INTERPRETER_SMS`` for CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


class _Launch:
    """Grid and tile sizes for x (in memory format ``fmt``): the view (N, C, L) and its
    strides, tiles [BN, BC, BL], ``T`` tiles per channel block cut into ``P`` parts;
    ``fused``: few enough partial sums (P * BC) for every program to add them up itself,
    else one extra small kernel adds them once."""

    def __init__(self, x: torch.Tensor, fmt: torch.memory_format):
        self.fmt = fmt
        C = x.shape[1]
        spatial = math.prod(x.shape[2:])
        tile = TILE_BYTES // x.element_size()
        if fmt == torch.contiguous_format and spatial > 1:  # channels-first
            N, L = x.shape[0], spatial
            self.strides = (C * L, L, 1)
            BC, BL = 1, min(triton.next_power_of_2(L), 512)
            BN = max(1, min(triton.next_power_of_2(N), tile // BL))
        else:  # (M, C): channels-last memory, (N, C), or a spatial size of 1
            N, L = x.shape[0] * spatial, 1
            self.strides = (C, 1, 1)
            BL, BC = 1, min(triton.next_power_of_2(C), 128)
            BN = max(1, min(triton.next_power_of_2(N), tile // BC))
        self.N, self.C, self.L = N, C, L
        self.BN, self.BC, self.BL = BN, BC, BL
        self.TL = triton.cdiv(L, BL)
        self.T = triton.cdiv(N, BN) * self.TL
        blocks = triton.cdiv(C, BC)
        programs = PROGRAMS_PER_SM * multiprocessors(x.device)
        self.P = max(1, min(self.T, MAX_PARTS, programs // blocks))  # never past the wave
        self.grid = (blocks, self.P)
        self.fused = self.P * BC <= FUSED_PARTIALS
        self.PB = min(triton.next_power_of_2(self.P), max(1, FUSED_PARTIALS // BC))
        self.int64 = x.numel() >= 2**31
        self.num_warps = 8 if BN * BC * BL >= 4096 else 4
        self.m = N * L  # values per channel
        self.args = (N, C, L, *self.strides, self.TL, self.T, self.P)  # the kernels' sizes
        self.tiles = (BN, BC, BL, self.int64)  # and their first constexprs
        self.n_bad = blocks * self.P
        self.BADB = triton.next_power_of_2(self.n_bad)
        # the kernels that add up many parts: blocks of 8 channels (so that even C = 64 gets
        # 8 programs), each reading [PB, BC] partial sums at a time
        BC = min(triton.next_power_of_2(C), 8)
        self.finalize = (
            (triton.cdiv(C, BC),),
            BC,
            max(1, min(triton.next_power_of_2(self.P), FINALIZE_PARTIALS // BC)),
        )


# --- launching -------------------------------------------------------------------------------
# Host time matters as much as the kernels': a training step is four or five launches, and
# Triton's JIT launch path (binding and specializing some 40 arguments) costs ~25 us each, more
# than a small tensor's kernels take. So a host call's geometry is cached by shape, and its
# launches by everything that decides Triton's specialization of them (shapes and strides,
# dtypes, which tensors are None, pointer alignment to 16 bytes, flags): the first call goes
# through Triton's JIT (which compiles or finds the kernel), later ones launch the compiled
# kernel directly with the same arguments. Kernels take every parameter positionally,
# constexprs included, in the order of their definition, as Triton's own launcher does.

MAX_CACHED = 4096  # geometries or plans kept before a cache starts over
_GEOMETRIES: dict = {}
_PLANS: dict = {}


def clear_caches() -> None:
    """Forget cached geometries and launch plans (after changing the tile constants)."""
    _GEOMETRIES.clear()
    _PLANS.clear()


def _geometry(x: torch.Tensor, fmt: torch.memory_format) -> _Launch:
    key = (x.shape, fmt, x.dtype, x.device)
    run = _GEOMETRIES.get(key)
    if run is None:
        if len(_GEOMETRIES) >= MAX_CACHED:
            _GEOMETRIES.clear()
        run = _GEOMETRIES[key] = _Launch(x, fmt)
    return run


def _spec(t):
    """What Triton specializes a tensor argument on: dtype and 16-byte alignment."""
    return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)


def _plan(name: str, x: torch.Tensor, *items):
    """The compiled launches of host call ``name`` on x for these tensors and flags (a list,
    filled by the first call), or None where every launch goes through Triton's JIT (the
    interpreter, non-CUDA tensors)."""
    if x.device.type != "cuda" or triton_interpreted():
        return None
    key = (
        name,
        x.shape,
        x.stride(),
        x.dtype,
        x.device.index,
        x.data_ptr() % 16 == 0,
        *(_spec(t) if isinstance(t, torch.Tensor) or t is None else t for t in items),
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_CACHED:
            _PLANS.clear()
        plan = _PLANS[key] = []
    return plan


_direct = [True]  # launch compiled kernels directly (set False if this Triton refuses)


def _go(plan, i: int, kernel, grid: tuple, args: tuple, num_warps: int = 4) -> None:
    """Launch ``kernel`` on ``grid`` with ``args`` (every parameter, in order): launch ``i``
    of ``plan``, through the compiled kernel once the plan has it."""
    if plan is not None and i < len(plan) and _direct[0]:
        try:
            plan[i](*args)
            return
        except Exception as e:  # noqa: BLE001 - an API this Triton lacks: its JIT path
            _direct[0] = False
            warnings.warn(
                f"bnlab: launching compiled Triton kernels directly failed ({e!r}); "
                "using Triton's JIT launch path",
                RuntimeWarning,
                stacklevel=2,
            )
    compiled = kernel[grid](*args, num_warps=num_warps)
    if plan is not None and len(plan) == i and hasattr(compiled, "function"):
        plan.append(compiled[tuple(grid) + (1,) * (3 - len(grid))])


def _check(x: torch.Tensor, name: str = "x") -> None:
    check_device(x)
    if x.dtype not in DTYPES:
        raise TypeError(
            f"the Triton kernels take {name} as float32, float16 or bfloat16, got {x.dtype}"
        )
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(
            f"{name} must be (N, C, ...) with at least one element, got shape {tuple(x.shape)}"
        )


def _prepare(x, dy=None):
    """Checked x in its memory format (other strides copied), dy in the same layout (it
    may come in another), and the launch geometry."""
    _check(x)
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    if dy is not None:
        dy = dy.to(x.dtype).contiguous(memory_format=fmt)
    return x, dy, _geometry(x, fmt)


def _vec(t):
    """A (C,) parameter, statistic or buffer as the kernels index it: contiguous (a view
    like ``w[::2]`` is copied; a buffer copied so is written back by the caller)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _write_back(*pairs) -> None:
    """Each (buffer, its contiguous copy from :func:`_vec`) written back where they differ."""
    for buf, k in pairs:
        if buf is not k:
            buf.copy_(k)


def _stats_like(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(x.shape[1], dtype=dtype, device=x.device)


def _relu(act: str) -> bool:
    if act not in ("identity", "relu"):
        raise ValueError(f'act must be "identity" or "relu", got {act!r}')
    return act == "relu"


def _aligned(*tensors) -> bool:
    """Fresh allocations are 16-byte aligned (torch's caching allocator: 512)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _statistics_buffers(x: torch.Tensor, run: _Launch):
    """The statistics launches' outputs: the parts (3, P, C), the bad flags, and the (C,)
    mean (float64), var and inv_std (float32)."""
    parts = torch.empty((3, run.P, run.C), dtype=torch.float32, device=x.device)
    bad = torch.empty(run.grid, dtype=torch.int32, device=x.device)
    return parts, bad, _stats_like(x, torch.float64), _stats_like(x), _stats_like(x)


def _launch_statistics(
    plan, x, run: _Launch, buffers, rm, rv, nbt, eps: float, momentum: float, finalize: bool
) -> None:
    """Launch 0: every part's (count, mean, M2); with ``finalize``, launch 1: the batch
    statistics from them, with the running-statistics update when ``rm``/``rv`` are given
    (and ``nbt`` counted)."""
    parts, bad, mean, var, inv_std = buffers
    _go(plan, 0, _stats_kernel, run.grid, (x, parts, bad, *run.args, *run.tiles), run.num_warps)
    if finalize:
        update = rm is not None and rv is not None
        grid, BC, PB = run.finalize
        _go(
            plan,
            1,
            _finalize_stats_kernel,
            grid,
            (
                x,
                parts,
                bad,
                mean,
                var,
                inv_std,
                rm,
                rv,
                nbt,
                run.P,
                run.C,
                run.strides[1],
                run.n_bad,
                float(run.m),
                float(eps),
                float(momentum),
                run.m / max(run.m - 1, 1),
                BC,
                PB,
                run.BADB,
                update,
                update and nbt is not None,
            ),
        )


def train_forward(
    x,
    weight,
    bias,
    eps: float,
    running_mean=None,
    running_var=None,
    num_batches_tracked=None,
    momentum: float = 0.1,
    act: str = "identity",
):
    """Training forward with batch statistics, the running-statistics update fused in.

        mean = E[x], var = E[(x - mean)^2] (biased), over every axis but 1
        y = (x - mean) / sqrt(var + eps) * weight + bias

    Two launches (three when the reductions are cut into many parts).

    Args:
        x: (N, C, ...) float32/float16/bfloat16, contiguous or channels-last (other
           strides are copied).
        weight, bias: (C,) or None (1 and 0).
        running_mean, running_var: (C,) or None; updated in place with
           ``(1 - momentum) * running + momentum * batch`` (unbiased var), and
           ``num_batches_tracked`` (or None) incremented, unless a channel's statistics are
           not finite.
        act: "identity" or "relu" (ReLU applied to y in the same pass: BatchNormAct2d).

    Returns:
        y (x's shape, dtype and memory format); (C,) mean (float64: the float32 pair k + d,
        exactly), var (biased) and inv_std (float32).
    """
    x, _, run = _prepare(x)
    relu = _relu(act)
    weight, bias = _vec(weight), _vec(bias)
    rm, rv = _vec(running_mean), _vec(running_var)  # contiguous: written back below
    buffers = _statistics_buffers(x, run)
    parts, bad, mean, var, inv_std = buffers
    y = torch.empty_like(x, memory_format=run.fmt)
    update = rm is not None and rv is not None
    has_nbt = update and num_batches_tracked is not None
    plan = _plan(
        "train",
        x,
        weight,
        bias,
        rm,
        rv,
        num_batches_tracked,
        has_nbt,
        relu,
        _aligned(parts, bad, y, mean, var, inv_std),
    )
    m, unbias = float(run.m), run.m / max(run.m - 1, 1)
    eps, momentum = float(eps), float(momentum)
    _launch_statistics(
        plan, x, run, buffers, rm, rv, num_batches_tracked, eps, momentum, finalize=not run.fused
    )
    _go(
        plan,
        1 + (not run.fused),
        _normalize_kernel,
        run.grid,
        (
            x,
            y,
            parts,
            bad,
            weight,
            bias,
            None,
            None,
            mean,
            var,
            inv_std,
            rm,
            rv,
            num_batches_tracked,
            *run.args,
            run.n_bad,
            m,
            eps,
            momentum,
            unbias,
            *run.tiles,
            run.PB,
            run.BADB,
            0 if run.fused else 1,
            weight is not None,
            bias is not None,
            update,
            has_nbt,
            relu,
        ),
        run.num_warps,
    )
    _write_back((running_mean, rm), (running_var, rv))
    return y, mean, var, inv_std


def inference(x, mean, var, weight, bias, eps: float, act: str = "identity"):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with given (C,) statistics (any float
    dtype); one launch. Returns y and (C,) copies of mean (float64) and inv_std (float32),
    for the backward."""
    x, _, run = _prepare(x)
    relu = _relu(act)
    mean, var, weight, bias = _vec(mean), _vec(var), _vec(weight), _vec(bias)
    y = torch.empty_like(x, memory_format=run.fmt)
    mean_out, inv_std = _stats_like(x, torch.float64), _stats_like(x)
    plan = _plan("inference", x, mean, var, weight, bias, relu, _aligned(y, mean_out, inv_std))
    _go(
        plan,
        0,
        _normalize_kernel,
        run.grid,
        (
            x,
            y,
            None,
            None,
            weight,
            bias,
            mean,
            var,
            mean_out,
            None,
            inv_std,
            None,
            None,
            None,
            *run.args,
            0,
            1.0,
            float(eps),
            0.0,
            1.0,
            *run.tiles,
            1,
            1,
            2,
            weight is not None,
            bias is not None,
            False,
            False,
            relu,
        ),
        run.num_warps,
    )
    return y, mean_out, inv_std


def backward(
    dy, x, mean, inv_std, weight, batch_stats: bool, bias=None, act: str = "identity", bits=None
):
    """Gradients of y = (x - mean) * inv_std * weight + bias, from (C,) mean (float64, as
    the forward returns it) and inv_std (float32); ``batch_stats``: mean and inv_std were
    x's own (training), so they depend on x. ``act="relu"``: the gradient of
    ReLU(BN(x)) (``bias`` needed). ``bits``: the 1-bit ReLU mask of
    :func:`add_act_forward` (BN + add + ReLU): dy is gated by it, and the gated dy is the
    residual's gradient. Two launches (three with many parts).

    Returns dx (x's shape, dtype and memory format) and float32 (C,) dgamma, dbeta; with
    ``bits``, (dx, d_residual, dgamma, dbeta).
    """
    x, dy, run = _prepare(x, dy)
    mean, inv_std, weight, bias = _vec(mean), _vec(inv_std), _vec(weight), _vec(bias)
    relu, has_w, has_b = _relu(act), weight is not None, bias is not None
    masked = bits is not None
    batch_stats = bool(batch_stats)
    parts = torch.empty((2, run.P, run.C), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x, memory_format=run.fmt)
    dr = torch.empty_like(x, memory_format=run.fmt) if masked else None
    dgamma, dbeta = _stats_like(x), _stats_like(x)
    plan = _plan(
        "backward",
        x,
        dy,
        mean,
        inv_std,
        weight,
        bias,
        batch_stats,
        relu,
        masked,
        _aligned(parts, dx, dgamma, dbeta, *((bits, dr) if masked else ())),
    )
    _go(
        plan,
        0,
        _grad_sums_kernel,
        run.grid,
        (
            dy,
            x,
            mean,
            parts,
            inv_std,
            weight,
            bias,
            bits,
            dr,
            *run.args,
            *run.tiles,
            relu,
            has_w,
            has_b,
            masked,
        ),
        run.num_warps,
    )
    if not run.fused:
        grid, BC, PB = run.finalize
        _go(
            plan,
            1,
            _finalize_grads_kernel,
            grid,
            (parts, inv_std, dgamma, dbeta, run.P, run.C, BC, PB),
        )
    _go(
        plan,
        1 + (not run.fused),
        _dx_kernel,
        run.grid,
        (
            dr if masked else dy,
            x,
            dx,
            parts,
            mean,
            inv_std,
            weight,
            bias,
            dgamma,
            dbeta,
            *run.args,
            float(run.m),
            *run.tiles,
            run.PB,
            run.fused,
            has_w,
            batch_stats,
            relu,
            has_b,
        ),
        run.num_warps,
    )
    if masked:
        return dx, dr, dgamma, dbeta
    return dx, dgamma, dbeta


ADD_BLOCK = 2048  # elements per program of the BN + add + ReLU pass (a multiple of 8)


def add_act_forward(
    x,
    residual,
    weight,
    bias,
    eps: float,
    training: bool,
    mean=None,
    var=None,
    running_mean=None,
    running_var=None,
    num_batches_tracked=None,
    momentum: float = 0.1,
    act: str = "relu",
):
    """BN + add + activation, the tail of a ResNet block:

        y = act((x - mean) / sqrt(var + eps) * weight + bias + residual)

    Training: x's batch statistics (the statistics launches of :func:`moments`, with the
    running-statistics update and its guard as in :func:`train_forward`); evaluation: the
    given ``mean`` and ``var``. Then one pass over x and the residual writes y and, with
    ReLU, its 1-bit mask (bit i of byte i // 8 for element i of x's memory), which
    :func:`backward` takes as ``bits``.

    Returns y (x's shape, dtype and memory format), mean (float64), inv_std (float32) and
    the mask (uint8, ceil(numel / 8); None for "identity").
    """
    x, _, run = _prepare(x)
    relu = _relu(act)
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    r = residual.to(x.dtype).contiguous(memory_format=run.fmt)
    weight, bias = _vec(weight), _vec(bias)
    if training:
        rm, rv = _vec(running_mean), _vec(running_var)
        buffers = _statistics_buffers(x, run)
        _, _, mean, _, inv_std = buffers
        plan = _plan(
            "add_stats",
            x,
            rm,
            rv,
            num_batches_tracked,
            num_batches_tracked is not None,
            _aligned(*buffers),
        )
        _launch_statistics(
            plan, x, run, buffers, rm, rv, num_batches_tracked, eps, momentum, finalize=True
        )
        _write_back((running_mean, rm), (running_var, rv))
    else:
        inv_std = torch.div(1.0, torch.sqrt(var.detach().to(torch.float32) + float(eps)))
        mean = mean.detach().to(torch.float64).contiguous()
        inv_std = inv_std.contiguous()
    y = torch.empty_like(x, memory_format=run.fmt)
    n = x.numel()
    bits = torch.empty((n + 7) // 8 if relu else 1, dtype=torch.uint8, device=x.device)
    C = run.C
    L = math.prod(x.shape[2:]) if run.fmt == torch.contiguous_format else 1
    plan = _plan("add_act", x, r, weight, bias, relu, _aligned(y, bits, mean, inv_std))
    _go(
        plan,
        0,
        _add_act_kernel,
        (triton.cdiv(n, ADD_BLOCK),),
        (
            x,
            r,
            y,
            bits,
            mean,
            inv_std,
            weight,
            bias,
            n,
            C,
            L,
            ADD_BLOCK,
            weight is not None,
            bias is not None,
            relu,
            n >= 2**31,
        ),
        8,
    )
    return y, mean, inv_std, bits if relu else None


# --- pieces for distributed BN (bnlab.torch.SyncBatchNorm): local sums, global coefficients


def moments(x):
    """Batch mean (float64, the exact float32 pair) and biased var (float32), (C,) each: the
    statistics half of :func:`train_forward` (two launches)."""
    x, _, run = _prepare(x)
    buffers = _statistics_buffers(x, run)
    plan = _plan("moments", x, _aligned(*buffers))
    _launch_statistics(plan, x, run, buffers, None, None, None, 1.0, 0.0, finalize=True)
    return buffers[2], buffers[3]


def grad_sums(dy, x, mean):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel (float32, (C,)): the reductions
    of :func:`backward` (two launches)."""
    x, dy, run = _prepare(x, dy)
    mean = _vec(mean)
    parts = torch.empty((2, run.P, run.C), dtype=torch.float32, device=x.device)
    sum_dy, sum_dy_xmu = _stats_like(x), _stats_like(x)
    ones = torch.ones(run.C, dtype=torch.float32, device=x.device)  # inv_std = 1: raw sums
    plan = _plan("grad_sums", x, dy, mean, _aligned(parts, sum_dy, sum_dy_xmu, ones))
    _go(
        plan,
        0,
        _grad_sums_kernel,
        run.grid,
        (
            dy,
            x,
            mean,
            parts,
            None,
            None,
            None,
            None,
            None,
            *run.args,
            *run.tiles,
            False,
            False,
            False,
            False,
        ),
        run.num_warps,
    )
    grid, BC, PB = run.finalize
    _go(
        plan,
        1,
        _finalize_grads_kernel,
        grid,
        (parts, ones, sum_dy_xmu, sum_dy, run.P, run.C, BC, PB),
    )
    return sum_dy, sum_dy_xmu


def dx_from_sums(dy, x, mean, inv_std, weight, sum_dy, sum_dy_xmu, count: int):
    """dx of :func:`backward` (batch statistics) from given float32 (C,) sums over ``count``
    values per channel, e.g. summed over every process (one launch)."""
    x, dy, run = _prepare(x, dy)
    mean, inv_std, weight = _vec(mean), _vec(inv_std), _vec(weight)
    dx = torch.empty_like(x, memory_format=run.fmt)
    dgamma = (sum_dy_xmu * inv_std).to(torch.float32).contiguous()
    dbeta = sum_dy.to(torch.float32).contiguous()
    plan = _plan("dx_from_sums", x, dy, mean, inv_std, weight, _aligned(dx, dgamma, dbeta))
    _go(
        plan,
        0,
        _dx_kernel,
        run.grid,
        (
            dy,
            x,
            dx,
            None,
            mean,
            inv_std,
            weight,
            None,
            dgamma,
            dbeta,
            *run.args,
            float(count),
            *run.tiles,
            1,
            False,
            weight is not None,
            True,
            False,
            False,
        ),
        run.num_warps,
    )
    return dx
