"""``SyncBatchNorm``: batch statistics over every process of a torch.distributed group.

Each process (rank) holds a slice of the global batch. In training, the statistics are
those of the concatenated batch, as if one process had it all:

    forward:  local count n_r, mean_r, M2_r = n_r * var_r (bnlab's kernels)
              one all-reduce (sum) of [n_r, n_r * mean_r, M2_r + n_r * mean_r^2]  (3, C)
              n = sum n_r, mean = sum(n_r mean_r) / n, var = (sum(M2_r + n_r mean_r^2)) / n - mean^2
              y = (x - mean) / sqrt(var + eps) * weight + bias                  (kernels)
    backward: local sum(dy), sum(dy * (x - mean))                               (kernels)
              one all-reduce (sum) of both                                       (2, C)
              dx = w * inv_std * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)  (kernels)
              weight.grad, bias.grad: this rank's own sums (DDP's all-reduce adds them up)

The forward all-reduce is in float64 whatever the input dtype. Combining without a common
shift costs ``eps64 * mean^2 / var`` of the variance, relative. For float32 inputs that is
below the inputs' own rounding (``eps32 * |mean| / std``) up to ``|mean| / std`` of about
1e9. For float64 inputs it is exact to about ``1e-16 * (mean / std)^2``.

Local batch sizes may differ and may be 0. The running statistics are updated on every
rank with the same global values (unbiased with the global count), so they stay
identical. bnlab's NaN guard holds for the global batch.

Every training call first exchanges (C, dtype, ndim) with every rank (one all-gather of
three integers), so a rank whose input differs, at the first call or any later one, gives
every rank a ValueError that names the ranks, instead of a hang or garbage. That is one
small collective per BN layer and step more than the two above: a rank cannot know that
another changed without hearing from it, and the statistics' all-reduce cannot carry the
signature (its size depends on C, and collectives of different sizes hang or corrupt).
Its cost is measured by ``tools/sync_check_cost.py`` (docs/scaling.md).
"""

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from . import _ops, engine
from .batchnorm import PythonOnly, _BatchNorm, no_mask

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _group_size(group) -> int:
    """World size of ``group`` (None: the default group), or 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _check_ranks(x: torch.Tensor, group) -> None:
    """All-gather (C, dtype, ndim) and raise, on every rank, if any rank differs. An empty
    input's ndim is anyone's (a rank with no samples contributes nothing: Join's shadow)."""
    mine = torch.tensor(
        [x.shape[1], _DTYPE_CODES.get(x.dtype, 0), x.dim() if x.numel() else -1],
        dtype=torch.long,
        device=x.device,
    )
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    names = {v: str(k).removeprefix("torch.") for k, v in _DTYPE_CODES.items()}
    first = next((r for r, t in enumerate(every) if int(t[2]) >= 0), 0)  # a rank with data
    ref = every[first].tolist()
    bad = [
        r
        for r, t in enumerate(every)
        if t.tolist()[:2] != ref[:2] or int(t[2]) not in (-1, ref[2])
    ]
    if bad:

        def describe(r):
            c, code, ndim = every[r].tolist()
            return (
                f"rank {r}: {ndim}-D input, {c} channels, {names.get(code, 'unsupported dtype')}"
            )

        raise ValueError(
            "SyncBatchNorm inputs differ across ranks: "
            + "; ".join(describe(r) for r in [first, *bad])
            + f" (ranks {bad} differ from rank {first})"
        )


class SyncFunction(torch.autograd.Function):
    """The synchronized training step (module docstring); one all-reduce each way."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, nbt, eps, momentum, group, impl):
        C = x.shape[1]
        n_local = x.numel() // C if x.numel() else 0
        packed = torch.zeros((3, C), dtype=torch.float64, device=x.device)
        if n_local:
            mean_l, var_l = (t.to(torch.float64) for t in impl.moments(x))
            packed[0] = n_local
            packed[1] = n_local * mean_l
            packed[2] = n_local * (var_l + mean_l * mean_l)
        dist.all_reduce(packed, group=group)
        n = int(packed[0, 0])  # the global count (a host read on CUDA, as in torch's)
        mean = packed[1] / packed[0]
        var = (packed[2] / packed[0] - mean * mean).clamp_min(0.0)
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {n} "
                f"over all ranks (input size {tuple(x.shape)} on this rank)"
            )
        if running_mean is not None:
            engine.update_running(running_mean, running_var, nbt, mean, var, n, momentum)
        if n_local:
            y, mean_k, inv_std = impl.eval(x, mean, var, weight, bias, eps)
        else:
            y = torch.empty_like(x)
            mean_k, inv_std = mean, (var + eps).rsqrt()
        ctx.save_for_backward(x, weight, mean_k, inv_std)
        ctx.n, ctx.n_local, ctx.group, ctx.impl = n, n_local, group, impl
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if _ops.graph_wanted(dy):
            raise RuntimeError(
                "SyncBatchNorm has no second derivative: its backward's "
                "all-reduce is not differentiable (use it without "
                "create_graph=True, or BatchNorm on one process)"
            )
        x, weight, mean, inv_std = ctx.saved_tensors
        C = x.shape[1]
        sums = torch.zeros((2, C), dtype=torch.float64, device=x.device)
        if ctx.n_local:
            dy = dy.contiguous(memory_format=_ops.memory_format(x))
            local = ctx.impl.grad_sums(dy, x, mean)
            sums[0], sums[1] = local[0], local[1]
        local_sums = sums.clone()
        dist.all_reduce(sums, group=ctx.group)
        if ctx.n_local:
            dx = ctx.impl.dx_from_sums(dy, x, mean, inv_std, weight, sums[0], sums[1], ctx.n)
        else:
            dx = torch.zeros_like(x)
        dweight = (
            None
            if ctx.weight_dtype is None
            else (local_sums[1] * inv_std.to(torch.float64)).to(ctx.weight_dtype)
        )
        dbias = None if ctx.bias_dtype is None else local_sums[0].to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None


class SyncBatchNorm(PythonOnly, _BatchNorm, _TorchBatchNorm):
    """``torch.nn.SyncBatchNorm`` on bnlab's kernels, on CPU (gloo) and CUDA (NCCL).

    Same constructor, attributes (``process_group``) and state dict as torch's class, but
    derived from ``torch.nn.modules.batchnorm._BatchNorm`` as torch's own is (torch's
    DistributedDataParallel refuses ``torch.nn.SyncBatchNorm`` on CPU). In training inside an
    initialized process group of more than one rank, the batch statistics are the global
    batch's (module docstring); otherwise it is plain BN (:class:`bnlab.torch.BatchNorm2d`'s
    path, any input rank >= 2).

    Shape: (N, C, *) -> the same; N may differ across ranks, and may be 0.

    Example:
        >>> model = bnlab.torch.convert(model, sync=True)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        no_mask(self, mask)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if (
            not (self.training and _group_size(self.process_group) > 1)
            or getattr(self, "_bn_pool", None) is not None
        ):  # recalibrate: each rank's own
            return super()._forward(input)
        group = self.process_group
        joinable = getattr(self, "_joinable", None)  # bnlab.torch.joinables: under Join
        if joinable is not None:
            joinable.notify(self)
        _check_ranks(input, group)  # every call: any rank may change (module docstring)
        if input.shape[1] != self.num_features:  # on every rank alike, after the exchange
            raise ValueError(
                f"expected {self.num_features} channels, got input of shape {tuple(input.shape)}"
            )
        engine.check_eps(self.eps, True)
        update = self.track_running_stats
        params = (
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
        )
        if input.numel():
            name = engine.select(self.backend, input, params, measured=False)
            if name not in _ops.ENGINES:
                raise TypeError(
                    f"SyncBatchNorm runs bnlab's kernels: CPU float32/float64 or CUDA "
                    f"float32/float16/bfloat16 input with parameters of its dtype (or float32),"
                    f" got {input.dtype} on {input.device}"
                )
        else:  # an empty slice on this rank: no kernel runs, only the all-reduces
            name = "triton" if input.device.type == "cuda" else "numba"
        momentum = self.momentum
        nbt = self.num_batches_tracked if update else None
        return SyncFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if update else None,
            self.running_var if update else None,
            nbt,
            self.eps,
            momentum,
            group,
            _ops.ENGINES[name],
        )
