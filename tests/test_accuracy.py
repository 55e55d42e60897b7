"""Every path bounded against an extended-precision truth at m >= 1e5, on every layout.

``x = offset + noise`` with a large common offset is the case that breaks a float32
running sum (the variance of 1e4 + N(0, 1) came out as 55 at m = 1e5). The bounds are
the rounding-error bounds of tests/truth.py; here they are a few float32 ulps, while the
error they guard against is hundreds of times larger.
"""

import numpy as np
import pytest

import bnlab
from bnlab import nn
from bnlab.kernels import numba_bn
from truth import (EXTENDED, assert_within, channel_shape, compute_dtype, exact_bn, grad_bounds,
                   reduce_axes, stat_bounds, y_bound)

pytestmark = pytest.mark.skipif(not EXTENDED, reason="needs an extended-precision longdouble")

# m >= 1e5 values per channel, 3 channels, in every layout bnlab takes
LAYOUTS = {
    "NC": ((100_000, 3), 1),
    "NCL": ((500, 3, 200), 1),
    "NCHW": ((100, 3, 32, 32), 1),
    "NHWC": ((100, 32, 32, 3), -1),
}
# per dtype: common offset and noise scale (float16 holds 100 + N(0, 1) to 1/16)
DATA = {np.float64: (1e4, 1.0), np.float32: (1e4, 1.0), np.float16: (100.0, 1.0)}


def make(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    loc, scale = DATA[dtype]
    C = shape[axis]
    bshape = tuple(C if a == axis % len(shape) else 1 for a in range(len(shape)))
    x = loc + scale * (1 + 0.5 * np.arange(C)).reshape(bshape) * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    pdt = np.float32 if dtype == np.float16 else dtype
    gamma = (1 + 0.3 * rng.standard_normal(C)).astype(pdt)
    beta = rng.standard_normal(C).astype(pdt)
    return x.astype(dtype), dy.astype(dtype), gamma, beta


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    return request.param


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_moments_and_standardize(layout, dtype):
    shape, axis = LAYOUTS[layout]
    x, *_ = make(shape, axis, dtype)
    axes = reduce_axes(x.ndim, axis)
    b = stat_bounds(x, axes, dtype)
    mean, var = bnlab.moments(x, axes)
    assert mean.dtype == var.dtype == dtype
    assert_within(mean, b.mean, b.mean_err, "moments mean")
    assert_within(var, b.var, b.var_err, "moments variance")
    # standardize is BN without gamma and beta, over the same axes
    truth = exact_bn(x, None, None, 0.0, axis)
    z = bnlab.standardize(x, axis=tuple(axes))
    assert_within(z, truth["y"], y_bound(truth, None, dtype, b), "standardize")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_batch_norm_forward_backward(layout, dtype, backend):
    shape, axis = LAYOUTS[layout]
    x, dy, gamma, beta = make(shape, axis, dtype, seed=1)
    check_forward_backward(x, dy, gamma, beta, axis, backend)


def check_forward_backward(x, dy, gamma, beta, axis, backend, eps=1e-5):
    cdt = compute_dtype(x.dtype)
    axes = reduce_axes(x.ndim, axis)
    b = stat_bounds(x, axes, cdt)
    truth = exact_bn(x, gamma, beta, eps, axis, dy)
    y, cache = bnlab.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis, backend=backend)
    assert y.dtype == x.dtype and cache.mean.dtype == cdt
    assert_within(cache.mean, truth["mean"], b.mean_err, f"{backend} batch mean")
    assert_within(cache.var, truth["var"], b.var_err, f"{backend} batch variance")
    beta_b = beta.reshape(channel_shape(x.ndim, axis, beta.size))
    assert_within(y, truth["y"], y_bound(truth, beta_b, x.dtype, b), f"{backend} y")
    dx, dgamma, dbeta = bnlab.batch_norm_backward(dy, cache, backend=backend)
    err_dx, err_dgamma, err_dbeta = grad_bounds(truth, dy, x.dtype, b)
    assert_within(dbeta, truth["dbeta"], err_dbeta, f"{backend} dbeta")
    assert_within(dgamma, truth["dgamma"], err_dgamma, f"{backend} dgamma")
    assert_within(dx, truth["dx"], err_dx, f"{backend} dx")


@pytest.mark.parametrize("shape,axis", [((64, 16, 32, 32), 1), ((64, 32, 32, 16), -1)])
def test_threaded_kernels_at_real_size(shape, axis):
    """2**20 elements: the kernels split the work over all threads (PARALLEL_MIN_SIZE)."""
    assert np.prod(shape) >= numba_bn.PARALLEL_MIN_SIZE
    x, dy, gamma, beta = make(shape, axis, np.float32, seed=2)
    check_forward_backward(x, dy, gamma, beta, axis, "numba")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_layer_running_statistics(layout, backend, monkeypatch):
    """The layers (and so functional batch_norm's update) carry the accurate statistics
    into the running buffers: after one step with momentum 1 they are the batch's."""
    monkeypatch.setenv("BNLAB_BACKEND", backend)
    shape, axis = LAYOUTS[layout]
    x, *_ = make(shape, axis, np.float32, seed=3)
    C = shape[axis]
    if layout in ("NC", "NCL"):
        bn = nn.BatchNorm1d(C, momentum=1.0)
    else:
        bn = nn.BatchNorm2d(C, momentum=1.0, data_format="NHWC" if axis == -1 else "NCHW")
    bn(x)
    axes = reduce_axes(x.ndim, axis)
    b = stat_bounds(x, axes, np.float32)
    m = x.size // C
    assert_within(bn.running_mean, b.mean, b.mean_err, "running_mean")
    # the unbiased variance: one more float32 rounding of var * m / (m - 1)
    unbiased = b.var * m / (m - 1)
    assert_within(bn.running_var, unbiased, 2 * b.var_err + 2 ** -23 * unbiased, "running_var")
