"""``BatchNorm1d/2d/3d`` for torch models: torch's classes, bnlab's kernels.

Each class subclasses the ``torch.nn`` class of the same name and overrides only
``forward``, so the constructor, parameters (``weight`` = gamma, ``bias`` = beta), buffers
(``running_mean``, ``running_var``, ``num_batches_tracked``), state-dict keys (old ones
without ``num_batches_tracked`` too), input checks, train/eval, ``track_running_stats`` and
``momentum=None`` are torch's own. Which kernels run is said in
:mod:`bnlab.torch.functional`; the one deliberate difference from torch is there too
(a NaN/inf batch leaves the running statistics and ``num_batches_tracked`` unchanged).
"""

from typing import TYPE_CHECKING

import torch

from . import engine
from . import functional as F

if TYPE_CHECKING:  # the torch class a mixin is placed before, for the type checker
    from torch.nn.modules.batchnorm import _BatchNorm as _Host
else:
    _Host = object


class _BatchNorm(_Host):
    """Mixin placed before the torch class: bookkeeping as torch's ``_BatchNorm.forward``
    (which statistics, when to update, the momentum), the engine chosen by
    :func:`bnlab.torch.engine.select`.

        y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias

    ``backend`` (class attribute, may be set per instance): "auto" (default), "numba",
    "triton", "reference" or "native", as in :func:`bnlab.torch.functional.batch_norm`.
    """

    backend = "auto"
    pools_statistics = True  # a batch's statistics are its own (bnlab.torch.pooling)
    _bn_pool = None  # bnlab.torch.pooling's pool while it pools (set on the instance)

    def _bn_args(self):
        """(training with batch statistics, running_mean, running_var, num_batches_tracked,
        momentum) as torch's ``_BatchNorm.forward`` decides them: batch statistics in
        training, and in evaluation when there are no running ones; the buffers passed only
        when they are updated (training) or used (evaluation)."""
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        passed = not self.training or self.track_running_stats
        nbt = self.num_batches_tracked if self.training and self.track_running_stats else None
        momentum = self.momentum
        if momentum is None and nbt is None:
            momentum = 0.0  # torch's value when there is no count to average over
        return (
            bn_training,
            self.running_mean if passed else None,
            self.running_var if passed else None,
            nbt,
            momentum,
        )

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: as :meth:`bnlab.nn.BatchNorm2d.forward`'s (statistics and the
        running-statistics update only over True positions, a bool tensor of input's shape
        without dimension 1; ignored in evaluation)."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return self._scripted(input, mask)
        return self._forward(input, mask)

    def _scripted(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Under ``torch.jit.script``, which cannot call bnlab's kernels: the native engine
        (torch's kernel) with bnlab's checks and guard, in TorchScript (the form of
        :func:`bnlab.torch.functional.guarded_native` that TorchScript compiles)."""
        self._check_input_dim(input)
        if mask is not None:
            raise RuntimeError("mask= needs bnlab's Python path; not under torch.jit.script")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean, running_var = self.running_mean, self.running_var
        nbt = self.num_batches_tracked
        if (
            self.training
            and self.track_running_stats
            and running_mean is not None
            and running_var is not None
            and nbt is not None
        ):
            momentum = self.momentum
            w = 1.0 / (float(nbt) + 1.0) if momentum is None else momentum
            new_mean, new_var = running_mean.clone(), running_var.clone()
            y = torch.nn.functional.batch_norm(
                input, new_mean, new_var, self.weight, self.bias, True, w, self.eps
            )
            if bool(torch.isfinite(new_mean).all()) and bool(torch.isfinite(new_var).all()):
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
                nbt.add_(1)
            return self._scripted_act(y)
        if self.training and not self.track_running_stats:
            running_mean, running_var = None, None
        return self._scripted_act(
            torch.nn.functional.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                0.0,
                self.eps,
            )
        )

    def _scripted_act(self, y: torch.Tensor) -> torch.Tensor:
        return y  # BatchNormAct2d: its activation

    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        bn_training, running_mean, running_var, nbt, momentum = self._bn_args()
        engine.check_eps(self.eps, bn_training)
        if mask is not None:
            mask = _check_mask(mask, input) if bn_training else None
        pool = self._bn_pool  # bnlab.torch.pooling: accumulate, recalibrate
        if pool is not None and self.training and nbt is not None:
            pool.add(self, input, mask)  # the pool updates the running statistics
            running_mean = running_var = nbt = None
        name = engine.select(
            self.backend,
            input,
            (running_mean, running_var, self.weight, self.bias),
            mask=mask,
            update=nbt is not None,
            training=bn_training,
        )
        return F.run(
            name,
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
            nbt,
            mask,
        )


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` checked as :func:`bnlab.functional.batch_norm_forward` checks it (x's shape
    without dimension 1, boolean, a True entry somewhere), on x's device."""
    want = (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask must have x's shape without the channel axis {want}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean (True: counts in the statistics), got {mask.dtype}")
    mask = mask.to(x.device)
    if not engine.transformed() and not bool(mask.any()):
        raise ValueError("mask has no True entry: there is nothing to take statistics over")
    return mask


def no_mask(module, mask) -> None:
    """The modules whose forward has no ``mask=`` say so."""
    if mask is not None:
        raise TypeError(f"{type(module).__name__} does not take mask=")


if TYPE_CHECKING:  # the variants' mixins sit before _BatchNorm
    _Variant = _BatchNorm
else:
    _Variant = object


class PythonOnly(_Variant):
    """Mixin for modules whose training step has no TorchScript form (ghost batches, batch
    renormalization, SyncBatchNorm's collectives): under ``torch.jit.script`` they raise
    rather than run plain BN in its place."""

    def _scripted(self, input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("this bnlab BN variant runs in Python only, not under torch.jit.script")


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
