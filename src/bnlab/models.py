"""Reference networks: where BN sits in the lesson.

* Convolutional: conv -> BN -> ReLU -> max-pool (BN after the convolution, before the
  activation; the convolution has no bias, BN's beta replaces it).
* Fully-connected: affine -> BN -> activation (the paper's MLP).

``bn=False`` gives the same network without BN, with the biases back.
"""

from __future__ import annotations

import numpy as np

from . import nn
from .nn import init


def seed_cnn(
    bn: bool = True,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    channels: tuple[int, int] = (8, 16),
    seed: int = 0,
    dtype=np.float32,
) -> nn.Sequential:
    """The lesson's CNN: [conv 3x3 -> BN -> ReLU -> max-pool 2x2] x 2 -> linear.

    Args:
        bn: insert BatchNorm2d after each convolution; default True.
        in_channels, image_size: input (C, S, S); default MNIST's (1, 28).
        num_classes: outputs of the final linear layer; default 10.
        channels: output channels of the two convolutions; default (8, 16).
        seed: weight initialization (He normal for convolutions, PyTorch's default for the
            final linear layer); the same seed gives the same weights with and without BN.

    Shape: (N, in_channels, S, S) -> logits (N, num_classes).
    """
    # Constructors draw PyTorch's default init from `scratch`; the weights that count are
    # drawn from `rng` in a fixed order, so bn=True and bn=False get the same weights.
    rng, scratch = np.random.default_rng(seed), np.random.default_rng(seed)
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for c_out in channels:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn, dtype=dtype, rng=scratch)
        init.he_normal_(conv.weight, rng)
        if conv.bias is not None:
            init.zeros_(conv.bias)
        layers += [conv] + ([nn.BatchNorm2d(c_out, dtype=dtype)] if bn else [])
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = c_out, size // 2
    head = nn.Linear(c_in * size * size, num_classes, dtype=dtype, rng=scratch)
    init.default_(head.weight, head.bias, rng)
    layers += [nn.Flatten(), head]
    return nn.Sequential(*layers)


def paper_mlp(
    bn: bool = True,
    activation: str = "sigmoid",
    *,
    in_features: int = 784,
    hidden: tuple[int, ...] = (100, 100, 100),
    num_classes: int = 10,
    weight_std: float | None = None,
    seed: int = 0,
    dtype=np.float32,
) -> nn.Sequential:
    """The paper's MLP (Ioffe & Szegedy 2015, section 4.1): 784-100-100-100-10.

    Each hidden layer is Linear -> [BatchNorm1d] -> activation; the input is flattened
    first so images (N, 1, 28, 28) go in directly.

    Args:
        bn: BN before each nonlinearity; default True (Linear layers then have no bias).
        activation: "sigmoid" (the paper's) or "relu".
        weight_std: initialize every weight from N(0, weight_std^2) (the paper's "small
            random Gaussian values"); None (default) uses Xavier normal for sigmoid and He
            normal for ReLU. Biases start at 0.
        seed: initialization seed; the same seed gives the same weights with and without BN.

    Shape: (N, in_features) or (N, C, H, W) with C*H*W = in_features -> (N, num_classes).
    """
    acts = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    rng, scratch = np.random.default_rng(seed), np.random.default_rng(seed)  # as in seed_cnn
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = (in_features,) + tuple(hidden)
    linears = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(a, b, bias=not bn, dtype=dtype, rng=scratch)
        linears.append(lin)
        layers += [lin] + ([nn.BatchNorm1d(b, dtype=dtype)] if bn else []) + [acts[activation]()]
    out = nn.Linear(sizes[-1], num_classes, dtype=dtype, rng=scratch)
    linears.append(out)
    layers.append(out)
    for lin in linears:
        if weight_std is not None:
            init.normal_(lin.weight, weight_std, rng=rng)
        elif activation == "relu" and lin is not out:
            init.he_normal_(lin.weight, rng)
        else:
            init.xavier_normal_(lin.weight, rng)
        if lin.bias is not None:
            init.zeros_(lin.bias)
    return nn.Sequential(*layers)
