"""An independent extended-precision truth for batch normalization, and error bounds.

The truth is computed in ``np.longdouble`` (on x86-64 the x87 format: 64-bit significand,
eps 1.1e-19) with the reduced axes moved last and made contiguous, so NumPy sums them
pairwise: its own error is far below half an ulp of float64 (1.1e-16). It shares no code
with bnlab.

The bounds say how far a correct float16/float32/float64 implementation of bnlab's
conventions (statistics accumulated in float64 and rounded once; elementwise steps in the
compute dtype, mean subtracted first) may be from that truth. They are first-order
rounding-error bounds with small constants, not fitted tolerances:

* a sum of m terms accumulated in precision ``u_acc`` errs by at most about
  ``m * u_acc * sum|terms|`` (sequential summation; pairwise does better);
* rounding a value ``t`` to the output dtype errs by at most ``u * |t|`` (``u`` = eps/2),
  plus half the smallest subnormal;
* an elementwise step ``(x - mu) * s * gamma + beta`` in precision ``u_c`` errs by a few
  ``u_c`` times the magnitude of its operands; rounding ``mu`` to the compute dtype costs
  ``u_c * |mu| * s``: the term that a large common offset makes dominant.

A float32 running sum, the bug these bounds are there to catch, errs by ``m * 2^-24``
relative: at m = 1e5 and offset 1e4 that is a thousand times the bound.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

LD = np.longdouble
EXTENDED = np.finfo(LD).eps < 1e-18  # x87 extended (or quad); not where longdouble is float64


def unit(dtype) -> float:
    """Unit roundoff: the largest relative error of rounding to ``dtype`` (eps / 2)."""
    return float(np.finfo(dtype).eps) / 2


def tiny(dtype) -> float:
    return float(np.finfo(dtype).smallest_subnormal)


def compute_dtype(dtype) -> np.dtype:
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def acc_dtype(dtype) -> np.dtype:
    return np.promote_types(dtype, np.float64)


def _last(x, axes):
    """x in longdouble with ``axes`` flattened into one contiguous last axis."""
    axes = sorted(a % x.ndim for a in axes)
    keep = [a for a in range(x.ndim) if a not in axes]
    xt = np.ascontiguousarray(np.transpose(np.asarray(x).astype(LD), keep + axes))
    return xt.reshape(xt.shape[:len(keep)] + (-1,)), keep


def _back(v, shape, axes, keepdims=True):
    """A statistic over the kept axes reshaped to broadcast against ``shape``."""
    axes = {a % len(shape) for a in axes}
    kept = tuple(1 if a in axes else n for a, n in enumerate(shape))
    return v.reshape(kept) if keepdims else v.reshape(tuple(n for a, n in enumerate(shape)
                                                            if a not in axes))


def _flat_moments(xf):
    """Mean and biased variance over the last axis, two passes."""
    m = xf.shape[-1]
    mean = xf.sum(axis=-1) / m
    return mean, np.square(xf - mean[..., None]).sum(axis=-1) / m


def exact_moments(x, axes, keepdims=False):
    """Mean and biased variance over ``axes`` in longdouble."""
    axes = [int(a) for a in np.atleast_1d(axes)]
    mean, var = _flat_moments(_last(x, axes)[0])
    return _back(mean, x.shape, axes, keepdims), _back(var, x.shape, axes, keepdims)


def reduce_axes(ndim, axis):
    return [a for a in range(ndim) if a != axis % ndim]


def exact_bn(x, gamma, beta, eps, axis, dy=None):
    """Training-mode BN and its gradients in longdouble; a dict of (C,) and x-shaped arrays."""
    axes = reduce_axes(x.ndim, axis)
    mean, var = exact_moments(x, axes, keepdims=True)
    xl = np.asarray(x).astype(LD)
    s = 1 / np.sqrt(var + LD(eps))
    x_hat = (xl - mean) * s
    C = x.shape[axis]
    g = np.ones(C, LD) if gamma is None else np.asarray(gamma).astype(LD)
    b = np.zeros(C, LD) if beta is None else np.asarray(beta).astype(LD)
    bshape = mean.shape
    out = dict(mean=mean.reshape(C), var=var.reshape(C), inv_std=s.reshape(C), x_hat=x_hat,
               y=x_hat * g.reshape(bshape) + b.reshape(bshape), m=xl.size // max(C, 1))
    if dy is not None:
        dyl = np.asarray(dy).astype(LD)
        dbeta = dyl.sum(axis=tuple(axes))
        dgamma = (dyl * x_hat).sum(axis=tuple(axes))
        m = out["m"]
        k = (g * s.reshape(C) / m).reshape(bshape)
        out.update(dbeta=dbeta, dgamma=dgamma,
                   dx=k * (m * dyl - dbeta.reshape(bshape) - x_hat * dgamma.reshape(bshape)))
    return out


# --- bounds --------------------------------------------------------------------------------


def stat_bounds(x, axes, out_dtype, acc=None):
    """Truth and bounds for the statistics over ``axes`` of ``x``, accumulated in ``acc``
    (default: float64 or wider) and rounded to ``out_dtype``.

    Returns a namespace: ``mean``, ``var`` (the truth, longdouble), ``mean_err``, ``var_err``
    (bounds on |computed - truth|), ``acc_mean_err`` and ``acc_var_err`` (the accumulation
    errors alone, before rounding, which the elementwise bounds take)."""
    xf, _ = _last(x, [int(a) for a in np.atleast_1d(axes)])
    m = xf.shape[-1]
    mean, var = _flat_moments(xf)
    u_acc = unit(acc or acc_dtype(x.dtype))
    u, t = unit(out_dtype), tiny(out_dtype)
    maxabs = np.abs(xf).max(axis=-1)
    maxdev2 = np.square(xf - mean[..., None]).max(axis=-1)
    err_mean = 4 * m * u_acc * maxabs                  # accumulation (shifted or not)
    err_var = 4 * (m + 2) * u_acc * maxdev2 + err_mean ** 2
    return SimpleNamespace(mean=mean, var=var, mean_err=u * np.abs(mean) + t + err_mean,
                           var_err=u * var + t + err_var, acc_mean_err=err_mean,
                           acc_var_err=err_var)


def y_bound(truth, gamma, beta, eps, axis, out_dtype, stats):
    """Bound on |y - truth| for the training forward (see the module docstring);
    ``stats`` is :func:`stat_bounds` in the accumulator's precision."""
    c = compute_dtype(out_dtype)
    u_c = unit(c)
    C = truth["mean"].shape[0]
    bshape = tuple(C if a == axis % truth["y"].ndim else 1 for a in range(truth["y"].ndim))
    g = np.ones(C, LD) if gamma is None else np.abs(np.asarray(gamma).astype(LD))
    b = np.zeros(C, LD) if beta is None else np.abs(np.asarray(beta).astype(LD))
    s = truth["inv_std"].reshape(bshape)
    mu = np.abs(truth["mean"]).reshape(bshape)
    dev = np.abs(truth["x_hat"]) / s                               # |x - mu|
    mu_err = u_c * mu + stats.acc_mean_err.reshape(bshape)         # |mu rounded - mu|
    rel_s = u_c + stats.acc_var_err.reshape(bshape) * s * s        # relative error of inv_std
    gs = g.reshape(bshape) * s
    bound = gs * mu_err + 6 * u_c * (gs * dev + b.reshape(bshape)) + 2 * rel_s * gs * dev
    return bound + unit(out_dtype) * np.abs(truth["y"]) + tiny(out_dtype)


def grad_bounds(truth, dy, gamma, axis, out_dtype, stats):
    """Bounds on |dx|, |dgamma|, |dbeta| errors for the training backward."""
    c = compute_dtype(out_dtype)
    u_c, u_acc = unit(c), unit(acc_dtype(c))
    x_hat = truth["x_hat"]
    C = truth["mean"].shape[0]
    nd = x_hat.ndim
    axes = tuple(reduce_axes(nd, axis))
    bshape = tuple(C if a == axis % nd else 1 for a in range(nd))
    m = truth["m"]
    g = np.ones(C, LD) if gamma is None else np.abs(np.asarray(gamma).astype(LD))
    s = truth["inv_std"].reshape(bshape)
    dyl = np.abs(np.asarray(dy).astype(LD))
    rel_s = u_c + stats.acc_var_err.reshape(bshape) * s * s
    # X bounds |x_hat| plus its error amplification: s * (|x - mu| + |mu|)
    X = np.abs(x_hat) + s * np.abs(truth["mean"]).reshape(bshape)
    mu_err = stats.acc_mean_err.reshape(bshape) * s                # the mean's, in x_hat units
    dX = 3 * u_c * X + mu_err + 2 * rel_s * np.abs(x_hat)          # |x_hat computed - true|
    sum_dy = dyl.sum(axis=axes, keepdims=True)
    sum_dyX = (dyl * X).sum(axis=axes, keepdims=True)
    err_dbeta = u_c * np.abs(truth["dbeta"]) + 2 * m * u_acc * sum_dy.reshape(C)
    err_dgamma = (u_c * np.abs(truth["dgamma"]) + 2 * m * u_acc * sum_dyX.reshape(C)
                  + (dyl * dX).sum(axis=axes))
    gs = g.reshape(bshape) * s
    err_dx = (8 * u_c * gs * (dyl + sum_dy / m + X * sum_dyX / m)
              + gs * (dX * sum_dyX / m + X * err_dgamma.reshape(bshape) / m
                      + err_dbeta.reshape(bshape) / m)
              + 2 * rel_s * np.abs(truth["dx"]))
    err_dx = err_dx + unit(out_dtype) * np.abs(truth["dx"]) + tiny(out_dtype)
    return err_dx, err_dgamma + tiny(c), err_dbeta + tiny(c)


def assert_within(got, truth, bound, what=""):
    """|got - truth| <= bound elementwise (NaN where the truth is NaN; inf where the truth
    is past the dtype's range); the message names the worst element."""
    got = np.asarray(got)
    truth = np.broadcast_to(np.asarray(truth, LD), got.shape)
    bound = np.broadcast_to(np.asarray(bound, LD), got.shape)
    assert got.shape == truth.shape, f"{what}: shape {got.shape} != {truth.shape}"
    nan = np.isnan(truth)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN where the truth has none, or not"
    big = np.finfo(got.dtype).max
    half_ulp = (LD(big) - LD(np.nextafter(big, got.dtype.type(0)))) / 2
    over = ~nan & (np.abs(truth) >= LD(big) + half_ulp)
    assert np.all(np.isinf(got[over]) & (np.sign(got[over]) == np.sign(truth[over]))), \
        f"{what}: a value past {got.dtype}'s range is not inf"
    ok = ~nan & ~over
    err = np.abs(got[ok].astype(LD) - truth[ok])
    if err.size and not np.all(err <= bound[ok]):
        i = int(np.argmax(err / np.maximum(bound[ok], LD(1e-300))))
        raise AssertionError(
            f"{what}: |error| {float(err[i]):.3e} > bound {float(bound[ok][i]):.3e} "
            f"(got {got[ok][i]!r}, truth {float(truth[ok][i])!r}); "
            f"{int(np.sum(err > bound[ok]))} of {err.size} elements out of bounds")
