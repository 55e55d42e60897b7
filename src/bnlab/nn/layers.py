"""The layers around BN: thin stateful wrappers over :mod:`bnlab.nn.ops`.

Constructors and parameter shapes mirror PyTorch's. Each layer checks its input, keeps
what its backward needs in ``self._cache``, and its ``backward(dy)`` returns ``dx`` while
adding parameter gradients into ``.grad``.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from . import init, ops
from .module import Module, Parameter


def _pair_int(value, name: str) -> int:
    """bnlab takes square kernels, strides and paddings: an int (or an equal pair)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_input(x, ndim: int, what: str, axis: int | None = None, expected: int | None = None):
    x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"expected {ndim}D input {what} (got {x.ndim}D input of shape {x.shape})")
    F.check_float(x)
    if axis is not None and x.shape[axis] != expected:
        raise ValueError(
            f"expected {expected} {'features' if ndim == 2 else 'channels'} on "
            f"axis {axis}, got input of shape {x.shape}"
        )
    return x


class _Cached(Module):
    """A layer that keeps what its backward needs in ``self._cache``."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def _need_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}: backward called before forward")
        return self._cache


class Linear(_Cached):
    """Fully-connected layer: ``y = x W^T + b``.

    Args:
        in_features, out_features: sizes.
        bias: learn b; default True. Set False when BN follows (its beta is the bias).
        dtype: default float32.
        rng: NumPy Generator for the default init (PyTorch's U(+-1/sqrt(in_features))).

    Shape: (N, in_features) -> (N, out_features); weight (out, in), bias (out,).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype=np.float32, rng=None
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(np.empty((out_features, in_features), dtype))
        self.bias = Parameter(np.empty(out_features, dtype)) if bias else None
        init.default_(self.weight, self.bias, rng)

    def forward(self, x):
        x = _check_input(x, 2, "(N, in_features)", 1, self.in_features)
        b = None if self.bias is None else self.bias.data
        y, self._cache = ops.linear_forward(x, self.weight.data, b)
        return y

    def backward(self, dy):
        dx, dw, db = ops.linear_backward(dy, self._need_cache())
        self.weight.grad += dw
        if self.bias is not None:
            self.bias.grad += db
        return dx

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(_Cached):
    """2-D convolution (cross-correlation, as in every framework), by im2col + one GEMM.

        y[n, o] = b[o] + sum_c W[o, c] (*) x_pad[n, c]   (stride s, zero padding p)

    Args:
        in_channels, out_channels, kernel_size: square kernel k.
        stride: default 1. padding: zeros on each side, default 0.
        bias: default True; False when BN follows.
        dtype, rng: as :class:`Linear`.

    Shape: (N, C_in, H, W) -> (N, C_out, (H + 2p - k)//s + 1, (W + 2p - k)//s + 1);
    weight (C_out, C_in, k, k).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        dtype=np.float32,
        rng=None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair_int(kernel_size, "kernel_size")
        self.stride = _pair_int(stride, "stride")
        self.padding = _pair_int(padding, "padding")
        if self.kernel_size < 1 or self.stride < 1 or self.padding < 0:
            raise ValueError("kernel_size and stride must be >= 1 and padding >= 0")
        k = self.kernel_size
        self.weight = Parameter(np.empty((out_channels, in_channels, k, k), dtype))
        self.bias = Parameter(np.empty(out_channels, dtype)) if bias else None
        init.default_(self.weight, self.bias, rng)

    def forward(self, x):
        x = _check_input(x, 4, "(N, C, H, W)", 1, self.in_channels)
        if min(x.shape[2:]) + 2 * self.padding < self.kernel_size:
            raise ValueError(
                f"input of shape {x.shape} is smaller than the kernel "
                f"({self.kernel_size}) after padding {self.padding}"
            )
        b = None if self.bias is None else self.bias.data
        y, self._cache = ops.conv2d_forward(x, self.weight.data, b, self.stride, self.padding)
        return y

    def backward(self, dy):
        dx, dw, db = ops.conv2d_backward(dy, self._need_cache())
        self.weight.grad += dw
        if self.bias is not None:
            self.bias.grad += db
        return dx

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class MaxPool2d(_Cached):
    """Max pooling over k x k windows (stride defaults to k); floor mode, no padding.

    Shape: (N, C, H, W) -> (N, C, (H - k)//s + 1, (W - k)//s + 1).
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = _pair_int(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair_int(stride, "stride")

    def forward(self, x):
        x = _check_input(x, 4, "(N, C, H, W)")
        if min(x.shape[2:]) < self.kernel_size:
            raise ValueError(
                f"input of shape {x.shape} is smaller than the pooling window ({self.kernel_size})"
            )
        y, self._cache = ops.maxpool2d_forward(x, self.kernel_size, self.stride)
        return y

    def backward(self, dy):
        return ops.maxpool2d_backward(dy, self._need_cache())

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class ReLU(_Cached):
    """y = max(x, 0), elementwise. Shape: any."""

    def forward(self, x):
        y, self._cache = ops.relu_forward(np.asarray(x))
        return y

    def backward(self, dy):
        return ops.relu_backward(dy, self._need_cache())


class Sigmoid(_Cached):
    """y = 1 / (1 + exp(-x)), elementwise. Shape: any."""

    def forward(self, x):
        y, self._cache = ops.sigmoid_forward(np.asarray(x))
        return y

    def backward(self, dy):
        return ops.sigmoid_backward(dy, self._need_cache())


class Flatten(_Cached):
    """(N, *) -> (N, prod(*)), as ``torch.nn.Flatten()``."""

    def forward(self, x):
        x = np.asarray(x)
        self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._need_cache())


class Dropout(_Cached):
    """Inverted dropout: in training, zero each value with probability p and scale the rest
    by 1/(1-p); identity in evaluation. ``rng`` (a NumPy Generator) draws the masks;
    :func:`bnlab.train.fit` reseeds it from its ``seed``.
    """

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = np.random.default_rng() if rng is None else rng

    def forward(self, x):
        x = np.asarray(x)
        if not self.training or self.p == 0.0:
            self._cache = None
            return x
        mask = (self.rng.random(x.shape) >= self.p).astype(x.dtype) / (1.0 - self.p)
        self._cache = mask
        return x * mask

    def backward(self, dy):
        return dy if self._cache is None else dy * self._cache

    def extra_repr(self):
        return f"p={self.p}"


class Sequential(Module):
    """Layers applied in order; children are named "0", "1", ... as in PyTorch, so the
    state dict keys (``0.weight``, ``1.running_mean``, ...) match ``torch.nn.Sequential``.
    """

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at {i}")
            setattr(self, str(i), layer)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(list(self)):
            dy = layer.backward(dy)
        return dy
