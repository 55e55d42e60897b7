"""Reference networks for torch: bnlab's models (:mod:`bnlab.models`), layer for layer."""

from __future__ import annotations

import torch

from .. import models
from .. import nn as bnn


def _layer(m) -> torch.nn.Module:
    """The torch layer of one bnlab layer, same hyperparameters (weights loaded after)."""
    nn = torch.nn
    if isinstance(m, bnn.Conv2d):
        return nn.Conv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            bias=m.bias is not None,
        )
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


def seed_cnn(
    bn: bool = True,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    channels: tuple[int, int] = (8, 16),
    seed: int = 0,
) -> torch.nn.Sequential:
    """The lesson's CNN in torch: [conv 3x3 -> BN -> ReLU -> max-pool 2x2] x 2 -> linear.

    State-dict keys (``0.weight``, ``1.running_mean``, ...) and the initial weights equal
    :func:`bnlab.models.seed_cnn`'s with the same arguments (:func:`twin`). float32.

    Shape: (N, in_channels, S, S) -> logits (N, num_classes).
    """
    return twin(
        models.seed_cnn(
            bn,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            channels=channels,
            seed=seed,
        )
    )


def paper_mlp(
    bn: bool = True,
    activation: str = "sigmoid",
    *,
    in_features: int = 784,
    hidden: tuple[int, ...] = (100, 100, 100),
    num_classes: int = 10,
    weight_std: float | None = None,
    seed: int = 0,
) -> torch.nn.Sequential:
    """The paper's MLP (784-100-100-100-10, Linear -> BN -> activation) in torch, with
    :func:`bnlab.models.paper_mlp`'s keys and initial weights (:func:`twin`). float32.

    Shape: (N, in_features) or (N, C, H, W) with C*H*W = in_features -> (N, num_classes).
    """
    return twin(
        models.paper_mlp(
            bn,
            activation,
            in_features=in_features,
            hidden=hidden,
            num_classes=num_classes,
            weight_std=weight_std,
            seed=seed,
        )
    )


# --- ResNets (He et al. 2016) with torchvision's architecture and state-dict keys -------------


class BasicBlock(torch.nn.Module):
    """ResNet-18/34's block: conv 3x3 (stride) -> BN -> ReLU -> conv 3x3 -> BN, plus the
    shortcut (``downsample``: conv 1x1 + BN where the shape changes), then ReLU."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: torch.nn.Module | None = None,
    ):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)  # BN -> add -> ReLU: the block's tail


class Bottleneck(torch.nn.Module):
    """ResNet-50/101/152's block (torchvision's "v1.5": the stride on the 3x3 conv):
    conv 1x1 -> BN -> ReLU -> conv 3x3 (stride) -> BN -> ReLU -> conv 1x1 (4x wider) -> BN,
    plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: torch.nn.Module | None = None,
    ):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(torch.nn.Module):
    """A ResNet as torchvision builds it: conv 7x7/2 -> BN -> ReLU -> max-pool 3x3/2 ->
    layer1..layer4 (widths 64, 128, 256, 512 times the block's expansion; strides 1, 2, 2,
    2) -> global average pool -> fc. The same module names, so the same state-dict keys
    (``conv1.weight``, ``layer1.0.bn1.running_mean``, ``layer2.0.downsample.0.weight``,
    ``fc.bias``, ...): weights load both ways with torchvision's. torch.nn's BatchNorm2d
    throughout; ``bnlab.torch.convert`` puts bnlab's in.

    Initialization as torchvision's: Kaiming normal (fan_out, ReLU) for convolutions, BN
    weight 1 and bias 0, the fc layer torch's default.

    Shape: (N, 3, H, W) -> logits (N, num_classes); any H, W >= 32.
    """

    def __init__(self, block, layers: tuple[int, int, int, int], num_classes: int = 1000):
        super().__init__()
        nn = torch.nn
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> torch.nn.Sequential:
        nn = torch.nn
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]): 11,689,512 parameters with 1000 classes, as
    torchvision's ``resnet18()``; no torchvision needed."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]): 25,557,032 parameters with 1000 classes, as
    torchvision's ``resnet50()``; no torchvision needed."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)
