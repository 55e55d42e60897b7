"""The BN family for torch models: ghost batches, frozen BN, folding, recalibration.

Bookkeeping and dispatch around bnlab's kernels (:mod:`bnlab.torch._ops`) and formulas
(:func:`bnlab.functional.fold_batchnorm_params`). The same names exist for bnlab models in
:mod:`bnlab.nn`, with the same semantics.
"""

import collections
import copy

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import functional as BF
from . import _ops, engine, reference
from . import functional as F
from .batchnorm import PythonOnly, _BatchNorm, _Host, no_mask

# --- ghost batches ----------------------------------------------------------------------------


def _train_with_stats(x, weight, bias, eps, backend):
    """y with x's own batch statistics (differentiable in x, weight, bias), and the batch's
    mean and biased var (no gradient), on the engine :func:`bnlab.torch.engine.select`
    picks."""
    name = engine.select(backend, x, (None, None, weight, bias))
    engine.check_eps(eps, True)
    if name in _ops.ENGINES:
        y, mean, var, _ = _ops.TrainFunction.apply(
            x,
            weight,
            bias,
            eps,
            None,
            None,
            None,
            _ops.count_per_channel(x),
            0.0,
            _ops.ENGINES[name],
        )
        return y, mean, var
    if name == "reference":
        y, mean, var, _ = reference.forward(x, weight, bias, eps, True)
        return y, mean.detach(), var.detach()
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    var, mean = torch.var_mean(x.detach(), dim=[0, *range(2, x.dim())], correction=0)
    return y, mean, var


class _Ghost(PythonOnly):
    """Mixin: in training, virtual batch k is samples ``[k*v, (k+1)*v)``, normalized with
    its own statistics; the running statistics are updated once per call with the average
    of the virtual batches' means and unbiased variances (Keras's ``virtual_batch_size``,
    up to a permutation of the batch; the conventions are mapped in
    :class:`bnlab.nn.GhostBatchNorm2d`'s docstring). Evaluation uses the running
    statistics."""

    pools_statistics = False  # virtual batches / corrected statistics

    def __init__(
        self,
        num_features,
        virtual_batch_size: int,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.virtual_batch_size = BF.check_virtual_batch_size(virtual_batch_size)

    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        no_mask(self, mask)
        if not self.training:
            return super()._forward(input)
        self._check_input_dim(input)
        v = self.virtual_batch_size
        if input.shape[0] % v:
            raise ValueError(
                f"the batch size must be a multiple of virtual_batch_size={v}, "
                f"got a batch of {input.shape[0]} (input shape "
                f"{tuple(input.shape)})"
            )
        ys, means, variances = [], [], []
        for chunk in input.split(v):
            engine.verify_batch_size(chunk)
            y, mean, var = _train_with_stats(chunk, self.weight, self.bias, self.eps, self.backend)
            ys.append(y)
            means.append(mean)
            variances.append(var)
        if self.track_running_stats:
            mean = torch.stack(means).mean(0)
            var = torch.stack(variances).mean(0)
            engine.update_running(
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                mean,
                var,
                _ops.count_per_channel(input) // len(ys),
                self.momentum,
            )
        return torch.cat(ys)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_Ghost, _BatchNorm, torch.nn.BatchNorm1d):
    """Ghost BN over (N, C) or (N, C, L); N a multiple of ``virtual_batch_size`` in training.
    Other arguments and attributes are ``torch.nn.BatchNorm1d``'s."""


class GhostBatchNorm2d(_Ghost, _BatchNorm, torch.nn.BatchNorm2d):
    """Ghost BN over (N, C, H, W); N a multiple of ``virtual_batch_size`` in training.
    Other arguments and attributes are ``torch.nn.BatchNorm2d``'s."""


# --- batch renormalization ---------------------------------------------------------------------


class _Renorm(PythonOnly):
    """Mixin: batch renormalization in training, BN with the running statistics in
    evaluation; semantics, buffers (``renorm_mean``, ``renorm_std``) and conventions as
    :class:`bnlab.nn.BatchRenorm2d`'s. x_hat comes from bnlab's kernels (differentiable);
    r and d from :func:`bnlab.functional.renorm_correction` (constants);
    ``y = x_hat * (weight * r) + (weight * d + bias)``."""

    pools_statistics = False  # virtual batches / corrected statistics

    renorm_mean: torch.Tensor
    renorm_std: torch.Tensor

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        rmax=3.0,
        dmax=5.0,
        renorm_momentum=0.01,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        if rmax < 1 or dmax < 0:
            raise ValueError(f"rmax must be >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        self.rmax, self.dmax, self.renorm_momentum = float(rmax), float(dmax), renorm_momentum
        kw = dict(device=self.running_mean.device, dtype=self.running_mean.dtype)
        self.register_buffer("renorm_mean", torch.zeros(self.num_features, **kw))
        self.register_buffer("renorm_std", torch.ones(self.num_features, **kw))

    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        no_mask(self, mask)
        if not self.training:
            return super()._forward(input)
        self._check_input_dim(input)
        engine.verify_batch_size(input)
        x_hat, mean, var = _train_with_stats(input, None, None, self.eps, self.backend)
        r, d, sigma_b = BF.renorm_correction(
            _np(mean),
            _np(var),
            self.eps,
            _np(self.renorm_mean),
            _np(self.renorm_std),
            self.rmax,
            self.dmax,
        )
        shape = [1, -1] + [1] * (input.dim() - 2)

        def channel(a):
            return torch.from_numpy(a).to(input.device, input.dtype).reshape(shape)

        weight = 1.0 if self.weight is None else self.weight.reshape(shape)
        bias = 0.0 if self.bias is None else self.bias.reshape(shape)
        y = (x_hat * (weight * channel(r)) + (weight * channel(d) + bias)).to(input.dtype)
        # the renorm averages under the running statistics' guard: a NaN batch changes none
        w = self.renorm_momentum
        engine.update_running(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            mean,
            var,
            _ops.count_per_channel(input),
            self.momentum,
            extra=((self.renorm_mean, mean, w), (self.renorm_std, torch.from_numpy(sigma_b), w)),
        )
        return y

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, "
            f"renorm_momentum={self.renorm_momentum}"
        )


class BatchRenorm1d(_Renorm, _BatchNorm, torch.nn.BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L); see :class:`_Renorm`."""


class BatchRenorm2d(_Renorm, _BatchNorm, torch.nn.BatchNorm2d):
    """Batch renormalization over (N, C, H, W); see :class:`_Renorm`."""


# --- BN + activation ---------------------------------------------------------------------------


class _Activated(_Host):
    """BatchNorm2d's arguments with ``act`` second ("relu" or "identity"; timm's order)."""

    def __init__(
        self,
        num_features,
        act: str = "relu",
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
    ):
        BF.check_act(act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.act = act

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"


class BatchNormAct2d(_Activated, _BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` followed by an activation (``act``: "relu" or "identity"),
    fused into the kernels' passes in eager mode (:class:`bnlab.torch._ops.ActFunction`:
    numba on CPU float32/float64, Triton on CUDA); under ``torch.compile`` or for inputs the
    kernels do not take, bnlab's BN then ``torch.relu``. timm's module name; state dict as
    BatchNorm2d's.

    Example:
        >>> layer = BatchNormAct2d(16)      # replaces BatchNorm2d(16) followed by ReLU()
    """

    def _scripted_act(self, y: torch.Tensor) -> torch.Tensor:
        """The activation after BN (TorchScript's path calls it too)."""
        return torch.relu(y) if self.act == "relu" else y

    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        no_mask(self, mask)
        self._check_input_dim(input)
        bn_training, rm, rv, nbt, momentum = self._bn_args()
        engine.check_eps(self.eps, bn_training)
        name = engine.select(
            self.backend, input, (rm, rv, self.weight, self.bias), training=bn_training
        )
        pooled = getattr(self, "_bn_pool", None) is not None  # BN's path pools (pooling.py)
        if name not in _ops.ENGINES or torch.compiler.is_compiling() or pooled:
            return self._scripted_act(super()._forward(input))
        if bn_training:
            engine.verify_batch_size(input)
        return _ops.ActFunction.apply(
            input,
            self.weight,
            self.bias,
            rm,
            rv,
            nbt,
            self.eps,
            momentum,
            bn_training,
            self.act,
            name,
        )


class BatchNormAddAct2d(_Activated, _BatchNorm, torch.nn.BatchNorm2d):
    """BN, a residual added, then an activation, in one pass: the tail of a ResNet block,

        y = act(BN(x) + residual)          act: "relu" (default) or "identity"

    ``forward(x, residual)``, residual of x's shape. On the kernels' engines (numba for CPU
    float32/float64, Triton for CUDA; :mod:`bnlab.torch.engine`) the forward reads x and
    the residual once (after the statistics) and keeps the ReLU's mask as one bit per
    element; the backward reads x, dy and those bits, never y
    (:class:`bnlab.torch._ops.AddActFunction`). A residual of another shape, dtype or
    device, ``torch.compile``, and the other engines run bnlab's BN, then ``+`` and the
    activation in torch (torch's broadcasting and type promotion, or torch's error). State
    dict, arguments and attributes are BatchNorm2d's; :func:`bnlab.torch.fuse` puts these in
    a model.

    Example:
        >>> layer = BatchNormAddAct2d(64)
        >>> out = layer(conv2(h), identity)   # relu(bn2(conv2(h)) + identity)
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return self._add_act(self._scripted(input, None), residual)
        self._check_input_dim(input)
        bn_training, rm, rv, nbt, momentum = self._bn_args()
        engine.check_eps(self.eps, bn_training)
        name = engine.select(
            self.backend,
            input,
            (rm, rv, self.weight, self.bias),
            update=nbt is not None,
            training=bn_training,
        )
        if bn_training:
            engine.verify_batch_size(input)
        fused = (
            name in _ops.ENGINES
            and not torch.compiler.is_compiling()
            and getattr(self, "_bn_pool", None) is None  # BN's path pools (pooling.py)
            and isinstance(residual, torch.Tensor)
            and residual.shape == input.shape
            and residual.dtype == input.dtype
            and residual.device == input.device
        )
        if not fused:  # BN's own path (the engine, pooling), then + and the activation
            return self._add_act(_BatchNorm._forward(self, input), residual)
        return _ops.AddActFunction.apply(
            input,
            residual,
            self.weight,
            self.bias,
            rm,
            rv,
            nbt,
            self.eps,
            momentum,
            bn_training,
            self.act,
            name,
        )

    def _add_act(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """act(y + residual) in torch operations (TorchScript's path and the unfused one)."""
        z = y + residual
        return torch.relu(z) if self.act == "relu" else z


# --- frozen BN --------------------------------------------------------------------------------


class FrozenBatchNorm2d(torch.nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` are buffers, nothing learns, and always (training or not)

        y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

    (bnlab's evaluation-mode kernels; any input rank >= 2). Loads a BatchNorm state dict;
    ``num_batches_tracked`` is accepted and ignored.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
        if torch.jit.is_scripting():  # torch's kernel: TorchScript cannot call bnlab's
            return torch.nn.functional.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _replace(module: torch.nn.Module, convert) -> torch.nn.Module:
    """``convert(module)`` if it gives a module, else the same for every child (in place,
    each in its place)."""
    new = convert(module)
    if new is not None:
        return new
    for name, child in list(module.named_children()):
        replaced = _replace(child, convert)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch's, bnlab's, SyncBatchNorm) in ``module`` by a
    :class:`FrozenBatchNorm2d` with copies of its values, in place; returns the module (the
    new one if ``module`` itself is a BN layer)."""

    def frozen(bn):
        if not isinstance(bn, _TorchBatchNorm):
            return None
        if bn.running_mean is None:
            raise ValueError(
                f"cannot freeze {bn!r}: it has no running statistics (track_running_stats=False)"
            )
        new = FrozenBatchNorm2d(
            bn.num_features, bn.eps, device=bn.running_mean.device, dtype=bn.running_mean.dtype
        )
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
        return new

    return _replace(module, frozen)


# --- recalibration ----------------------------------------------------------------------------


def recalibrate(model: torch.nn.Module, batches, process_group=None) -> torch.nn.Module:
    """Precise BN, with ``torch.optim.swa_utils.update_bn``'s semantics: reset every BN
    layer's running statistics and recompute them as the exact average over ``batches``
    (inputs, or (input, target) pairs; no gradients), then restore each layer's momentum
    and the model's train/eval mode. Returns the model.

    With ``process_group`` given, or torch.distributed initialized with more than one rank:
    every rank runs its own ``batches`` (any number) and ends with the same statistics, those
    one process would compute over the union of all ranks' batches (each batch's mean and
    unbiased variance, every batch weighted equally): :func:`bnlab.torch.pooling.
    recalibrate_across`, bnlab's BN layers only (``convert`` first). Call it on every rank."""
    import torch.distributed as dist

    if process_group is not None or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ):
        from .pooling import recalibrate_across

        return recalibrate_across(model, batches, process_group)
    bns = [m for m in model.modules() if isinstance(m, _TorchBatchNorm) and m.track_running_stats]
    with torch.no_grad():
        return BF.recalibrate_layers(model, bns, batches, lambda bn: bn.reset_running_stats())


# --- folding ----------------------------------------------------------------------------------

_FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def fold_batchnorm(module: torch.nn.Module, strict: bool = False) -> torch.nn.Module:
    """An evaluation-mode copy of ``module`` (the original is untouched) in which every BN
    directly after a ``Conv1d/2d/3d`` or ``Linear`` (whose output nothing else uses, and
    neither of which is called more than once) is
    folded into that layer's weight and bias (:func:`bnlab.functional.fold_batchnorm_params`;
    torch's ``fuse_conv_bn_eval`` computes the same) and removed. The model is traced with
    ``torch.fx``, so residual blocks and other graphs work, not only Sequentials; the result
    is a ``torch.fx.GraphModule`` whose outputs equal the unfolded model's in evaluation.

    A BN that follows anything else stays; with ``strict=True`` it is a ValueError naming
    it (its qualified name).
    """
    import torch.fx

    model = copy.deepcopy(module).eval()
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: say what to do
        raise ValueError(
            f"fold_batchnorm traces the model with torch.fx, which failed: {e}; "
            "fold the traceable submodules instead"
        ) from e
    mods = dict(traced.named_modules())
    calls = collections.Counter(n.target for n in traced.graph.nodes if n.op == "call_module")
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(mods[node.target], _TorchBatchNorm):
            continue
        bn = mods[node.target]
        prev = node.args[0] if node.args else None
        layer = (
            mods.get(prev.target)
            if isinstance(prev, torch.fx.Node) and prev.op == "call_module"
            else None
        )
        # a layer (or BN) called more than once cannot take one BN's values: it stays
        if (
            isinstance(layer, _FOLDABLE)
            and isinstance(prev, torch.fx.Node)
            and len(prev.users) == 1
            and bn.track_running_stats
            and calls[prev.target] == 1
            and calls[node.target] == 1
            and layer.weight.shape[0] == bn.num_features
        ):
            w, b = BF.fold_batchnorm_params(
                _np(layer.weight),
                None if layer.bias is None else _np(layer.bias),
                _np(bn.running_mean),
                _np(bn.running_var),
                None if bn.weight is None else _np(bn.weight),
                None if bn.bias is None else _np(bn.bias),
                bn.eps,
            )
            device, dtype = layer.weight.device, layer.weight.dtype
            layer.weight = torch.nn.Parameter(torch.from_numpy(w).to(device, dtype))
            layer.bias = torch.nn.Parameter(torch.from_numpy(b).to(device, dtype))
            node.replace_all_uses_with(prev)
            traced.graph.erase_node(node)
            traced.delete_submodule(node.target)
        elif strict:
            raise ValueError(
                f"fold_batchnorm(strict=True): the BN layer {node.target!r} does "
                f"not directly follow a Conv or Linear layer whose output only it "
                f"uses"
            )
    traced.graph.lint()
    traced.recompile()
    return traced.eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()
