"""Layers with hand-written backward passes, PyTorch's names and state-dict keys."""

from . import init
from .batchnorm import BatchNorm1d, BatchNorm2d
from .doctor import doctor
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential, Sigmoid
from .loss import CrossEntropyLoss
from .module import Module, Parameter
from .optim import SGD, Adam
from .variants import (
    BatchNormAct2d,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    fold_batchnorm,
    freeze,
    recalibrate,
)

__all__ = [
    "Adam",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNormAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "SGD",
    "Sequential",
    "Sigmoid",
    "doctor",
    "fold_batchnorm",
    "freeze",
    "init",
    "recalibrate",
]
