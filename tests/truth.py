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
  plus the smallest subnormal;
* an elementwise step ``(x - mu) * s * gamma + beta`` in precision ``u_c`` errs by a few
  ``u_c`` times the magnitude of its operands; rounding ``mu`` to the compute dtype costs
  ``u_c * |mu| * s``: the term that a large common offset makes dominant.

A float32 running sum, the bug these bounds are there to catch, errs by up to
``m * 2^-24`` relative: at m = 1e5 and offset 1e4 that is a thousand times the bound.

Statistics are kept with the reduced axes as length-1 axes, so they broadcast against x.
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


def reduce_axes(ndim, axis):
    """Every axis but the channel axis."""
    return [a for a in range(ndim) if a != axis % ndim]


def channel_shape(ndim, axis, C):
    """Shape of a (C,) vector broadcast along ``axis``."""
    return tuple(C if a == axis % ndim else 1 for a in range(ndim))


def _axes(axes, ndim):
    return sorted({int(a) % ndim for a in np.atleast_1d(axes)})


def _stats(x, axes):
    """Longdouble x, and its mean, biased variance, max|x| and max (x - mean)^2 over
    ``axes`` (kept), each summed pairwise along a contiguous last axis."""
    axes = _axes(axes, x.ndim)
    keep = [a for a in range(x.ndim) if a not in axes]
    xl = np.asarray(x).astype(LD)
    xt = np.ascontiguousarray(np.transpose(xl, keep + axes))
    xf = xt.reshape(xt.shape[:len(keep)] + (-1,))                  # (kept..., m)
    m = xf.shape[-1]
    mean = xf.sum(axis=-1, keepdims=True) / m
    dev2 = np.square(xf - mean)
    kept = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    out = [mean, dev2.sum(axis=-1, keepdims=True) / m,
           np.abs(xf).max(axis=-1, keepdims=True, initial=0), dev2.max(axis=-1, keepdims=True,
                                                                       initial=0)]
    return xl, m, [v.reshape(kept) for v in out]


def exact_normalize(x, axes, eps, gamma=None, beta=None, dy=None):
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` over ``axes``, in longdouble, and
    with ``dy`` the exact gradients (dx; dgamma and dbeta kept-shaped). gamma and beta
    broadcast against x (None: 1 and 0)."""
    axes = _axes(axes, x.ndim)
    xl, m, (mean, var, _, _) = _stats(x, axes)
    s = 1 / np.sqrt(var + LD(eps))
    x_hat = (xl - mean) * s
    g = LD(1) if gamma is None else np.asarray(gamma).astype(LD)
    b = LD(0) if beta is None else np.asarray(beta).astype(LD)
    out = dict(mean=mean, var=var, inv_std=s, x_hat=x_hat, y=x_hat * g + b, m=m,
               axes=tuple(axes), gamma=g)
    if dy is not None:
        dyl = np.asarray(dy).astype(LD)
        dbeta = dyl.sum(axis=tuple(axes), keepdims=True)
        dgamma = (dyl * x_hat).sum(axis=tuple(axes), keepdims=True)
        out.update(dbeta=dbeta, dgamma=dgamma, dx=g * s / m * (m * dyl - dbeta - x_hat * dgamma))
    return out


def exact_bn(x, gamma, beta, eps, axis, dy=None):
    """Training-mode BN with (C,) gamma and beta on channel axis ``axis``."""
    bshape = channel_shape(x.ndim, axis, x.shape[axis])
    g = None if gamma is None else np.reshape(gamma, bshape)
    b = None if beta is None else np.reshape(beta, bshape)
    return exact_normalize(x, reduce_axes(x.ndim, axis), eps, g, b, dy)


# --- bounds --------------------------------------------------------------------------------


def stat_bounds(x, axes, out_dtype):
    """Truth and bounds for the statistics over ``axes`` of ``x``, accumulated in float64
    or wider and rounded to ``out_dtype``.

    Returns a namespace: ``mean``, ``var`` (the truth, longdouble, kept-shaped),
    ``mean_err``, ``var_err`` (bounds on |computed - truth|), ``acc_mean_err`` and
    ``acc_var_err`` (the accumulation errors alone, before rounding, which the elementwise
    bounds take)."""
    _, m, (mean, var, maxabs, maxdev2) = _stats(x, axes)
    u_acc = unit(acc_dtype(x.dtype))
    u, t = unit(out_dtype), tiny(out_dtype)
    err_mean = 4 * m * u_acc * maxabs                  # accumulation (shifted or not)
    err_var = 4 * (m + 2) * u_acc * maxdev2 + err_mean ** 2
    return SimpleNamespace(mean=mean, var=var, mean_err=u * np.abs(mean) + t + err_mean,
                           var_err=u * var + t + err_var, acc_mean_err=err_mean,
                           acc_var_err=err_var)


def y_bound(truth, beta, out_dtype, stats):
    """Bound on |y - truth| for the normalization forward (see the module docstring);
    ``stats`` is :func:`stat_bounds`'s namespace for the same x and axes."""
    u_c = unit(compute_dtype(out_dtype))
    s = truth["inv_std"]
    mu = np.abs(truth["mean"])
    dev = np.abs(truth["x_hat"]) / s                               # |x - mu|
    mu_err = u_c * mu + stats.acc_mean_err                         # |mu rounded - mu|
    rel_s = u_c + stats.acc_var_err * s * s                        # relative error of inv_std
    gs = np.abs(truth["gamma"]) * s
    b = 0 if beta is None else np.abs(np.asarray(beta).astype(LD))
    bound = gs * mu_err + 6 * u_c * (gs * dev + b) + 2 * rel_s * gs * dev
    return bound + unit(out_dtype) * np.abs(truth["y"]) + tiny(out_dtype)


def grad_bounds(truth, dy, out_dtype, stats):
    """Bounds on the errors of dx, dgamma, dbeta (kept-shaped) for the training backward."""
    c = compute_dtype(out_dtype)
    u_c, u_acc = unit(c), unit(acc_dtype(c))
    axes, m = truth["axes"], truth["m"]
    x_hat, s = truth["x_hat"], truth["inv_std"]
    dyl = np.abs(np.asarray(dy).astype(LD))
    rel_s = u_c + stats.acc_var_err * s * s
    # X bounds |x_hat| plus its error amplification: s * (|x - mu| + |mu|)
    X = np.abs(x_hat) + s * np.abs(truth["mean"])
    dX = 3 * u_c * X + stats.acc_mean_err * s + 2 * rel_s * np.abs(x_hat)  # |x_hat error|
    sum_dy = dyl.sum(axis=axes, keepdims=True)
    sum_dyX = (dyl * X).sum(axis=axes, keepdims=True)
    err_dbeta = u_c * np.abs(truth["dbeta"]) + 2 * m * u_acc * sum_dy
    err_dgamma = (u_c * np.abs(truth["dgamma"]) + 2 * m * u_acc * sum_dyX
                  + (dyl * dX).sum(axis=axes, keepdims=True))
    gs = np.abs(truth["gamma"]) * s
    err_dx = (8 * u_c * gs * (dyl + sum_dy / m + X * sum_dyX / m)
              + gs * (dX * sum_dyX / m + X * err_dgamma / m + err_dbeta / m)
              + 2 * rel_s * np.abs(truth["dx"]))
    err_dx = err_dx + unit(out_dtype) * np.abs(truth["dx"]) + tiny(out_dtype)
    return err_dx, err_dgamma + tiny(c), err_dbeta + tiny(c)


def assert_within(got, truth, bound, what=""):
    """|got - truth| <= bound elementwise (NaN where the truth is NaN; inf where the truth
    is past the dtype's range); the message names the worst element. ``truth`` and
    ``bound`` may be kept-shaped where ``got`` is squeezed: they are reshaped to it."""
    got = np.asarray(got)
    truth, bound = (np.asarray(v, LD) for v in (truth, bound))
    if truth.size == got.size:
        truth = truth.reshape(got.shape)
    if bound.size == got.size:
        bound = bound.reshape(got.shape)
    truth, bound = np.broadcast_to(truth, got.shape), np.broadcast_to(bound, got.shape)
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
