"""bnlab.functional against float64 PyTorch, plus conventions and errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F
from conftest import LAYOUTS, from_torch, sample, to_torch

# float64 against float64: only summation order differs.
FWD64 = dict(rtol=1e-12, atol=1e-12)
BWD64 = dict(rtol=1e-10, atol=1e-11)


def torch_train_bn(x, gamma, beta, dy, layout, eps=1e-5):
    """y, dx, dgamma, dbeta from torch.nn.functional.batch_norm in float64."""
    xt = to_torch(x, layout).requires_grad_(True)
    g = torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    y = TF.batch_norm(xt, None, None, g, b, training=True, eps=eps)
    y.backward(to_torch(dy, layout))
    return from_torch(y, layout), from_torch(xt.grad, layout), g.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_forward_backward_match_torch_float64(layout, eps, rng):
    shape, axis = LAYOUTS[layout]["shape"], LAYOUTS[layout]["axis"]
    C = shape[axis]
    x = sample(rng, shape, loc=2.0, scale=3.0)
    dy = sample(rng, shape)
    gamma, beta = sample(rng, (C,), loc=1.0), sample(rng, (C,))
    y, cache = bnlab.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(dy, cache)
    ty, tdx, tdg, tdb = torch_train_bn(x, gamma, beta, dy, layout, eps)
    np.testing.assert_allclose(y, ty, **FWD64)
    np.testing.assert_allclose(dx, tdx, **BWD64)
    np.testing.assert_allclose(dgamma, tdg, **BWD64)
    np.testing.assert_allclose(dbeta, tdb, **BWD64)


def test_float32_is_computed_in_float32_and_close_to_float64_torch(rng):
    x = sample(rng, (16, 4, 6, 6), np.float32, loc=1.0, scale=2.0)
    dy = sample(rng, x.shape, np.float32)
    gamma, beta = sample(rng, (4,), np.float32, loc=1.0), sample(rng, (4,), np.float32)
    y, cache = bnlab.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(dy, cache)
    assert y.dtype == dx.dtype == np.float32
    ty, tdx, tdg, tdb = torch_train_bn(x, gamma, beta, dy, "NCHW")
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, tdx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, tdg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, tdb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("with_affine", [True, False])
def test_batch_norm_updates_buffers_like_torch(momentum, with_affine, rng):
    C = 3
    rm, rv = np.zeros(C), np.ones(C)
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    w = sample(rng, (C,), loc=1.0) if with_affine else None
    b = sample(rng, (C,)) if with_affine else None
    tw = None if w is None else torch.from_numpy(w)
    tb = None if b is None else torch.from_numpy(b)
    for _ in range(3):
        x = sample(rng, (5, C, 4, 4), loc=1.5)
        y = bnlab.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
        ty = TF.batch_norm(torch.from_numpy(x), trm, trv, tw, tb, training=True,
                           momentum=momentum)
        np.testing.assert_allclose(y, ty.numpy(), **FWD64)
        np.testing.assert_allclose(rm, trm.numpy(), **FWD64)
        np.testing.assert_allclose(rv, trv.numpy(), **FWD64)
    x = sample(rng, (2, C, 4, 4))
    y = bnlab.batch_norm(x, rm, rv, w, b, training=False)
    ty = TF.batch_norm(torch.from_numpy(x), trm, trv, tw, tb, training=False)
    np.testing.assert_allclose(y, ty.numpy(), **FWD64)


def test_running_var_is_unbiased_and_normalization_biased(rng):
    x = sample(rng, (4, 2), loc=1.0)
    rm, rv = np.zeros(2), np.zeros(2)
    y = bnlab.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rv, x.var(axis=0, ddof=1))
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5))


def test_float16_keeps_float16_with_float32_statistics(rng):
    x64 = sample(rng, (32, 4, 3, 3), loc=3.0, scale=0.5)
    x16 = x64.astype(np.float16)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    y, cache = bnlab.batch_norm_forward(x16, gamma, beta)
    assert y.dtype == np.float16 and cache.mean.dtype == np.float32
    # Against float64 statistics of the same float16 values: only output rounding remains.
    ref, _ = bnlab.batch_norm_forward(x16.astype(np.float64), gamma, beta)
    np.testing.assert_allclose(y.astype(np.float64), ref, atol=4e-3, rtol=1e-3)
    dx, dgamma, _ = bnlab.batch_norm_backward(np.ones_like(x16), cache)
    assert dx.dtype == np.float16 and dgamma.dtype == np.float32
    mean, var = bnlab.moments(x16, [0, 2, 3])
    assert mean.dtype == var.dtype == np.float16


def test_large_common_offset_keeps_the_variance(rng):
    noise = rng.standard_normal((4096, 3))
    x = (1e4 + noise).astype(np.float32)
    true_var = x.astype(np.float64).var(axis=0)
    _, var = bnlab.moments(x, [0])
    np.testing.assert_allclose(var, true_var, rtol=1e-3)
    y, cache = bnlab.batch_norm_forward(x, None, None, axis=1)
    np.testing.assert_allclose(cache.var, true_var, rtol=1e-3)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-3)


def test_standardize_is_the_z_score(rng):
    x = sample(rng, (50, 3), loc=7.0, scale=4.0)
    z = bnlab.standardize(x, axis=0)
    np.testing.assert_allclose(z, (x - x.mean(0)) / x.std(0), **FWD64)
    z_all = bnlab.standardize(x)
    assert abs(z_all.mean()) < 1e-12 and abs(z_all.std() - 1) < 1e-12
    np.testing.assert_allclose(bnlab.standardize(np.ones((3, 2)), eps=1e-5), 0.0)


def test_eval_backward_is_the_scaled_upstream_gradient(rng):
    x, dy = sample(rng, (6, 3)), sample(rng, (6, 3))
    mean, var, gamma = sample(rng, (3,)), 1 + rng.random(3), sample(rng, (3,))
    _, cache = F.batch_norm_inference(x, mean, var, gamma, None, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(dx, dy * gamma / np.sqrt(var + 1e-5), **FWD64)
    np.testing.assert_allclose(dgamma, (dy * (x - mean) / np.sqrt(var + 1e-5)).sum(0), **BWD64)
    np.testing.assert_allclose(dbeta, dy.sum(0), **BWD64)


# --- errors ------------------------------------------------------------------------------


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point.*got dtype int64"):
        bnlab.batch_norm_forward(np.arange(12).reshape(4, 3), None, None)
    with pytest.raises(TypeError, match="floating-point"):
        bnlab.moments(np.arange(4), [0])
    with pytest.raises(TypeError, match="floating-point"):
        bnlab.standardize(np.arange(4))


def test_one_value_per_channel_in_training():
    msg = r"expected more than 1 value per channel when training, got input of size \(1, 8, 1, 1\)"
    with pytest.raises(ValueError, match=msg):
        bnlab.batch_norm_forward(np.zeros((1, 8, 1, 1)), None, None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnlab.batch_norm(np.zeros((1, 8)), np.zeros(8), np.ones(8), training=True)


def test_parameter_shapes_are_checked():
    x = np.zeros((4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"gamma \(weight\) must have shape \(C,\) = \(3,\), got \(4,\)"):
        bnlab.batch_norm_forward(x, np.ones(4), None)
    with pytest.raises(ValueError, match=r"beta \(bias\) must have shape"):
        bnlab.batch_norm_forward(x, None, np.ones((3, 1)))
    with pytest.raises(ValueError, match="running_mean must have shape"):
        bnlab.batch_norm(x, np.zeros(2), np.ones(3), training=False)
    with pytest.raises(ValueError, match="running_var must have shape"):
        bnlab.batch_norm(x, np.zeros(3), np.ones(2), training=True)
    with pytest.raises(ValueError, match="required when training=False"):
        bnlab.batch_norm(x, None, None, training=False)


def test_nan_input_is_reported_in_training():
    x = np.ones((4, 3))
    x[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match=r"contains NaN or inf.*channel\(s\) \[1\]"):
        bnlab.batch_norm_forward(x, None, None)


def test_axis_and_rank_errors():
    with pytest.raises(ValueError, match="at least 2D"):
        bnlab.batch_norm_forward(np.zeros(5), None, None)
    with pytest.raises(ValueError, match="out of range"):
        bnlab.batch_norm_forward(np.zeros((2, 3)), None, None, axis=2)
    with pytest.raises(ValueError, match="repeated axis"):
        bnlab.moments(np.zeros((2, 3)), [0, -2])
    _, cache = bnlab.batch_norm_forward(np.random.rand(4, 3), None, None)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 2\)"):
        bnlab.batch_norm_backward(np.zeros((4, 2)), cache)
