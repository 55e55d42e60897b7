"""``BatchNorm1d/2d/3d`` for torch models: torch's classes, bnlab's kernels.

Each class subclasses the ``torch.nn`` class of the same name and overrides only
``forward``, so the constructor, parameters (``weight`` = gamma, ``bias`` = beta), buffers
(``running_mean``, ``running_var``, ``num_batches_tracked``), state-dict keys (old ones
without ``num_batches_tracked`` too), input checks, train/eval, ``track_running_stats`` and
``momentum=None`` are torch's own. Which kernels run is said in
:mod:`bnlab.torch.functional`; the one deliberate difference from torch is there too
(a NaN/inf batch leaves the running statistics and ``num_batches_tracked`` unchanged).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .. import functional as BF
from . import functional as F


class _BatchNorm:
    """Mixin placed before the torch class: bookkeeping as torch's ``_BatchNorm.forward``
    (which statistics, when to update, the momentum), the math in bnlab's kernels.

        y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias

    ``backend`` (class attribute, may be set per instance): "auto" (default), "numba",
    "triton" or "native", as in :func:`bnlab.torch.functional.batch_norm`, except that a module's
    "native" keeps the NaN guard (torch's computation, bnlab's bookkeeping).
    """

    backend = "auto"

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: as :meth:`bnlab.nn.BatchNorm2d.forward`'s (statistics and the
        running-statistics update only over True positions; ignored in evaluation)."""
        self._check_input_dim(input)
        if mask is not None and (self.training or self.running_mean is None):
            return MaskedFunction.apply(input, mask, self.weight, self.bias, self.eps, self)
        update = self.training and self.track_running_stats
        # batch statistics in training, and in evaluation when there are no running ones
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # buffers are passed only when they are updated (training) or used (evaluation)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        nbt = self.num_batches_tracked if update else None
        momentum = self.momentum
        if momentum is None and nbt is None:
            momentum = 0.0  # torch's value when there is no count to average over
        engine = F.kernel_engine(self.backend, input, running_mean, running_var, self.weight,
                                 self.bias, bn_training)
        if engine is None:
            return F.guarded_native(input, running_mean, running_var, self.weight, self.bias,
                                    bn_training, momentum, self.eps, nbt)
        return F.kernel_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                   bn_training, momentum, self.eps, nbt, engine)


class MaskedFunction(torch.autograd.Function):
    """Masked batch statistics, by :func:`bnlab.functional.batch_norm_forward` and
    ``batch_norm_backward`` (NumPy, on the CPU: CUDA tensors are copied there and back).
    Updates the module's running statistics (if tracked) with the masked count."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps, module):
        def host(t):
            return None if t is None else t.detach().cpu().numpy()

        y, cache = BF.batch_norm_forward(host(x), host(weight), host(bias), eps, 1,
                                         mask=host(mask).astype(bool))
        if module.training and module.track_running_stats:
            module.num_batches_tracked.add_(1)
            momentum = module.momentum
            if momentum is None:
                momentum = 1.0 / float(module.num_batches_tracked)
            with torch.no_grad():
                rm, rv = host(module.running_mean).copy(), host(module.running_var).copy()
                BF.update_running_stats(rm, rv, cache.mean, cache.var, int(cache.mask.sum()),
                                        momentum)
                module.running_mean.copy_(torch.from_numpy(rm))
                module.running_var.copy_(torch.from_numpy(rv))
        ctx.cache, ctx.device = cache, x.device
        ctx.has_weight = weight is not None
        return torch.from_numpy(y).to(x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        dx, dgamma, dbeta = BF.batch_norm_backward(dy.detach().cpu().numpy(), ctx.cache)
        out = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(ctx.device)  # noqa: E731
        if not ctx.has_weight:
            return out(dx), None, None, None, None, None
        return out(dx), None, out(dgamma), out(dbeta), None, None


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on bnlab's kernels: (N, C) or (N, C, L) input, after a
    Linear layer (affine -> BN -> activation). Arguments and attributes are torch's.

    Shape: (N, C) or (N, C, L) -> the same.

    Example:
        >>> bn = BatchNorm1d(100)
        >>> y = bn(torch.randn(60, 100))
    """


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on bnlab's kernels: per-channel BN of images, after a
    convolution (conv -> BN -> ReLU -> pool). Arguments and attributes are torch's.

    Shape: (N, C, H, W) -> the same; contiguous or channels_last memory (kept).

    Example:
        >>> bn = BatchNorm2d(16)
        >>> y = bn(torch.randn(8, 16, 28, 28).to(memory_format=torch.channels_last))
    """


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on bnlab's kernels. Arguments and attributes are torch's.

    Shape: (N, C, D, H, W) -> the same; contiguous or channels_last_3d memory (kept).

    Example:
        >>> bn = BatchNorm3d(4)
        >>> y = bn(torch.randn(2, 4, 3, 8, 8))
    """
