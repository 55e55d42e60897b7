"""Property tests (hypothesis) for what batch normalization promises."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import nn
from truth import (assert_within, channel_shape, exact_bn, grad_bounds, reduce_axes, stat_bounds,
                   y_bound)

shapes4 = st.tuples(st.integers(2, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


def data(seed, shape, dtype=np.float64):
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-100, 100, size=(1, shape[1]) + (1,) * (len(shape) - 2))
    return (loc + rng.uniform(0.1, 10) * rng.standard_normal(shape)).astype(dtype)


@settings(max_examples=60, deadline=None)
@given(shape=shapes4, seed=st.integers(0, 2**32 - 1))
def test_normalized_channels_have_zero_mean_and_unit_variance(shape, seed):
    x = data(seed, shape)
    y, _ = bnlab.batch_norm_forward(x, None, None, eps=0.0)
    axes = (0, 2, 3)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-9)
    # eps = 0: exactly unit variance unless a channel is constant (then y is 0/0)
    var = x.var(axis=axes)
    ok = var > 1e-12 * np.abs(x).max(axis=axes) ** 2
    np.testing.assert_allclose(y.var(axis=axes)[ok], 1.0, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(shape=shapes4, seed=st.integers(0, 2**32 - 1), i=st.integers(0, 5))
def test_eval_output_of_a_sample_does_not_depend_on_the_batch(shape, seed, i):
    i = i % shape[0]
    bn = nn.BatchNorm2d(shape[1], dtype=np.float64)
    for k in range(2):
        bn(data(seed + k, shape))  # training fills the running statistics
    bn.eval()
    x = data(seed + 2, shape)
    alone = bn(x[i:i + 1])
    others = data(seed + 3, shape)
    others[i] = x[i]
    np.testing.assert_array_equal(bn(x)[i], alone[0])
    np.testing.assert_array_equal(bn(others)[i], alone[0])


@settings(max_examples=60, deadline=None)
@given(shape=shapes4, seed=st.integers(0, 2**32 - 1), nhwc=st.booleans())
def test_float32_layers_are_within_rounding_of_the_exact_result(shape, seed, nhwc):
    """NCHW and NHWC float32 layers against the extended-precision truth, with the
    rounding-error bounds of tests/truth.py: y, dx, weight.grad, bias.grad, running_var."""
    C = shape[1]
    bn = nn.BatchNorm2d(C, data_format="NHWC" if nhwc else "NCHW")
    rng = np.random.default_rng(seed)
    gamma, beta = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    bn.weight.data[...] = gamma
    bn.bias.data[...] = beta
    x = data(seed, shape, np.float32)
    dy = data(seed + 1, shape, np.float32)
    if nhwc:
        x, dy = x.transpose(0, 2, 3, 1), dy.transpose(0, 2, 3, 1)
    axis = 3 if nhwc else 1
    y = bn(x)
    dx = bn.backward(dy)
    b = stat_bounds(x, reduce_axes(4, axis), np.float32)
    truth = exact_bn(x, gamma, beta, bn.eps, axis, dy)
    assert_within(y, truth["y"], y_bound(truth, beta.reshape(channel_shape(4, axis, C)),
                                         np.float32, b), "y")
    err_dx, err_dgamma, err_dbeta = grad_bounds(truth, dy, np.float32, b)
    assert_within(dx, truth["dx"], err_dx, "dx")
    assert_within(bn.weight.grad, truth["dgamma"], err_dgamma, "weight.grad")
    assert_within(bn.bias.grad, truth["dbeta"], err_dbeta, "bias.grad")
    m = x.size // C
    unbiased = b.var * m / (m - 1)   # running_var = 0.9 * 1 + 0.1 * unbiased, in float32
    assert_within(bn.running_var, 0.9 + 0.1 * unbiased,
                  0.1 * (b.var_err + 2**-23 * unbiased) * m / (m - 1) + 2**-22 * (1 + unbiased),
                  "running_var")
