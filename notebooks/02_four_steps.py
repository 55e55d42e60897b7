# %% [markdown]
# # 2. The four steps by hand
#
# Batch normalization of a mini-batch, per feature (Ioffe & Szegedy 2015, Algorithm 1):
#
# 1. mean: `mu = mean(x)` over the batch
# 2. variance: `var = mean((x - mu)**2)` (biased: divide by m)
# 3. normalize: `x_hat = (x - mu) / sqrt(var + eps)`
# 4. scale and shift: `out = gamma * x_hat + beta`
#
# Write it yourself, let the grader check it, then meet the same computation in
# TensorFlow's and PyTorch's clothes.

# %%
import numpy as np

import bnlab
from bnlab.exercises import check_forward, check_train_eval

rng = np.random.default_rng(0)
x = 5.0 + 2.0 * rng.standard_normal((60, 4))  # a mini-batch of 60, 4 features
gamma, beta = np.ones(4), np.zeros(4)

# %% [markdown]
# ## Exercise 1: the forward pass
#
# `x` is (N, D); return `out` (N, D) and a `cache` with whatever your backward will need
# (notebook 3). The grader runs your function on several inputs (one feature, a large
# common offset, a large eps, float32) and names the first wrong step.

# %%
def batchnorm_forward(x, gamma, beta, eps):
    # BEGIN SOLUTION
    mu = x.mean(axis=0)
    var = x.var(axis=0)
    x_hat = (x - mu) / np.sqrt(var + eps)
    out = gamma * x_hat + beta
    cache = (x_hat, gamma, var, eps)
    # END SOLUTION
    return out, cache


print(check_forward(batchnorm_forward))

# %% [markdown]
# The statistics after BN: each feature now has mean 0 and standard deviation 1 (almost:
# eps), whatever it had before.

# %%
out, _ = batchnorm_forward(x, gamma, beta, 1e-5)
print("before:", x.mean(0).round(2), x.std(0).round(2))
print("after: ", out.mean(0).round(6), out.std(0).round(4))

# %% [markdown]
# ## The same in TensorFlow's and PyTorch's signatures
#
# `bnlab.moments` and `bnlab.batch_normalization` follow `tf.nn.moments` and
# `tf.nn.batch_normalization`; `bnlab.batch_norm` follows
# `torch.nn.functional.batch_norm` (channels on axis 1, running statistics updated in
# place).

# %%
mean, variance = bnlab.moments(x, axes=[0])
y_tf = bnlab.batch_normalization(x, mean, variance, offset=beta, scale=gamma,
                                 variance_epsilon=1e-5)
running_mean, running_var = np.zeros(4), np.ones(4)
y_torch = bnlab.batch_norm(x, running_mean, running_var, gamma, beta, training=True,
                           momentum=0.1, eps=1e-5)
print(np.abs(y_tf - out).max(), np.abs(y_torch - out).max())
print("running averages after one batch:", running_mean.round(3), running_var.round(3))

# %% [markdown]
# ## Exercise 2: training and evaluation
#
# In training, BN normalizes with the batch's statistics and keeps running averages of
# them: `running = (1 - momentum) * running + momentum * batch` (PyTorch's convention:
# momentum is the weight of the *new* batch; Keras's `momentum=0.99` is 0.01 here), with the
# *unbiased* variance for the running one. In evaluation it normalizes with the running
# averages, so one sample's output does not depend on the others in its batch.

# %%
def batchnorm_step(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    # BEGIN SOLUTION
    if training:
        m = x.shape[0]
        mu, var = x.mean(axis=0), x.var(axis=0)
        running_mean = (1 - momentum) * running_mean + momentum * mu
        running_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mu, var = running_mean, running_var
    out = gamma * (x - mu) / np.sqrt(var + eps) + beta
    # END SOLUTION
    return out, running_mean, running_var


print(check_train_eval(batchnorm_step))
