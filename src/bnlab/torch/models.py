"""Reference networks for torch: bnlab's models (:mod:`bnlab.models`), layer for layer."""

from __future__ import annotations

import torch

from .. import models
from .. import nn as bnn


def _layer(m) -> torch.nn.Module:
    """The torch layer of one bnlab layer, same hyperparameters (weights loaded after)."""
    nn = torch.nn
    if isinstance(m, bnn.Conv2d):
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                         bias=m.bias is not None)
    if isinstance(m, bnn.Linear):
        return nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    if isinstance(m, (bnn.BatchNorm1d, bnn.BatchNorm2d)):
        cls = nn.BatchNorm2d if isinstance(m, bnn.BatchNorm2d) else nn.BatchNorm1d
        return cls(m.num_features, m.eps, m.momentum, m.affine)
    if isinstance(m, bnn.MaxPool2d):
        return nn.MaxPool2d(m.kernel_size, m.stride)
    if isinstance(m, bnn.Dropout):
        return nn.Dropout(m.p)
    simple = {bnn.ReLU: nn.ReLU, bnn.Sigmoid: nn.Sigmoid, bnn.Flatten: nn.Flatten}
    if type(m) in simple:
        return simple[type(m)]()
    raise TypeError(f"no torch twin for bnlab layer {type(m).__name__}")


def twin(model: bnn.Sequential) -> torch.nn.Sequential:
    """A ``torch.nn.Sequential`` of torch's own layers computing what the bnlab Sequential
    ``model`` computes, with its state dict (same keys, same values; float32).

    Its BN layers are ``torch.nn``'s: ``bnlab.torch.convert(net)`` puts bnlab's kernels in.
    Weights move both ways: ``model.load_state_dict({k: v.numpy() ...})`` takes them back.
    """
    net = torch.nn.Sequential(*(_layer(m) for m in model))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return net


def seed_cnn(bn: bool = True, *, in_channels: int = 1, image_size: int = 28,
             num_classes: int = 10, channels: tuple[int, int] = (8, 16),
             seed: int = 0) -> torch.nn.Sequential:
    """The lesson's CNN in torch: [conv 3x3 -> BN -> ReLU -> max-pool 2x2] x 2 -> linear.

    State-dict keys (``0.weight``, ``1.running_mean``, ...) and the initial weights equal
    :func:`bnlab.models.seed_cnn`'s with the same arguments (:func:`twin`). float32.

    Shape: (N, in_channels, S, S) -> logits (N, num_classes).
    """
    return twin(models.seed_cnn(bn, in_channels=in_channels, image_size=image_size,
                                num_classes=num_classes, channels=channels, seed=seed))


def paper_mlp(bn: bool = True, activation: str = "sigmoid", *, in_features: int = 784,
              hidden: tuple[int, ...] = (100, 100, 100), num_classes: int = 10,
              weight_std: float | None = None, seed: int = 0) -> torch.nn.Sequential:
    """The paper's MLP (784-100-100-100-10, Linear -> BN -> activation) in torch, with
    :func:`bnlab.models.paper_mlp`'s keys and initial weights (:func:`twin`). float32.

    Shape: (N, in_features) or (N, C, H, W) with C*H*W = in_features -> (N, num_classes).
    """
    return twin(models.paper_mlp(bn, activation, in_features=in_features, hidden=hidden,
                                 num_classes=num_classes, weight_std=weight_std, seed=seed))
