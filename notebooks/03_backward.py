# %% [markdown]
# # 3. The backward pass
#
# Derive the gradient of batch normalization, check it numerically, then meet the one-line
# closed form. In training the mean and variance are computed from x itself, so x reaches
# the output along three paths: directly, through the mean, and through the variance.

# %%
import numpy as np

from bnlab.exercises import check_backward

rng = np.random.default_rng(1)


def batchnorm_forward(x, gamma, beta, eps):
    mu = x.mean(axis=0)
    xmu = x - mu
    var = (xmu**2).mean(axis=0)
    ivar = 1.0 / np.sqrt(var + eps)
    x_hat = xmu * ivar
    return gamma * x_hat + beta, (x_hat, xmu, ivar, gamma)


# %% [markdown]
# ## Exercise: the backward, step by step
#
# Walk the graph backwards: `dbeta`, `dgamma`, then `dx_hat = dout * gamma`, the gradient
# reaching `ivar`, the variance, the mean, and finally x along each path. Return
# `(dx, dgamma, dbeta)`.

# %%
def batchnorm_backward(dout, cache):
    x_hat, xmu, ivar, gamma = cache
    m = dout.shape[0]
    # BEGIN SOLUTION
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    divar = (dx_hat * xmu).sum(axis=0)
    dvar = divar * -0.5 * ivar**3  # ivar = (var + eps)^(-1/2)
    dxmu = dx_hat * ivar + dvar * 2 * xmu / m
    dmu = -dxmu.sum(axis=0)
    dx = dxmu + dmu / m
    # END SOLUTION
    return dx, dgamma, dbeta


print(check_backward(batchnorm_forward, batchnorm_backward))

# %% [markdown]
# ## A numerical check
#
# Central differences: `(f(x + h) - f(x - h)) / 2h` for `f = sum(out * dout)`, element by
# element. They agree with the analytic gradient to about `h**2`.

# %%
x = rng.standard_normal((5, 3))
gamma, beta, eps = rng.random(3) + 0.5, rng.standard_normal(3), 1e-5
dout = rng.standard_normal((5, 3))
out, cache = batchnorm_forward(x, gamma, beta, eps)
dx, dgamma, dbeta = batchnorm_backward(dout, cache)
h, num = 1e-5, np.zeros_like(x)
for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    num[idx] = ((batchnorm_forward(xp, gamma, beta, eps)[0]
                 - batchnorm_forward(xm, gamma, beta, eps)[0]) * dout).sum() / (2 * h)
print("max |analytic - numerical| =", np.abs(dx - num).max())

# %% [markdown]
# ## The closed form
#
# Collecting the three paths gives one expression (what bnlab's kernels compute):
#
# `dx = gamma / sqrt(var + eps) / m * (m * dout - sum(dout) - x_hat * sum(dout * x_hat))`
#
# The last two terms are the gradient through the mean and through the variance: dx has
# zero sum over the batch, and no component along x_hat. That is what makes BN's gradient
# invariant to the scale of the layer before it.

# %%
x_hat, xmu, ivar, _ = cache
closed = gamma * ivar / 5 * (5 * dout - dout.sum(0) - x_hat * (dout * x_hat).sum(0))
print(np.abs(closed - dx).max(), dx.sum(axis=0).round(12), (dx * x_hat).sum(axis=0).round(12))
