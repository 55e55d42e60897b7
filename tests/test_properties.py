"""Property tests (hypothesis) for what batch normalization promises."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import nn

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
@given(shape=shapes4, seed=st.integers(0, 2**32 - 1), training=st.booleans())
def test_nhwc_equals_transposed_nchw(shape, seed, training):
    C = shape[1]
    nchw, nhwc = nn.BatchNorm2d(C), nn.BatchNorm2d(C, data_format="NHWC")
    rng = np.random.default_rng(seed)
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    for bn in (nchw, nhwc):
        bn.weight.data[...] = gamma
        bn.bias.data[...] = beta
        bn.train(training)
    x = data(seed, shape, np.float32)
    dy = data(seed + 1, shape, np.float32)
    y1, y2 = nchw(x), nhwc(x.transpose(0, 2, 3, 1))
    dx1, dx2 = nchw.backward(dy), nhwc.backward(dy.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(y2, y1.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx2, dx1.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nhwc.weight.grad, nchw.weight.grad, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(nhwc.running_var, nchw.running_var, rtol=1e-5)
