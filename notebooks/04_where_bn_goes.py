# %% [markdown]
# # 4. Where BN goes, and what it buys
#
# BN sits after the convolution or affine map and before the nonlinearity:
# conv → BN → ReLU → pool, and affine → BN → activation. The paper's claims: faster
# training, larger learning rates, less careful initialization, a little regularization.
# Here each is measured on the embedded digits, in short runs (the notebook's own); bnlab's
# committed longer runs are in the documentation's "What BN does, measured" page.

# %%
import matplotlib.pyplot as plt
import numpy as np

from bnlab import data, models, nn, train

digits = data.load("mnist-5k")
print(models.seed_cnn(bn=True))  # conv -> BN -> ReLU -> pool, twice, then linear

# %% [markdown]
# ## Exercise: put BN in its place
#
# Build an MLP 784-64-64-10 with ReLU, and BN after each affine map, before the ReLU
# (`nn.Linear`, `nn.BatchNorm1d`, `nn.ReLU`; `nn.Flatten()` first, images are (N, 1, 28, 28)).
# A layer followed by BN needs no bias of its own: BN's beta replaces it.

# %%
def mlp_with_bn(seed=0):
    rng = np.random.default_rng(seed)
    # BEGIN SOLUTION
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 64, bias=False, rng=rng), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 64, bias=False, rng=rng), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10, rng=rng),
    )
    # END SOLUTION


net = mlp_with_bn()
kinds = [type(layer).__name__ for layer in net]
assert kinds.index("BatchNorm1d") == kinds.index("Linear") + 1, "BN right after the affine map"
assert kinds.index("ReLU") == kinds.index("BatchNorm1d") + 1, "and before the activation"
hist = train.fit(net, digits, steps=100, lr=0.1, batch_size=64, progress=False, eval_every=50)
print("test accuracy after 100 steps:", hist.test_accuracy[-1])

# %% [markdown]
# ## Faster training: the seed CNN with and without BN

# %%
curves = {}
for bn in (True, False):
    h = train.fit(models.seed_cnn(bn=bn, seed=0), digits, steps=80, lr=0.05, batch_size=64,
                  progress=False, eval_every=20)
    curves["with BN" if bn else "without BN"] = h
    plt.plot(h.eval_step, h.test_accuracy, label="with BN" if bn else "without BN")
plt.xlabel("step")
plt.ylabel("test accuracy")
plt.legend()
plt.show()

# %% [markdown]
# ## Larger learning rates and less careful initialization
#
# The paper's MLP (sigmoid) at a few learning rates and initial weight scales, with and
# without BN, 120 steps each: final test accuracy.

# %%
def final_accuracy(bn, lr=0.5, weight_std=None):
    net = models.paper_mlp(bn=bn, weight_std=weight_std, seed=0)
    h = train.fit(net, digits, steps=120, lr=lr, batch_size=60, progress=False)
    return h.test_accuracy[-1]


for lr in (0.5, 5.0):
    print(f"lr {lr:>4}: with BN {final_accuracy(True, lr):.3f}   "
          f"without {final_accuracy(False, lr):.3f}")
for std in (0.01, 1.0):
    print(f"weights ~ N(0, {std}^2): with BN {final_accuracy(True, weight_std=std):.3f}   "
          f"without {final_accuracy(False, weight_std=std):.3f}")

# %% [markdown]
# ## A little regularization
#
# The gap between training and test accuracy at the end of the runs above: BN's noise
# (each sample normalized with its batch's statistics) acts a little like dropout. In runs
# this short the effect is small; bnlab's `reproduce regularization` measures it over seeds.

# %%
for name, h in curves.items():
    print(f"{name}: train batch accuracy {np.mean(h.accuracy[-20:]):.3f}, "
          f"test {h.test_accuracy[-1]:.3f}")
