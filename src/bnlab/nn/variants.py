"""The BN family for bnlab models: ghost batches, frozen BN, folding, recalibration.

Bookkeeping around :mod:`bnlab.functional` (the math: ``ghost_batch_norm_forward``,
``batch_norm_inference``, ``fold_batchnorm_params``), as :mod:`bnlab.nn.batchnorm` is.
The same names exist for torch models in :mod:`bnlab.torch`, with the same semantics.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from .. import functional as F
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .layers import Conv2d, Linear, Sequential
from .module import Module, Parameter

if TYPE_CHECKING:  # the layer class a mixin is placed before, for the type checker
    _Host = _BatchNorm
else:
    _Host = object


class _Ghost(_Host):
    """Mixin: training normalizes each virtual batch of ``virtual_batch_size`` samples with
    its own statistics (:func:`bnlab.functional.ghost_batch_norm_forward`); the running
    statistics are updated once per call with the average of the virtual batches' means
    and unbiased variances. Evaluation uses the running statistics (any batch size).

    Keras 2's ``virtual_batch_size``, mapped: Keras's virtual batch b holds samples b,
    b + N/v, b + 2N/v, ... (bnlab's k: samples [k*v, (k+1)*v)), the same computation up to a
    permutation of the batch; Keras averages the *biased* variances into
    ``moving_variance`` (bnlab: unbiased, as PyTorch), and its ``momentum=0.99`` is 0.01
    here. tests/test_keras_fixtures.py checks the mapping against tf_keras."""

    def forward(self, x):
        if not (self.training or self.running_mean is None):
            return super().forward(x)
        x = np.asarray(x)
        self._check_input(x)
        gamma = None if self.weight is None else self.weight.data
        beta = None if self.bias is None else self.bias.data
        y, caches = F.ghost_batch_norm_forward(
            x, gamma, beta, self.eps, self.virtual_batch_size, self.axis
        )
        if self.training and self.running_mean is not None:
            self._update_running(*F.ghost_statistics(caches))
        self._cache = caches
        return y

    def backward(self, dy):
        if not isinstance(self._cache, list):
            return super().backward(dy)
        dx, dgamma, dbeta = F.ghost_batch_norm_backward(dy, self._cache)
        self._accumulate(dgamma, dbeta)
        return dx

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_Ghost, BatchNorm1d):
    """Ghost BN over (N, C) or (N, C, L) input; N must be a multiple of
    ``virtual_batch_size`` in training. Arguments as :class:`BatchNorm1d`.

    Example:
        >>> bn = GhostBatchNorm1d(100, virtual_batch_size=16)
        >>> y = bn(np.random.randn(64, 100).astype(np.float32))
    """

    def __init__(
        self,
        num_features,
        virtual_batch_size: int,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        dtype=np.float32,
    ):
        super().__init__(num_features, eps, momentum, affine, True, dtype)
        self.virtual_batch_size = F.check_virtual_batch_size(virtual_batch_size)


class GhostBatchNorm2d(_Ghost, BatchNorm2d):
    """Ghost BN over (N, C, H, W) input (or NHWC); N must be a multiple of
    ``virtual_batch_size`` in training. Arguments as :class:`BatchNorm2d`."""

    def __init__(
        self,
        num_features,
        virtual_batch_size: int,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        dtype=np.float32,
        data_format: str = "NCHW",
    ):
        super().__init__(num_features, eps, momentum, affine, True, dtype, data_format)
        self.virtual_batch_size = F.check_virtual_batch_size(virtual_batch_size)


class _Renorm(_Host):
    """Mixin: batch renormalization in training (:func:`bnlab.functional.batch_renorm_forward`),
    BN with the running statistics in evaluation.

    Buffers beyond BN's: ``renorm_mean`` (init 0) and ``renorm_std`` (init 1), the averages
    r and d are computed from (read before this batch updates them, with ``renorm_momentum``
    in PyTorch's convention: Keras's ``renorm_momentum=0.99`` is 0.01 here; not debiased).
    ``running_mean``/``running_var`` are updated exactly as BatchNorm's (unbiased variance;
    Keras keeps a ``moving_stddev`` instead) and serve evaluation. ``rmax`` and ``dmax`` are
    plain attributes, so a schedule may raise them during training (the paper starts at 1
    and 0).
    """

    def _init_renorm(self, rmax, dmax, renorm_momentum, dtype):
        if rmax < 1 or dmax < 0:
            raise ValueError(f"rmax must be >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        self.rmax, self.dmax, self.renorm_momentum = float(rmax), float(dmax), renorm_momentum
        self.register_buffer("renorm_mean", np.zeros(self.num_features, dtype))
        self.register_buffer("renorm_std", np.ones(self.num_features, dtype))

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = np.asarray(x)
        self._check_input(x)
        gamma = None if self.weight is None else self.weight.data
        beta = None if self.bias is None else self.bias.data
        y, cache = F.batch_renorm_forward(
            x,
            gamma,
            beta,
            self.eps,
            self.axis,
            self.renorm_mean,
            self.renorm_std,
            self.rmax,
            self.dmax,
        )
        bn = cache.bn
        F.update_renorm_stats(
            self.renorm_mean, self.renorm_std, bn.mean, 1.0 / bn.inv_std, self.renorm_momentum
        )
        self._update_running(bn.mean, bn.var, x.size // self.num_features)
        self._cache = cache
        return y

    def backward(self, dy):
        if not isinstance(self._cache, F.RenormCache):
            return super().backward(dy)
        dx, dgamma, dbeta = F.batch_renorm_backward(dy, self._cache)
        self._accumulate(dgamma, dbeta)
        return dx

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, "
            f"renorm_momentum={self.renorm_momentum}"
        )


class BatchRenorm1d(_Renorm, BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L) (see :class:`_Renorm`).

    Example:
        >>> bn = BatchRenorm1d(100, rmax=3.0, dmax=5.0)
        >>> y = bn(np.random.randn(4, 100).astype(np.float32))   # small batches are its point
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        rmax=3.0,
        dmax=5.0,
        renorm_momentum=0.01,
        dtype=np.float32,
    ):
        super().__init__(num_features, eps, momentum, affine, True, dtype)
        self._init_renorm(rmax, dmax, renorm_momentum, dtype)


class BatchRenorm2d(_Renorm, BatchNorm2d):
    """Batch renormalization over (N, C, H, W) (or NHWC) input (see :class:`_Renorm`)."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        rmax=3.0,
        dmax=5.0,
        renorm_momentum=0.01,
        dtype=np.float32,
        data_format: str = "NCHW",
    ):
        super().__init__(num_features, eps, momentum, affine, True, dtype, data_format)
        self._init_renorm(rmax, dmax, renorm_momentum, dtype)


class BatchNormAct2d(BatchNorm2d):
    """BN followed by an activation, in one fused kernel pass forward and backward (timm's
    module name): ``y = act(BN(x))``, the same results as BatchNorm2d then the activation.
    ``act``: "relu" (default) or "identity". Other arguments as :class:`BatchNorm2d`.

    The fused backward recomputes the activation's input from x (no extra pass over memory),
    so BN+ReLU costs what BN costs (measured in ``bnlab bench``).

    Example:
        >>> layer = BatchNormAct2d(16)      # replaces BatchNorm2d(16) followed by ReLU()
    """

    def __init__(
        self,
        num_features,
        act: str = "relu",
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        dtype=np.float32,
        data_format: str = "NCHW",
    ):
        F.check_act(act)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, dtype, data_format
        )
        self.act = act

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"


class FrozenBatchNorm2d(Module):
    """BN with fixed statistics and parameters (torchvision's ``FrozenBatchNorm2d``):
    ``weight``, ``bias``, ``running_mean``, ``running_var`` are buffers, nothing learns, and

        y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

    in training and evaluation alike (:func:`bnlab.functional.batch_norm_inference`; any
    input rank >= 2, channels on ``axis``). ``load_state_dict`` takes a BatchNorm state dict;
    ``num_batches_tracked`` is accepted and ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, dtype=np.float32, axis: int = 1):
        super().__init__()
        C = int(num_features)
        self.num_features, self.eps, self.axis = C, float(eps), axis
        self.register_buffer("weight", np.ones(C, dtype))
        self.register_buffer("bias", np.zeros(C, dtype))
        self.register_buffer("running_mean", np.zeros(C, dtype))
        self.register_buffer("running_var", np.ones(C, dtype))
        self._cache = None

    def forward(self, x):
        y, self._cache = F.batch_norm_inference(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.eps, self.axis
        )
        return y

    def backward(self, dy):
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        return F.batch_norm_backward(dy, self._cache)[0]  # x only: nothing learns

    def load_state_dict(self, state_dict) -> None:
        state = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        super().load_state_dict(state)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _replace_children(module: Module, convert) -> None:
    """Replace every child ``c`` with ``convert(c)`` (None: keep), in place, keeping order."""
    for name, child in list(module._modules.items()):
        new = convert(child)
        if new is None:
            _replace_children(child, convert)
        else:
            module._modules[name] = new
            object.__setattr__(module, name, new)


def freeze(module: Module) -> Module:
    """Replace every BatchNorm1d/2d in ``module`` (in place) by a :class:`FrozenBatchNorm2d`
    holding copies of its parameters and running statistics; returns the module (the new
    one if ``module`` itself is a BN layer)."""

    def frozen(bn):
        if not isinstance(bn, _BatchNorm):
            return None
        if bn.running_mean is None:
            raise ValueError(
                f"cannot freeze {bn!r}: it has no running statistics (track_running_stats=False)"
            )
        new = FrozenBatchNorm2d(bn.num_features, bn.eps, bn.running_mean.dtype, bn.axis)
        for name in ("running_mean", "running_var"):
            getattr(new, name)[...] = getattr(bn, name)
        if bn.weight is not None:
            new.weight[...] = bn.weight.data
            new.bias[...] = bn.bias.data
        return new

    root = frozen(module)
    if root is not None:
        return root
    _replace_children(module, frozen)
    return module


def recalibrate(model: Module, batches) -> Module:
    """Precise BN (torch's ``swa_utils.update_bn``): reset every BN layer's running
    statistics and recompute them as the exact average over ``batches`` (an iterable of
    inputs, or of (input, target) pairs), then restore each layer's momentum and the
    model's train/eval mode. The running variance is the average of the batches' unbiased
    variances. Returns the model."""
    bns = [
        m
        for _, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    ]
    return F.recalibrate_layers(model, bns, batches, _reset_running_stats)


def _reset_running_stats(bn) -> None:
    bn.running_mean[...] = 0
    bn.running_var[...] = 1
    bn.num_batches_tracked = 0


def fold_batchnorm(module: Module, strict: bool = False) -> Module:
    """An evaluation-mode copy of ``module`` (the original is untouched) in which every BN
    directly after a ``Conv2d`` or ``Linear`` in a Sequential is folded into that layer's
    weight and bias (:func:`bnlab.functional.fold_batchnorm_params`) and removed. Outputs
    equal the unfolded model's in evaluation mode.

    A BN after anything else stays as it is; with ``strict=True`` it is a ValueError naming
    it. (bnlab's models are Sequentials; for torch models with residual blocks see
    :func:`bnlab.torch.fold_batchnorm`.)
    """
    model = copy.deepcopy(module).eval()
    for prefix, seq in list(model.named_modules()):
        if not isinstance(seq, Sequential):
            continue
        layers, names = list(seq._modules.values()), list(seq._modules)
        keep: list[Module] = []
        for i, layer in enumerate(layers):
            prev = keep[-1] if keep else None
            foldable = (
                isinstance(layer, _BatchNorm)
                and layer.running_mean is not None
                and layer.axis == 1
                and isinstance(prev, (Conv2d, Linear))
                and prev.weight.shape[0] == layer.num_features
            )
            if foldable:
                assert isinstance(prev, (Conv2d, Linear)) and isinstance(layer, _BatchNorm)
                w, b = F.fold_batchnorm_params(
                    prev.weight.data,
                    None if prev.bias is None else prev.bias.data,
                    layer.running_mean,
                    layer.running_var,
                    None if layer.weight is None else layer.weight.data,
                    None if layer.bias is None else layer.bias.data,
                    layer.eps,
                )
                prev.weight.data = w
                if prev.bias is None:
                    prev.bias = Parameter(b)
                else:
                    prev.bias.data = b
                continue
            if isinstance(layer, _BatchNorm) and strict:
                where = f"{prefix}.{names[i]}" if prefix else names[i]
                raise ValueError(
                    f"fold_batchnorm(strict=True): the BN layer {where!r} does "
                    f"not directly follow a Conv2d or Linear layer"
                )
            keep.append(layer)
        if len(keep) != len(layers):
            for name in names:
                del seq._modules[name]
                object.__delattr__(seq, name)
            for i, layer in enumerate(keep):
                setattr(seq, str(i), layer)
    return model
