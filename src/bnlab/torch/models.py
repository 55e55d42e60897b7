"""Reference networks for torch: the seed CNN of :mod:`bnlab.models`, layer for layer."""

from __future__ import annotations

import torch

from .. import models


def seed_cnn(bn: bool = True, *, in_channels: int = 1, image_size: int = 28,
             num_classes: int = 10, channels: tuple[int, int] = (8, 16),
             seed: int = 0) -> torch.nn.Sequential:
    """The lesson's CNN in torch: [conv 3x3 -> BN -> ReLU -> max-pool 2x2] x 2 -> linear.

    The layers are torch's own (``torch.nn.BatchNorm2d``): ``bnlab.torch.convert(net)``
    puts bnlab's kernels in. State-dict keys (``0.weight``, ``1.running_mean``, ...) and the
    initial weights equal :func:`bnlab.models.seed_cnn`'s with the same arguments, so
    weights move both ways through state dicts. float32.

    Shape: (N, in_channels, S, S) -> logits (N, num_classes).
    """
    ref = models.seed_cnn(bn, in_channels=in_channels, image_size=image_size,
                          num_classes=num_classes, channels=channels, seed=seed)
    nn = torch.nn
    layers: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)]
        layers += [nn.BatchNorm2d(c_out)] if bn else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = c_out, size // 2
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * size * size, num_classes))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in ref.state_dict().items()})
    return net
