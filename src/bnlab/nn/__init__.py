"""Layers with hand-written backward passes, PyTorch's names and state-dict keys."""

from .batchnorm import BatchNorm1d, BatchNorm2d
from .module import Module, Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d", "Module", "Parameter"]
