"""The grader (bnlab.exercises) against learners' code: one deliberately wrong implementation
per mistake it claims to recognise, each of which must get the feedback that names it, and
correct implementations written differently from bnlab's (step by step, Welford, float64
inside, the paper's chain rule), which must pass."""

import numpy as np
import pytest

from bnlab.exercises import (Feedback, check_backward, check_forward, check_function,
                             check_train_eval)

# --- correct learners, several ways -----------------------------------------------------------


def forward_closed(x, gamma, beta, eps):
    mu = x.mean(axis=0)
    var = x.var(axis=0)
    x_hat = (x - mu) / np.sqrt(var + eps)
    return gamma * x_hat + beta, (x_hat, gamma, var, eps)


def forward_steps(x, gamma, beta, eps):
    """The paper's four steps, one line each, with loops for the sums (CS231n style)."""
    N = x.shape[0]
    mu = np.zeros(x.shape[1])
    for i in range(N):
        mu += x[i]
    mu /= N
    xmu = x - mu
    var = (xmu**2).sum(axis=0) / N
    sqrtvar = np.sqrt(var + eps)
    ivar = 1.0 / sqrtvar
    xhat = xmu * ivar
    out = gamma * xhat + beta
    return out.astype(x.dtype), (xhat, gamma, xmu, ivar, sqrtvar, var, eps)


def forward_welford(x, gamma, beta, eps):
    """Statistics by Welford's running update, in float64."""
    n, mean, m2 = 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for row in x.astype(np.float64):
        n += 1
        d = row - mean
        mean += d / n
        m2 += d * (row - mean)
    var = m2 / n
    out = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return out.astype(x.dtype), ((x - mean) / np.sqrt(var + eps), gamma, var, eps)


def backward_closed(dout, cache):
    x_hat, gamma, var, eps = cache
    N = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx = gamma / np.sqrt(var + eps) / N * (N * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def backward_steps(dout, cache, sign=1.0):
    """The paper's chain rule through every intermediate (``sign=-1`` plants an error in
    dvar's exponent, as learners do)."""
    xhat, gamma, xmu, ivar, sqrtvar, var, eps = cache
    N = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    divar = (dxhat * xmu).sum(axis=0)
    dxmu1 = dxhat * ivar
    dsqrtvar = -1.0 / sqrtvar**2 * divar
    dvar = sign * 0.5 / np.sqrt(var + eps) * dsqrtvar
    dsq = np.ones_like(dout) / N * dvar
    dxmu2 = 2 * xmu * dsq
    dx1 = dxmu1 + dxmu2
    dmu = -dx1.sum(axis=0)
    dx2 = np.ones_like(dout) / N * dmu
    return dx1 + dx2, dgamma, dbeta


@pytest.mark.parametrize("forward", [forward_closed, forward_steps, forward_welford])
def test_correct_forwards_pass(forward):
    fb = check_forward(forward)
    assert isinstance(fb, Feedback) and fb.passed, fb.message
    assert "correct on all" in str(fb)


@pytest.mark.parametrize("forward,backward", [(forward_closed, backward_closed),
                                              (forward_steps, backward_steps)])
def test_correct_backwards_pass(forward, backward):
    fb = check_backward(forward, backward)
    assert fb.passed, fb.message


def test_nhwc_forward():
    def nhwc(x, gamma, beta, eps):
        mu = x.mean(axis=(0, 1, 2))
        var = x.var(axis=(0, 1, 2))
        return (x - mu) / np.sqrt(var + eps) * gamma + beta, None

    def wrong_axes(x, gamma, beta, eps):  # a 2-D habit on images: statistics over N only
        mu, var = x.mean(axis=0), x.var(axis=0)
        return (x - mu) / np.sqrt(var + eps) * gamma + beta, None

    assert check_forward(nhwc, layout="NHWC").passed
    fb = check_forward(wrong_axes, layout="NHWC")
    assert not fb.passed and "axes (0, 1, 2)" in fb.message and "batch axis 0 only" in fb.message


# --- one wrong learner per mistake --------------------------------------------------------


def fwd(mean_axis=0, ddof=0, eps_where="inside", affine="ok", center=True):
    def forward(x, gamma, beta, eps):
        mu = x.mean(axis=mean_axis, keepdims=True)
        var = x.var(axis=mean_axis, ddof=ddof, keepdims=True)
        xc = x - mu if center else x
        x_hat = xc / (np.sqrt(var) + eps) if eps_where == "outside" else \
            xc / np.sqrt(var + eps)
        if affine == "none":
            return x_hat, None
        if affine == "swapped":
            return beta * x_hat + gamma, None
        return gamma * x_hat + beta, None
    return forward


FORWARD_MISTAKES = {  # mistake: (learner, words the feedback must contain)
    "biased/unbiased swap": (fwd(ddof=1), ["unbiased", "dividing by m;", "variance"]),
    "eps outside the square root": (fwd(eps_where="outside"), ["outside the square root"]),
    "statistics over the features": (fwd(mean_axis=1), ["over the features", "axis 0"]),
    "gamma and beta missing": (fwd(affine="none"), ["gamma and beta are not applied"]),
    "gamma and beta swapped": (fwd(affine="swapped"), ["swapped"]),
    "mean not subtracted": (fwd(center=False), ["mean is not subtracted"]),
}


@pytest.mark.parametrize("mistake", FORWARD_MISTAKES)
def test_each_forward_mistake_is_named(mistake):
    learner, words = FORWARD_MISTAKES[mistake]
    fb = check_forward(learner)
    assert not fb.passed
    for w in words:
        assert w in fb.message, (mistake, fb.message)
    assert "np.sqrt(var + eps)" not in fb.message  # a hint, never the solution's code


def test_the_variance_by_cancellation_is_caught_on_the_offset_case():
    def cancel(x, gamma, beta, eps):
        mu = x.mean(0)
        var = (x * x).mean(0) - mu * mu
        return gamma * (x - mu) / np.sqrt(var + eps) + beta, None

    fb = check_forward(cancel)
    assert not fb.passed and "offset" in fb.message and "two passes" in fb.message

    def in_float32(x, gamma, beta, eps):
        return forward_closed(x.astype(np.float32), gamma, beta, eps)

    fb = check_forward(in_float32)
    assert not fb.passed and "precision" in fb.message


def bwd_no_gamma(dout, cache):
    x_hat, gamma, var, eps = cache
    dx, dg, db = backward_closed(dout, (x_hat, np.ones_like(gamma), var, eps))
    return dx, (dout * x_hat).sum(0), dout.sum(0)


def bwd_dbeta_wrong_axis(dout, cache):
    dx, dg, db = backward_closed(dout, cache)
    return dx, dg, dout.sum(axis=1)


def bwd_direct_only(dout, cache):
    x_hat, gamma, var, eps = cache
    return gamma * dout / np.sqrt(var + eps), (dout * x_hat).sum(0), dout.sum(0)


BACKWARD_MISTAKES = {
    "missing gamma in dx": (forward_closed, bwd_no_gamma, ["gamma is missing"]),
    "dbeta summed over the wrong axis": (forward_closed, bwd_dbeta_wrong_axis,
                                         ["summed over the features", "axis 0"]),
    "the paper's step-by-step backward with a sign error": (
        forward_steps, lambda d, c: backward_steps(d, c, sign=-1.0),
        ["variance has the wrong sign"]),
    "only the direct path": (forward_closed, bwd_direct_only, ["only the direct path"]),
}


@pytest.mark.parametrize("mistake", BACKWARD_MISTAKES)
def test_each_backward_mistake_is_named(mistake):
    forward, backward, words = BACKWARD_MISTAKES[mistake]
    fb = check_backward(forward, backward)
    assert not fb.passed
    for w in words:
        assert w in fb.message, (mistake, fb.message)


def step(running="torch", use_running_in_training=False, running_var="unbiased",
         eval_uses_batch=False):
    def fn(x, gamma, beta, rm, rv, training, momentum, eps):
        if training:
            mu, var = x.mean(0), x.var(0)
            m = x.shape[0]
            batch_var = var * m / (m - 1) if running_var == "unbiased" else var
            w_new = momentum if running == "torch" else 1 - momentum
            rm = (1 - w_new) * rm + w_new * mu
            rv = (1 - w_new) * rv + w_new * batch_var
            if use_running_in_training:
                mu, var = rm, rv
        elif eval_uses_batch:
            mu, var = x.mean(0), x.var(0)
        else:
            mu, var = rm, rv
        return (x - mu) / np.sqrt(var + eps) * gamma + beta, rm, rv
    return fn


def test_train_eval_mistakes():
    assert check_train_eval(step()).passed
    cases = {
        "Keras's momentum": (step(running="keras"), ["Keras", "weight of the new batch"]),
        "running statistics used in training": (
            step(use_running_in_training=True), ["normalized with the running averages"]),
        "biased running variance": (step(running_var="biased"), ["unbiased"]),
        "batch statistics in evaluation": (step(eval_uses_batch=True),
                                           ["evaluation", "running averages"]),
    }
    for mistake, (fn, words) in cases.items():
        fb = check_train_eval(fn)
        assert not fb.passed, mistake
        for w in words:
            assert w in fb.message, (mistake, fb.message)


def test_exceptions_and_wrong_returns_become_feedback():
    def broken(x, gamma, beta, eps):
        return x.mean(axis=0) @ np.ones((3, 3)), None  # a shape error

    fb = check_forward(broken)
    assert not fb.passed and "raised ValueError" in fb.message and "line" in fb.message
    fb = check_forward(lambda x, g, b, eps: x)
    assert not fb.passed and "pair (out, cache)" in fb.message
    fb = check_backward(forward_closed, lambda d, c: (d, d))
    assert not fb.passed and "three arrays" in fb.message


def test_pytorch_function():
    torch = pytest.importorskip("torch")

    class BN(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            mu = x.mean(0)
            var = x.var(0, correction=0)
            x_hat = (x - mu) / torch.sqrt(var + eps)
            ctx.save_for_backward(x_hat, gamma, var)
            ctx.eps = eps
            return gamma * x_hat + beta

        @staticmethod
        def backward(ctx, dout):
            x_hat, gamma, var = ctx.saved_tensors
            N = dout.shape[0]
            dbeta, dgamma = dout.sum(0), (dout * x_hat).sum(0)
            dx = gamma / torch.sqrt(var + ctx.eps) / N * (N * dout - dbeta - x_hat * dgamma)
            return dx, dgamma, dbeta, None

    assert check_function(BN).passed

    class NoGamma(BN):
        @staticmethod
        def backward(ctx, dout):
            dx, dgamma, dbeta, _ = BN.backward(ctx, dout)
            x_hat, gamma, var = ctx.saved_tensors
            return dx / gamma, dgamma, dbeta, None

    fb = check_function(NoGamma)
    assert not fb.passed and "gamma is missing" in fb.message

    class Unbiased(BN):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            mu, var = x.mean(0), x.var(0)  # torch's default: unbiased
            ctx.save_for_backward(x, gamma, var)
            return gamma * (x - mu) / torch.sqrt(var + eps) + beta

    fb = check_function(Unbiased)
    assert not fb.passed and "unbiased" in fb.message
