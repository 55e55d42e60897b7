# %% [markdown]
# # 5. BN in PyTorch
#
# bnlab's BN inside torch models: `bnlab.torch.convert` swaps torch's BN layers for bnlab's
# (same parameters, buffers and state dict), the doctor finds common BN mistakes, and for
# small batches there are ghost BN and batch renormalization, or GroupNorm and LayerNorm
# instead, measured here on the same data.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import bnlab.torch as bt
from bnlab import data
from bnlab.exercises import check_function

torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread is fastest
digits = data.load("mnist-5k")
x_train, y_train = (torch.from_numpy(a) for a in digits.train)
x_test, y_test = (torch.from_numpy(a) for a in digits.test)

# %% [markdown]
# ## Exercise: BN as an autograd Function
#
# Write BN's forward and backward for (N, D) tensors as a `torch.autograd.Function`
# (`apply(x, gamma, beta, eps)`); the grader compares outputs and gradients with torch's own
# `batch_norm`. The backward returns one gradient per input of `forward` (None for eps).

# %%
class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        # BEGIN SOLUTION
        mu = x.mean(0)
        var = x.var(0, correction=0)
        inv = 1.0 / torch.sqrt(var + eps)
        x_hat = (x - mu) * inv
        ctx.save_for_backward(x_hat, gamma, inv)
        return gamma * x_hat + beta
        # END SOLUTION

    @staticmethod
    def backward(ctx, dout):
        # BEGIN SOLUTION
        x_hat, gamma, inv = ctx.saved_tensors
        m = dout.shape[0]
        dbeta, dgamma = dout.sum(0), (dout * x_hat).sum(0)
        dx = gamma * inv / m * (m * dout - dbeta - x_hat * dgamma)
        return dx, dgamma, dbeta, None
        # END SOLUTION


print(check_function(BatchNormFunction))

# %% [markdown]
# ## convert, and the doctor
#
# The seed CNN in torch, converted to bnlab's BN; then three planted mistakes: Keras's
# momentum copied over (0.99 means something else in PyTorch), a bias before BN (cancelled
# by BN's mean), and a BN left in training mode inside a model in evaluation mode.

# %%
model = bt.convert(bt.models.seed_cnn())
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for i in range(0, 640, 64):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64]).backward()
    opt.step()
print(type(model[1]).__module__, type(model[1]).__name__)

broken = bt.models.seed_cnn()
broken[1].momentum = 0.99
broken[0] = torch.nn.Conv2d(1, 8, 3, padding=1, bias=True)
broken.eval()
broken[5].train()
for f in bt.doctor(broken):
    print(f"{f.severity:8s} {f.code:15s} {f.layer:4s} {f.message[:70]}")

# %% [markdown]
# ## Small batches
#
# With 2 samples per batch, BN's statistics are mostly noise. A CNN with BN, with bnlab's
# batch renormalization (BN corrected towards its running statistics), with GroupNorm
# (statistics per sample over groups of channels) and with LayerNorm (GroupNorm with one
# group), trained at batch 2 and at batch 32 for the same number of samples.

# %%
def cnn(norm):
    def layer(c):
        return {"bn": torch.nn.BatchNorm2d(c), "renorm": bt.BatchRenorm2d(c),
                "group": torch.nn.GroupNorm(4, c), "layer": torch.nn.GroupNorm(1, c)}[norm]

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), layer(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), layer(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 10))


def accuracy(norm, batch, samples=800, seed=0):
    torch.manual_seed(seed)
    net = cnn(norm)
    opt = torch.optim.SGD(net.parameters(), lr=0.02 * batch ** 0.5)
    for i in range(0, samples, batch):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x_train[i:i + batch]),
                                                 y_train[i:i + batch])
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item()


NORMS = ("bn", "renorm", "group", "layer")
results = {(norm, b): accuracy(norm, b) for norm in NORMS for b in (2, 32)}
for (norm, b), acc in results.items():
    print(f"{norm:6s} batch {b:2d}: test accuracy {acc:.3f}")
labels = ["BatchNorm", "BatchRenorm", "GroupNorm", "LayerNorm"]
for k, b in enumerate((2, 32)):
    plt.bar(np.arange(4) + 0.4 * k, [results[(n, b)] for n in NORMS], width=0.4,
            label=f"batch {b}")
plt.xticks(np.arange(4) + 0.2, labels)
plt.ylabel("test accuracy")
plt.legend()
plt.show()

# %% [markdown]
# Reading the numbers: with the same 800 samples, batch 2 takes 16 times more optimizer
# steps than batch 32, which this short run rewards more than anything else. And a conv
# BN at batch 2 still averages each channel over 2 x H x W values (1,568 in the first
# layer), so its statistics are not noise here; bnlab's committed `reproduce small-batch`
# runs find the same for the seed CNN, while the paper's MLP, where batch 2 leaves two
# values per feature, drops from 0.885 to 0.601 (docs: "What BN does, measured").
#
# When to reach for which: GroupNorm and LayerNorm do not depend on the batch at all, so
# they are the choice when batches are tiny by necessity (large images, detection);
# batch renormalization keeps BN's running statistics and its fast evaluation; ghost BN
# (`bt.GhostBatchNorm2d`) goes the other way, computing statistics over small virtual
# batches inside a large one for BN's regularizing noise. bnlab's `reproduce small-batch`
# measures them over seeds.
