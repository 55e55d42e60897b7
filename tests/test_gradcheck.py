"""Finite-difference checks of the hand-written backward passes (float64, no framework)."""

import numpy as np
import pytest

import bnlab
from bnlab import nn


def numerical_grad(f, x, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of x (in place)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


def fd_check(layer, x, rng):
    """dx and parameter gradients of loss = sum(w * layer(x)) against central differences."""
    w = rng.standard_normal(layer(x).shape)
    loss = lambda: float((w * layer(x)).sum())  # noqa: E731
    layer.zero_grad()
    layer(x)
    dx = layer.backward(w)
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)
    for p in layer.parameters():
        np.testing.assert_allclose(p.grad, numerical_grad(loss, p.data), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 3, 2), 1),
                                        ((2, 3, 2, 3), -1)])
def test_batch_norm_backward_matches_finite_differences(shape, axis):
    rng = np.random.default_rng(1)
    C = shape[axis]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    w = rng.standard_normal(shape)  # loss = sum(w * y): dy = w

    def loss():
        y, _ = bnlab.batch_norm_forward(x, gamma, beta, axis=axis)
        return float((w * y).sum())

    _, cache = bnlab.batch_norm_forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = bnlab.batch_norm_backward(w, cache)
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, numerical_grad(loss, gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, numerical_grad(loss, beta), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("layer,shape", [
    (lambda: nn.BatchNorm1d(3, dtype=np.float64), (6, 3)),
    (lambda: nn.BatchNorm1d(2, dtype=np.float64), (3, 2, 4)),
    (lambda: nn.BatchNorm2d(3, dtype=np.float64), (2, 3, 3, 3)),
    (lambda: nn.BatchNorm2d(2, dtype=np.float64, data_format="NHWC"), (2, 3, 3, 2)),
])
@pytest.mark.parametrize("training", [True, False])
def test_layer_backward_matches_finite_differences(layer, shape, training):
    rng = np.random.default_rng(2)
    bn = layer()
    bn.weight.data[...] = rng.standard_normal(bn.num_features)
    bn.bias.data[...] = rng.standard_normal(bn.num_features)
    bn.running_mean[...] = rng.standard_normal(bn.num_features)
    bn.running_var[...] = 0.5 + rng.random(bn.num_features)
    bn.train(training)
    bn.momentum = 0.0  # keeps the buffers still while the finite differences run
    fd_check(bn, rng.standard_normal(shape), rng)
