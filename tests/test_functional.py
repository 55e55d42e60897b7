"""bnlab.functional against float64 PyTorch, plus conventions and errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F
from bnlab import nn
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


BACKENDS = ["numpy", "numba"]  # the reference itself, and the fused kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_forward_backward_match_torch_float64(layout, eps, backend, rng):
    shape, axis = LAYOUTS[layout]["shape"], LAYOUTS[layout]["axis"]
    C = shape[axis]
    x = sample(rng, shape, loc=2.0, scale=3.0)
    dy = sample(rng, shape)
    gamma, beta = sample(rng, (C,), loc=1.0), sample(rng, (C,))
    y, cache = bnlab.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis, backend=backend)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(dy, cache, backend=backend)
    ty, tdx, tdg, tdb = torch_train_bn(x, gamma, beta, dy, layout, eps)
    np.testing.assert_allclose(y, ty, **FWD64)
    np.testing.assert_allclose(dx, tdx, **BWD64)
    np.testing.assert_allclose(dgamma, tdg, **BWD64)
    np.testing.assert_allclose(dbeta, tdb, **BWD64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_is_computed_in_float32_and_close_to_float64_torch(backend, rng):
    x = sample(rng, (16, 4, 6, 6), np.float32, loc=1.0, scale=2.0)
    dy = sample(rng, x.shape, np.float32)
    gamma, beta = sample(rng, (4,), np.float32, loc=1.0), sample(rng, (4,), np.float32)
    y, cache = bnlab.batch_norm_forward(x, gamma, beta, backend=backend)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(dy, cache, backend=backend)
    assert y.dtype == dx.dtype == np.float32
    ty, tdx, tdg, tdb = torch_train_bn(x, gamma, beta, dy, "NCHW")
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, tdx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma, tdg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, tdb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("with_affine", [True, False])
def test_batch_norm_updates_buffers_like_torch(momentum, with_affine, backend, rng):
    C = 3
    rm, rv = np.zeros(C), np.ones(C)
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    w = sample(rng, (C,), loc=1.0) if with_affine else None
    b = sample(rng, (C,)) if with_affine else None
    tw = None if w is None else torch.from_numpy(w)
    tb = None if b is None else torch.from_numpy(b)
    for _ in range(3):
        x = sample(rng, (5, C, 4, 4), loc=1.5)
        y = bnlab.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, backend=backend)
        ty = TF.batch_norm(torch.from_numpy(x), trm, trv, tw, tb, training=True,
                           momentum=momentum)
        np.testing.assert_allclose(y, ty.numpy(), **FWD64)
        np.testing.assert_allclose(rm, trm.numpy(), **FWD64)
        np.testing.assert_allclose(rv, trv.numpy(), **FWD64)
    x = sample(rng, (2, C, 4, 4))
    y = bnlab.batch_norm(x, rm, rv, w, b, training=False, backend=backend)
    ty = TF.batch_norm(torch.from_numpy(x), trm, trv, tw, tb, training=False)
    np.testing.assert_allclose(y, ty.numpy(), **FWD64)


def test_running_var_is_unbiased_and_normalization_biased(rng):
    x = sample(rng, (4, 2), loc=1.0)
    rm, rv = np.zeros(2), np.zeros(2)
    y = bnlab.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rv, x.var(axis=0, ddof=1))
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_keeps_float16_with_float32_statistics(backend, rng):
    x16 = sample(rng, (32, 4, 3, 3), loc=3.0, scale=0.5).astype(np.float16)
    dy16 = sample(rng, x16.shape).astype(np.float16)
    gamma, beta = sample(rng, (4,), np.float32, loc=1.0), sample(rng, (4,), np.float32)
    y, cache = bnlab.batch_norm_forward(x16, gamma, beta, backend=backend)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(dy16, cache, backend=backend)
    assert y.dtype == dx.dtype == np.float16 and cache.mean.dtype == dgamma.dtype == np.float32
    # PyTorch's float16 batch norm (float32 statistics and weights, as bnlab's): within one
    # float16 rounding of each other
    xt = torch.from_numpy(x16).requires_grad_(True)
    g, b = (torch.from_numpy(v).requires_grad_(True) for v in (gamma, beta))
    ty = TF.batch_norm(xt, None, None, g, b, training=True)
    ty.backward(torch.from_numpy(dy16))
    assert ty.dtype == xt.grad.dtype == torch.float16
    ulp16 = 2.0 ** -10
    np.testing.assert_allclose(y.astype(np.float64), ty.detach().numpy().astype(np.float64),
                               rtol=ulp16, atol=2.0 ** -24)
    np.testing.assert_allclose(dx.astype(np.float64), xt.grad.numpy().astype(np.float64),
                               rtol=ulp16, atol=1e-3 * ulp16)
    np.testing.assert_allclose(dgamma, g.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbeta, b.grad.numpy(), rtol=1e-5, atol=1e-5)
    # and against float64 PyTorch on the same float16 values: y rounded once to float16
    ty64, *_ = torch_train_bn(x16.astype(np.float64), gamma.astype(np.float64),
                              beta.astype(np.float64), dy16.astype(np.float64), "NCHW")
    np.testing.assert_allclose(y.astype(np.float64), ty64, rtol=ulp16 / 2 + 1e-6, atol=2.0 ** -24)
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


# --- inputs a new user may pass (each once an unclear error or a silent wrong answer) ----


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_finite_values_are_not_reported_as_nan(backend):
    # float32 near 3e37: a constant channel has variance 0 (a float32 sum would overflow)
    x = np.full((100, 2), 3e37, np.float32)
    y, cache = bnlab.batch_norm_forward(x, None, None, backend=backend)
    assert np.all(y == 0) and np.all(cache.mean == np.float32(3e37)) and np.all(cache.var == 0)
    # a spread of 3e35 has a variance of 1e71, past float32: said so, not "NaN or inf"
    x[::2] *= 1.01
    with pytest.raises(FloatingPointError, match="is finite, but the batch variance.*overflows "
                                                 "float32: rescale the input or compute in float64"):
        bnlab.batch_norm_forward(x, None, None, backend=backend)
    # float64 near the top of the range: sums past 1.8e308 are redone rescaled, so the mean
    # is right; the variance, 1e615, is past float64, and said so
    x = np.array([[1.0, -1.0], [1.5, -1.2], [1.7, -1.7]])
    mean, _ = bnlab.moments(x * 1e308, [0])
    np.testing.assert_allclose(mean, x.mean(0) * 1e308, rtol=1e-15)
    with pytest.raises(FloatingPointError, match="overflows float64: rescale the input$"):
        bnlab.batch_norm_forward(x * 1e308, None, None, backend=backend)
    # a variance of 1e299 fits: the same y as for the unscaled values (eps 0 in both)
    y, _ = bnlab.batch_norm_forward(x * 1e150, None, None, eps=0.0, backend=backend)
    y1, _ = bnlab.batch_norm_forward(x, None, None, eps=0.0, backend=backend)
    np.testing.assert_allclose(y, y1, rtol=1e-14)


def test_longdouble_takes_the_reference_and_numba_refuses_it():
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.longdouble)
    y, cache = bnlab.batch_norm_forward(x, None, None)          # auto: the NumPy path
    assert y.dtype == cache.mean.dtype == np.longdouble
    y64, _ = bnlab.batch_norm_forward(x.astype(np.float64), None, None)
    np.testing.assert_allclose(y.astype(np.float64), y64, rtol=1e-14)
    with pytest.raises(TypeError, match=r'backend="numba" computes in float32 or float64.*got '
                                        r'float128.*use backend="numpy"'):
        bnlab.batch_norm_forward(x, None, None, backend="numba")
    assert bnlab.moments(x, [0])[0].dtype == bnlab.standardize(x).dtype == np.longdouble


@pytest.mark.parametrize("missing", ["mean", "variance"])
def test_tf_batch_normalization_requires_its_statistics(missing):
    x = np.ones((2, 3), np.float32)
    args = dict(mean=np.zeros(3), variance=np.ones(3))
    args[missing] = None
    with pytest.raises(TypeError, match=f"{missing} is required.*got None"):
        bnlab.batch_normalization(x, args["mean"], args["variance"], None, None, 1e-3)
    with pytest.raises(TypeError, match="variance_epsilon must be a real number, got None"):
        bnlab.batch_normalization(x, np.zeros(3), np.ones(3), None, None, None)
    with pytest.raises(ValueError, match="variance_epsilon must be a finite number"):
        bnlab.batch_normalization(x, np.zeros(3), np.ones(3), None, None, float("nan"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_channels_give_empty_results(backend):
    x = np.zeros((4, 0), np.float32)
    y, cache = bnlab.batch_norm_forward(x, None, None, backend=backend)
    assert y.shape == (4, 0) and cache.mean.shape == cache.var.shape == (0,)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(np.zeros_like(x), cache, backend=backend)
    assert dx.shape == (4, 0) and dgamma.shape == dbeta.shape == (0,)
    rm, rv = np.zeros(0, np.float32), np.ones(0, np.float32)
    assert bnlab.batch_norm(x, rm, rv, training=True, backend=backend).shape == (4, 0)
    assert bnlab.batch_norm(x, rm, rv, backend=backend).shape == (4, 0)
    mean, var = bnlab.moments(x, [0])
    assert mean.shape == var.shape == (0,) and mean.dtype == np.float32
    assert bnlab.standardize(x, axis=0).shape == (4, 0)
    with pytest.raises(ValueError, match=r"moments over no values: axes \[0\] of x with shape "
                                         r"\(0, 3\) are empty"):
        bnlab.moments(np.zeros((0, 3)), [0])
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(0, 3\)"):
        bnlab.batch_norm_forward(np.zeros((0, 3)), None, None, backend=backend)


def test_running_buffers_must_be_arrays_updated_in_place():
    x = np.random.default_rng(2).standard_normal((4, 2))
    with pytest.raises(TypeError, match=r"running_mean is updated in place, so it must be a NumPy "
                                        r"array of shape \(2,\), got list"):
        bnlab.batch_norm(x, [0.0, 0.0], [1.0, 1.0], training=True)
    frozen = np.ones(2)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is updated in place, but the array given "
                                         "is read-only"):
        bnlab.batch_norm(x, np.zeros(2), frozen, training=True)
    # evaluation only reads them: lists are fine there
    np.testing.assert_allclose(bnlab.batch_norm(x, [0.0, 0.0], [1.0, 1.0]),
                               x / np.sqrt(1 + 1e-5))


def test_functional_momentum_none_and_bad_numbers():
    x = np.random.default_rng(3).standard_normal((4, 2))
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(TypeError, match=r"momentum=None \(a cumulative average\) needs the number "
                                        r"of batches seen.*momentum=1/num_batches_tracked"):
        bnlab.batch_norm(x, rm, rv, training=True, momentum=None)
    # what the message advises is what the layers do: the second batch with weight 1/2
    layer = nn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    x2 = np.random.default_rng(4).standard_normal((4, 2))
    layer(x)
    layer(x2)
    for k, batch in enumerate((x, x2), start=1):
        bnlab.batch_norm(batch, rm, rv, training=True, momentum=1 / k)
    np.testing.assert_allclose(rm, layer.running_mean, rtol=1e-15)
    np.testing.assert_allclose(rv, layer.running_var, rtol=1e-15)
    assert np.all(np.isfinite(rm)) and not np.shares_memory(rm, layer.running_mean)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        bnlab.batch_norm(x, rm, rv, training=True, momentum=1.5)
    with pytest.raises(TypeError, match="momentum must be a real number, got '0.1'"):
        bnlab.batch_norm(x, rm, rv, training=True, momentum="0.1")
    with pytest.raises(TypeError, match="eps must be a real number, got None"):
        bnlab.batch_norm_forward(x, None, None, eps=None)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0.0, got -1.0"):
        bnlab.batch_norm(x, rm, rv, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0.0"):
        bnlab.standardize(x, eps=float("inf"))
    with pytest.raises(TypeError, match=r"axes must be integers, got 1.5"):
        bnlab.batch_norm_forward(x, None, None, axis=1.5)
