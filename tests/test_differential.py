"""A differential test of every public function against an extended-precision truth.

Hypothesis draws what a new user might pass: ranks 2 to 5, any channel axis, odd sizes,
float16/float32/float64, large common offsets and small or large scales, memory that is
not C-contiguous (Fortran order, every other element of a larger array, reversed axes),
both backends. Each result is held to the rounding-error bounds of tests/truth.py.

`make test` runs a fixed set of examples (derandomized, so CI is repeatable);
``BNLAB_DIFFERENTIAL_EXAMPLES=2000`` runs that many per test with fresh random draws.
"""

import os
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from truth import (EXTENDED, LD, assert_within, channel_shape, compute_dtype, exact_normalize,
                   grad_bounds, reduce_axes, stat_bounds, tiny, unit, y_bound)

pytestmark = pytest.mark.skipif(not EXTENDED, reason="needs an extended-precision longdouble")

_EXTRA = os.environ.get("BNLAB_DIFFERENTIAL_EXAMPLES")
SETTINGS = settings(max_examples=int(_EXTRA or 100), deadline=None, derandomize=_EXTRA is None,
                    database=None)

# per dtype: log10 ranges of the noise scale and of |offset| / scale, chosen so that values,
# variances and TensorFlow's x * inv stay inside the dtype's range
RANGES = {np.float16: ((-2, 1), (0, 1.5)), np.float32: ((-3, 3), (0, 5)),
          np.float64: ((-3, 3), (0, 8))}


@dataclass
class Case:
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    axis: int

    @property
    def C(self):
        return self.x.shape[self.axis]


def relayout(a, how, k):
    """The same values as ``a`` in other memory: how the user's array may be laid out."""
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "every-other":  # a strided view into an array twice as long on axis k
        return np.repeat(a, 2, axis=k)[(slice(None),) * k + (slice(None, None, 2),)]
    if how == "reversed":     # negative strides on axis k
        return np.flip(np.flip(a, axis=k).copy(), axis=k)
    return a


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.integers(1, 9 if ndim <= 3 else 4)) for _ in range(ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    (s0, s1), (r0, r1) = RANGES[dtype]
    scale = 10.0 ** draw(st.floats(s0, s1))
    offset = draw(st.sampled_from([0.0, 1.0, -1.0])) * scale * 10.0 ** draw(st.floats(r0, r1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = shape[axis]
    bshape = channel_shape(ndim, axis, C)
    loc = offset * (1 + 0.1 * rng.random(C)).reshape(bshape)        # per-channel offsets
    spread = scale * (0.5 + rng.random(C)).reshape(bshape)
    x = (loc + spread * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pdt = np.float32 if dtype == np.float16 else dtype
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(pdt)
    beta = rng.standard_normal(C).astype(pdt)
    how = draw(st.sampled_from(["C", "fortran", "every-other", "reversed"]))
    k = draw(st.integers(0, ndim - 1))
    return Case(relayout(x, how, k), relayout(dy, how, k), gamma, beta, axis)


def some_axes(ndim):
    """A non-empty subset of the axes, as a user might pass it (ints, negatives)."""
    return st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim,
                    unique_by=lambda a: a % ndim)


@SETTINGS
@given(case=cases(), data=st.data(), keepdims=st.booleans())
def test_moments(case, data, keepdims):
    x = case.x
    axes = data.draw(some_axes(x.ndim))
    mean, var = bnlab.moments(x, axes, keepdims=keepdims)
    assert mean.dtype == var.dtype == x.dtype
    b = stat_bounds(x, axes, x.dtype)
    if keepdims:
        assert mean.shape == b.mean.shape
    assert_within(mean, b.mean, b.mean_err, "mean")
    assert_within(var, b.var, b.var_err, "variance")


@SETTINGS
@given(case=cases(), data=st.data(), eps=st.sampled_from([0.0, 1e-3]), all_axes=st.booleans())
def test_standardize(case, data, eps, all_axes):
    x = case.x
    axes = list(range(x.ndim)) if all_axes else data.draw(some_axes(x.ndim))
    with np.errstate(invalid="ignore", divide="ignore"):  # eps = 0 on a constant: 0/0 = NaN
        z = bnlab.standardize(x, axis=None if all_axes else axes, eps=eps)
        truth = exact_normalize(x, axes, eps)
        bound = y_bound(truth, None, x.dtype, stat_bounds(x, axes, x.dtype))
    assert z.dtype == x.dtype and z.shape == x.shape
    assert_within(z, truth["y"], bound, "z")


@SETTINGS
@given(case=cases(), backend=st.sampled_from(["numpy", "numba"]),
       eps=st.sampled_from([1e-5, 1e-3]), affine=st.booleans())
def test_batch_norm_forward_backward(case, backend, eps, affine):
    x, axis = case.x, case.axis
    gamma, beta = (case.gamma, case.beta) if affine else (None, None)
    axes = reduce_axes(x.ndim, axis)
    if x.size // case.C <= 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bnlab.batch_norm_forward(x, gamma, beta, eps, axis, backend=backend)
        return
    y, cache = bnlab.batch_norm_forward(x, gamma, beta, eps, axis, backend=backend)
    bshape = channel_shape(x.ndim, axis, case.C)
    truth = exact_normalize(x, axes, eps, None if gamma is None else gamma.reshape(bshape),
                            None if beta is None else beta.reshape(bshape), case.dy)
    cdt = cache.mean.dtype
    b = stat_bounds(x, axes, cdt)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_within(cache.mean, b.mean, b.mean_err, "batch mean")
    assert_within(cache.var, b.var, b.var_err, "batch variance")
    beta_b = None if beta is None else beta.reshape(bshape)
    assert_within(y, truth["y"], y_bound(truth, beta_b, x.dtype, b), "y")
    dx, dgamma, dbeta = bnlab.batch_norm_backward(case.dy, cache, backend=backend)
    err_dx, err_dgamma, err_dbeta = grad_bounds(truth, case.dy, x.dtype, b)
    assert dx.dtype == x.dtype and dgamma.dtype == dbeta.dtype == cdt
    assert_within(dbeta, truth["dbeta"], err_dbeta, "dbeta")
    assert_within(dgamma, truth["dgamma"], err_dgamma, "dgamma")
    assert_within(dx, truth["dx"], err_dx, "dx")


@SETTINGS
@given(case=cases(), backend=st.sampled_from(["numpy", "numba"]),
       momentum=st.sampled_from([0.1, 0.5, 1.0]), buffers=st.sampled_from([np.float32, np.float64]))
def test_batch_norm_running_statistics_and_eval(case, backend, momentum, buffers):
    x, axis, C = case.x, case.axis, case.C
    rng = np.random.default_rng(C)
    rm0 = rng.standard_normal(C).astype(buffers)
    rv0 = (0.5 + rng.random(C)).astype(buffers)
    rm, rv = rm0.copy(), rv0.copy()
    m = x.size // C
    cdt = compute_dtype(x.dtype)
    if m > 1:
        bnlab.batch_norm(x, rm, rv, case.gamma, case.beta, training=True, momentum=momentum,
                         axis=axis, backend=backend)
        b = stat_bounds(x, reduce_axes(x.ndim, axis), cdt)
        mean, unbiased = b.mean.reshape(C), b.var.reshape(C) * LD(m) / (m - 1)
        u_b = unit(buffers)
        keep = (1 - momentum) * rm0.astype(LD)
        assert_within(rm, keep + momentum * mean,
                      4 * u_b * (np.abs(keep) + momentum * np.abs(mean))
                      + momentum * b.mean_err.reshape(C) + tiny(buffers), "running_mean")
        keep = (1 - momentum) * rv0.astype(LD)
        assert_within(rv, keep + momentum * unbiased,
                      4 * u_b * (keep + momentum * unbiased)
                      + momentum * (b.var_err.reshape(C) + 2 * unit(cdt) * unbiased)
                      * m / (m - 1) + tiny(buffers), "running_var")
    # evaluation: the running statistics given, any batch size
    y = bnlab.batch_norm(x, rm, rv, case.gamma, case.beta, training=False, axis=axis,
                         backend=backend)
    bshape = channel_shape(x.ndim, axis, C)
    mu, var = (v.astype(cdt).astype(LD).reshape(bshape) for v in (rm, rv))  # as computed
    s = 1 / np.sqrt(var + LD(1e-5))
    g, be = (v.astype(LD).reshape(bshape) for v in (case.gamma, case.beta))
    xl = x.astype(LD)
    truth = g * (xl - mu) * s + be
    u_c = unit(cdt)
    bound = 6 * u_c * (np.abs(g) * s * (np.abs(xl - mu) + np.abs(mu)) + np.abs(be))
    assert_within(y, truth, bound + unit(x.dtype) * np.abs(truth) + tiny(x.dtype), "eval y")


@SETTINGS
@given(case=cases(), eps=st.sampled_from([1e-3, 0.1]), with_offset=st.booleans(),
       with_scale=st.booleans(), keepdims=st.booleans())
def test_batch_normalization(case, eps, with_offset, with_scale, keepdims):
    """tf.nn.batch_normalization: every op in x's dtype, with the statistics given."""
    x, axis = case.x, case.axis
    dt = x.dtype
    axes = reduce_axes(x.ndim, axis)
    shape = channel_shape(x.ndim, axis, case.C) if keepdims or axis % x.ndim != x.ndim - 1 \
        else (case.C,)                                  # (C,) broadcasts only on the last axis
    mean, var = bnlab.moments(x, axes, keepdims=True)
    mean, var = mean.reshape(shape), var.reshape(shape)
    offset = case.beta.astype(dt).reshape(shape) if with_offset else None
    scale = case.gamma.astype(dt).reshape(shape) if with_scale else None
    y = bnlab.batch_normalization(x, mean, var, offset, scale, eps)
    assert y.dtype == dt and y.shape == x.shape
    # the exact function of the values given (eps as the dtype holds it)
    ld = lambda v: LD(0) if v is None else np.asarray(v).astype(LD)  # noqa: E731
    inv = 1 / np.sqrt(ld(var) + ld(dt.type(eps)))
    if scale is not None:
        inv = inv * ld(scale)
    xl = x.astype(LD)
    truth = xl * inv + (ld(offset) - ld(mean) * inv)
    bound = 8 * unit(dt) * (np.abs(xl * inv) + np.abs(ld(mean) * inv) + np.abs(ld(offset)))
    assert_within(y, truth, bound + tiny(dt), "y")
