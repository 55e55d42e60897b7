"""Batch-normalization layers: bookkeeping around ``bnlab.functional``.

The layer owns gamma (``weight``), beta (``bias``), the running statistics and the
train/eval flag; the math and its gradient live in :mod:`bnlab.functional` (see its
module docstring for the conventions: biased variance to normalize, unbiased
``running_var``, PyTorch's momentum).
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .module import Module, Parameter


class _BatchNorm(Module):
    """Shared implementation; subclasses only say which input ranks and layout they take.

        y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta

    In training (or when ``track_running_stats=False``) E and Var are the batch
    statistics over every axis except the channel axis; in evaluation they are
    ``running_mean`` and ``running_var``.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance; default 1e-5.
        momentum: weight of the new batch in the running averages; default 0.1.
            ``None`` makes them a cumulative (equal-weight) average over all batches seen.
            Keras's ``momentum=0.99`` is ``momentum=0.01`` here.
        affine: learn gamma (init 1) and beta (init 0); default True.
        track_running_stats: keep ``running_mean`` (init 0), ``running_var`` (init 1,
            unbiased) and ``num_batches_tracked``; default True. Without them the batch
            statistics are used in evaluation too.
        dtype: dtype of parameters and buffers; default float32.
    """

    _ranks: tuple[int, ...] = ()
    _rank_text = ""
    act = "identity"  # BatchNormAct2d: the activation fused after BN

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype=np.float32,
        axis: int = 1,
    ):
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        C = self.num_features
        self.weight: Parameter | None
        self.bias: Parameter | None
        if affine:
            self.weight = Parameter(np.ones(C, dtype))  # gamma
            self.bias = Parameter(np.zeros(C, dtype))  # beta
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dtype))
            self.register_buffer("running_var", np.ones(C, dtype))
            self.register_buffer("num_batches_tracked", 0)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._cache = None

    def _check_input(self, x: np.ndarray) -> None:
        if x.ndim not in self._ranks:
            raise ValueError(f"expected {self._rank_text} input (got {x.ndim}D input)")
        F.check_float(x)
        C = x.shape[self.axis]
        if C != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis {self.axis} "
                f"(num_features={self.num_features}), got {C} channels in input of shape {x.shape}"
            )

    def forward(self, x, mask=None):
        """``mask`` (training, or without running statistics): booleans of x's shape without
        the channel axis; the batch statistics, and the running-statistics update with its
        count, come only from the True positions (padding excluded), and y is computed
        everywhere (:func:`bnlab.functional.batch_norm_forward`). Ignored in evaluation."""
        x = np.asarray(x)
        self._check_input(x)
        gamma = None if self.weight is None else self.weight.data
        beta = None if self.bias is None else self.bias.data
        if self.training or self.running_mean is None:
            y, cache = F.batch_norm_forward(
                x, gamma, beta, self.eps, self.axis, mask=mask, act=self.act
            )
            if self.training and self.running_mean is not None:
                m = x.size // self.num_features if mask is None else int(cache.mask.sum())
                self._update_running(cache.mean, cache.var, m)
        else:
            y, cache = F.batch_norm_inference(
                x,
                self.running_mean,
                self.running_var,
                gamma,
                beta,
                self.eps,
                self.axis,
                act=self.act,
            )
        self._cache = cache
        return y

    def backward(self, dy):
        """dx from :func:`bnlab.functional.batch_norm_backward`; adds dgamma, dbeta to the grads."""
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        dx, dgamma, dbeta = F.batch_norm_backward(dy, self._cache)
        self._accumulate(dgamma, dbeta)
        return dx

    def _update_running(self, mean, var, m: int) -> None:
        """Count the batch and update the running statistics with its (biased) mean and
        var over m values (momentum None: the cumulative average)."""
        self.num_batches_tracked += 1
        momentum = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        F.update_running_stats(self.running_mean, self.running_var, mean, var, m, momentum)

    def _accumulate(self, dgamma, dbeta) -> None:
        """Add dgamma, dbeta to the parameters' gradients (nothing without affine)."""
        if self.weight is not None and self.bias is not None:
            self.weight.grad += dgamma.astype(self.weight.grad.dtype, copy=False)
            self.bias.grad += dbeta.astype(self.bias.grad.dtype, copy=False)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input (after a Linear layer: affine ->
    BN -> activation). See :class:`_BatchNorm` for the formula and arguments.

    Shape: input (N, C) or (N, C, L), output the same.

    Example:
        >>> bn = BatchNorm1d(100)
        >>> y = bn(np.random.randn(60, 100).astype(np.float32))
    """

    _ranks = (2, 3)
    _rank_text = "2D or 3D"

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        dtype=np.float32,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype, axis=1)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over images, per channel (after a convolution: conv -> BN ->
    ReLU -> pool). See :class:`_BatchNorm` for the formula and arguments.

    Args (beyond :class:`_BatchNorm`'s):
        data_format: ``"NCHW"`` (default, PyTorch) or ``"NHWC"`` (TensorFlow,
            channels-last); statistics are per channel either way.

    Shape: (N, C, H, W) or, with ``data_format="NHWC"``, (N, H, W, C); output the same.

    Example:
        >>> bn = BatchNorm2d(16)
        >>> y = bn(np.random.randn(8, 16, 28, 28).astype(np.float32))
    """

    _ranks = (4,)
    _rank_text = "4D"

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        dtype=np.float32,
        data_format: str = "NCHW",
    ):
        if data_format not in ("NCHW", "NHWC"):
            raise ValueError(f'data_format must be "NCHW" or "NHWC", got {data_format!r}')
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            dtype,
            axis=1 if data_format == "NCHW" else 3,
        )
        self.data_format = data_format

    def extra_repr(self) -> str:
        return super().extra_repr() + f", data_format={self.data_format!r}"
