# %% [markdown]
# # 1. Why normalize
#
# A network learns fastest when each layer's inputs are centred and of similar scale. For the
# *first* layer we can arrange that once, by scaling the data. Ioffe & Szegedy (2015) argue
# that the inputs of the *inner* layers keep drifting as the layers below them learn
# ("internal covariate shift"), and batch normalization (BN) re-normalizes them at every
# step. This notebook does both on the embedded MNIST digits: scale the data, then watch a
# network's inner activations drift during training without BN.

# %%
import matplotlib.pyplot as plt
import numpy as np

import bnlab
from bnlab import data, models, nn, train

digits = data.load("mnist-5k")  # 4,000 training and 1,000 test images, embedded
x, y = digits.train
x = x.reshape(len(x), -1).astype(np.float64)  # (4000, 784) pixels in [0, 1]
print(x.shape, x.min(), x.max())

# %% [markdown]
# ## Exercise 1: z-score scaling
#
# Scale every feature (pixel) to mean 0 and standard deviation 1 over the training set:
# `z = (x - mean) / sqrt(var + eps)`, with the biased variance. Pixels that are always 0
# have variance 0: that is what `eps` is for.

# %%
def zscore(x, eps=1e-8):
    # BEGIN SOLUTION
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    return (x - mean) / np.sqrt(var + eps)
    # END SOLUTION


z = zscore(x)
assert np.allclose(z, bnlab.standardize(x, axis=0, eps=1e-8)), "compare with bnlab.standardize"
print("per-feature mean of z:", abs(z.mean(axis=0)).max(), " std:", z.std(axis=0).max())

# %% [markdown]
# ## Exercise 2: min-max scaling
#
# Scale every feature to [0, 1]: `(x - min) / (max - min)`; a constant feature becomes 0.

# %%
def minmax(x):
    # BEGIN SOLUTION
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (x - lo) / span
    # END SOLUTION


assert np.allclose(minmax(x), bnlab.minmax_scale(x, axis=0)), "compare with bnlab.minmax_scale"
fig, axes = plt.subplots(1, 3, figsize=(10, 2.5))
for ax, (name, v) in zip(axes, [("raw", x), ("z-score", z), ("min-max", minmax(x))]):
    ax.hist(v[:, 350], bins=30)
    ax.set_title(f"pixel 350, {name}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Internal covariate shift
#
# The paper's MLP (784-100-100-100-10, sigmoid) trained without BN: every few steps we
# record the 15th, 50th and 85th percentiles of one unit's input to its sigmoid in the last
# hidden layer (the paper's Figure 1). Without BN they wander as the layers below learn; with
# BN they stay put.

# %%
def percentiles_during_training(bn, steps=300, every=10, unit=0):
    net = models.paper_mlp(bn=bn, seed=0)
    probe = digits.train[0][:500]
    rec = []

    def callback(step, model):
        if step % every == 0:
            acts = [i for i, layer in enumerate(model) if isinstance(layer, nn.Sigmoid)]
            model.eval()
            h = probe
            for layer in list(model)[: acts[-1]]:
                h = layer(h)
            model.train()
            rec.append(np.percentile(h[:, unit], [15, 50, 85]))

    train.fit(net, digits, steps=steps, lr=0.5, batch_size=60, progress=False,
              callback=callback)
    return np.array(rec)


fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, bn in zip(axes, (False, True)):
    p = percentiles_during_training(bn)
    for k, style in enumerate([":", "-", "--"]):
        ax.plot(np.arange(1, len(p) + 1) * 10, p[:, k], style, color="C0" if bn else "C3")
    ax.set_title("with BN" if bn else "without BN")
    ax.set_xlabel("step")
axes[0].set_ylabel("sigmoid input: 15/50/85th pct")
plt.tight_layout()
plt.show()
