"""bnlab's kernels as ``torch.library`` custom ops and autograd Functions.

Two kernel families ("engines") behind the same autograd formulas: numba on CPU tensors
(through NumPy views, below) and Triton (:mod:`bnlab.kernels.triton_bn`, which takes torch
tensors itself: CUDA, or CPU in Triton's interpreter).

For numba, each op hands the kernels zero-copy NumPy views of CPU tensors
(:func:`bnlab.torch.engine.numpy_view`, which leaves their storages resizable) and writes
into an output tensor allocated by torch (large ones reused, :class:`_Outputs`), so nothing
is copied on the way in or out:

* contiguous memory (NCHW, (N, C), (N, C, L), NCDHW) is viewed with channels on axis 1;
* channels_last / channels_last_3d memory is viewed as NHWC / NDHWC, which the kernels
  treat as an (M, C) matrix; the output is allocated channels-last too, as torch's is;
* anything else (a strided slice, a transposed tensor) is copied to contiguous memory first.

The math (statistics, normalization, the closed-form backward, the running-statistics
update) is :mod:`bnlab.functional`'s and :mod:`bnlab.kernels.numba_bn`'s; here are only
layouts, dtypes and torch's registration: a fake (meta) implementation per op, so
``torch.compile`` can trace through them, and autograd formulas.

Ops (namespace ``bnlab``):

* ``batch_norm_train(x, weight?, bias?, eps) -> (y, mean, var, inv_std)``: batch statistics
  (float64, (C,); var biased); differentiable in x, weight, bias.
* ``batch_norm_eval(x, mean, var, weight?, bias?, eps) -> (y, mean, inv_std)``: given
  statistics; differentiable in x, weight, bias.
* ``batch_norm_backward(dy, x, mean, inv_std, weight?, batch_stats) -> (dx, dweight, dbias)``.
* ``update_running_stats(running_mean!, running_var!, num_batches_tracked!, mean, var, count,
  momentum?)``: :func:`bnlab.torch.engine.update_running` (skipped when the batch
  statistics are not finite).

Gradients: when a graph of the gradient is asked for (``create_graph=True``, torch.func's
batched gradients), the backward is the differentiable closed form in torch operations
(:func:`bnlab.torch.reference.grads`), so second derivatives are exact on every engine.

The Triton engine registers the same four as ``bnlab::triton_batch_norm_train`` etc. (any
device); its mean is float64 (the float32 pair the kernels keep), its other statistics
float32. Which engine runs is :mod:`bnlab.torch.engine`'s decision.

Under ``torch.compile`` the modules call these ops; in eager mode they call the same
implementations through ``TrainFunction``/``EvalFunction`` (the same autograd formulas),
which saves the dispatcher's cost per call and lets the Triton engine update the running
statistics in its forward kernel (a traced op cannot mutate and be differentiable at once).

This module has no ``from __future__ import annotations``: ``custom_op`` reads the schema
from the annotations, and torch 2.4 needs them as real types.
"""

import math
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from ..kernels import memory
from . import engine, reference
from .layout import memory_format

_F64 = torch.float64
DTYPES = (torch.float32, torch.float64)  # what the numba kernels compute in


# --- layouts -------------------------------------------------------------------------------


def _as_numpy(t: Tensor, fmt: torch.memory_format) -> tuple[np.ndarray, int]:
    """A C-contiguous NumPy view of ``t`` laid out as ``fmt`` and its channel axis.

    Zero-copy when ``t`` is already in that format, else one copy into it.
    """
    t = t.detach().contiguous(memory_format=fmt)
    if fmt == torch.contiguous_format:
        return _view(t), 1
    # (N, C, *spatial) in channels-last memory is (N, *spatial, C) in C order
    return _view(t.permute(0, *range(2, t.dim()), 1)), -1


_view = engine.numpy_view


def _empty_like(x: Tensor) -> Tensor:
    """What the fake implementations return: an uninitialized tensor like ``x``, in the
    memory format the real ones produce (:func:`_output`)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def _output(x: Tensor, fmt: torch.memory_format) -> tuple[Tensor, np.ndarray]:
    """An output like ``x`` in memory format ``fmt``, allocated by torch (an ordinary tensor:
    ``resize_``, ``share_memory_`` and every storage method work), and a NumPy view of it
    laid out as :func:`_as_numpy` lays out ``x``, for the kernel to write into.

    Large outputs reuse memory (:class:`_Outputs`)."""
    y = OUTPUTS.empty(x.shape, x.dtype, fmt)
    if fmt == torch.contiguous_format:
        return y, _view(y)
    # channels-last memory: (N, *spatial, C) in C order
    return y, _view(y.permute(0, *range(2, y.dim()), 1))


def _grad_views(dy: Tensor, x: Tensor):
    """x and dy as NumPy views in x's memory format (dy may come in another layout, or
    dtype), the channel axis, and dx allocated with its view: what the numba backward
    passes take."""
    fmt = memory_format(x)
    xv, axis = _as_numpy(x, fmt)
    dyv, _ = _as_numpy(dy.to(x.dtype), fmt)
    dx, dxv = _output(x, fmt)
    return xv, dyv, axis, dx, dxv


class _Outputs(memory.Reuse):
    """Memory for large outputs (:data:`bnlab.kernels.memory.LARGE` bytes and more),
    torch-allocated and reused: :class:`bnlab.kernels.memory.Reuse`'s bookkeeping on torch
    storages. A storage is free once its use count is 1 (no tensor, view, autograd graph
    or storage object of the user's refers to it). An output is an ordinary tensor on such
    a storage (``set_``, an offset into it; not a view), so ``resize_``, ``share_memory_``
    and every storage method work. Measured by tools/output_alloc.py."""

    def allocate(self, nbytes: int) -> torch.UntypedStorage:
        return torch.UntypedStorage(nbytes)

    def address(self, buf: torch.UntypedStorage) -> int:
        return buf.data_ptr()

    def nbytes(self, buf: torch.UntypedStorage) -> int:
        return buf.nbytes()

    def held(self, buf: torch.UntypedStorage) -> bool:
        return torch._C._storage_Use_Count(buf._cdata) != 1

    def empty(self, shape, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
        if math.prod(shape) * dtype.itemsize < memory.LARGE:
            return torch.empty(shape, dtype=dtype, memory_format=fmt)
        layout = torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)  # strides
        size = layout.element_size()
        return self.take(
            layout.numel() * size,
            lambda storage, at: torch.empty(0, dtype=dtype).set_(
                storage, at // size, layout.shape, layout.stride()
            ),
        )


OUTPUTS = _Outputs()


def _own(t: Tensor) -> np.ndarray:
    """bnlab's own (C,) statistics (never a user's tensor) as NumPy: ``.numpy()`` is safe
    and cheapest here."""
    return t.detach().contiguous().numpy()


def _vec(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else _arr(t)


def _arr(t: Tensor) -> np.ndarray:
    """A (C,) tensor (float32/float64 CPU) as NumPy, without a copy where it can (a
    parameter's or buffer's view kept between steps, :func:`bnlab.torch.engine.held_view`)."""
    view = engine.held_view(t)
    return _view(t.detach().contiguous()) if view is None else view


def _numba():
    return kernels.resolve("numba")


# Threads inside torch models. Between torch's own multi-threaded ops the kernels run
# parallel from torch's grain size (2**15 elements; bnlab's own stack waits until 2**20,
# see bnlab.kernels.numba_bn), on at most torch.get_num_threads() threads, so
# torch.set_num_threads(1) holds for bnlab's kernels too. Measured by
# tools/torch_threads.py into docs/torch_threads.json (numbers in docs/performance.md).
PARALLEL_MIN_SIZE = 1 << 15


def _threads():
    return _numba().Threads(cap=torch.get_num_threads(), parallel_min_size=PARALLEL_MIN_SIZE)


# --- implementations (plain functions on real CPU tensors) ---------------------------------


def train_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, and the batch's mean, biased var and inv_std (float64, (C,))."""
    fmt = memory_format(x)
    xv, axis = _as_numpy(x, fmt)
    y, yv = _output(x, fmt)  # the kernel writes into y through yv
    _, mean, var, inv_std = _numba().train_forward(
        xv, _vec(weight), _vec(bias), eps, axis, out=yv, threads=_threads()
    )
    return y, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(inv_std)


def eval_impl(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """y with the given statistics, and mean and inv_std (float64 copies, (C,)) for the
    backward: the running buffers may change before it runs."""
    fmt = memory_format(x)
    xv, axis = _as_numpy(x, fmt)
    y, yv = _output(x, fmt)
    inv_std = F.inv_std_of(_arr(var), eps, np.float64)
    mean = mean.detach().to(_F64, copy=True)
    _numba().inference(
        xv, mean.numpy(), inv_std, _vec(weight), _vec(bias), axis, out=yv, threads=_threads()
    )
    return y, mean, torch.from_numpy(inv_std)


def backward_impl(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Optional[Tensor],
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dgamma, dbeta (the last two float64, (C,))."""
    xv, dyv, axis, dx, dxv = _grad_views(dy, x)
    _, dgamma, dbeta = _numba().backward(
        dyv,
        xv,
        _own(mean),
        _own(inv_std),
        _vec(weight),
        axis,
        batch_stats,
        out=dxv,
        threads=_threads(),
    )
    return dx, torch.from_numpy(dgamma), torch.from_numpy(dbeta)


def update_impl(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: Optional[float],
) -> None:
    """:func:`bnlab.torch.engine.update_running` (the one update, NaN guard included) as an
    op: what a traced graph calls, since a traced forward cannot mutate."""
    engine.update_running(
        running_mean, running_var, num_batches_tracked, mean, var, count, momentum
    )


# --- the Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1) ---------------------
# bnlab.kernels.triton_bn takes torch tensors and handles layouts itself; statistics are
# float32. Its training forward can update the running statistics in the same launch
# (eager); a traced (functional) op cannot mutate, so under torch.compile the update is
# its own op, as for numba.


def _triton():
    return engine.resolve_triton()


def triton_train_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, and the batch's mean (float64), biased var and inv_std (float32), each (C,)."""
    return _triton().train_forward(x, weight, bias, eps)


def triton_eval_impl(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """y with the given statistics, and copies of mean (float64) and inv_std (float32)."""
    return _triton().inference(x, mean, var, weight, bias, eps)


def triton_backward_impl(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Optional[Tensor],
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dgamma, dbeta (the last two float32, (C,))."""
    return _triton().backward(dy, x, mean, inv_std, weight, batch_stats)


# --- autograd formulas (shared by the custom ops and the eager Functions below) -----------


def graph_wanted(dy: Optional[Tensor] = None) -> bool:
    """The gradient itself is to be differentiated (``create_graph=True``) or batched
    (``torch.func``; gradcheck's batched gradients, whose legacy vmap batches ``dy``): the
    kernels' backward then gives way to the same closed form in torch operations
    (:func:`bnlab.torch.reference.grads`)."""
    return (
        torch.is_grad_enabled()
        or torch._C._are_functorch_transforms_active()
        or (dy is not None and _legacy_batched(dy))
    )


# torch's private test for gradcheck's legacy vmap; a torch without it has no such vmap
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def _setup(ctx, x, weight, bias, mean, inv_std, eps):
    ctx.save_for_backward(x, weight, bias, mean, inv_std)
    ctx.eps = eps
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx, dy, batch_stats: bool, backward, act: str = "identity"):
    """(dx, dweight, dbias) through ``backward`` (the op when traced, the impl in eager), or
    through the differentiable closed form when a graph is wanted."""
    x, weight, bias, mean, inv_std = ctx.saved_tensors
    if graph_wanted(dy):
        dx, dgamma, dbeta = reference.grads(
            dy, x, weight, bias, ctx.eps, batch_stats, mean, inv_std, act
        )
    else:
        dx, dgamma, dbeta = backward(dy, x, mean, inv_std, weight, batch_stats)
    dweight = None if ctx.weight_dtype is None else dgamma.to(ctx.weight_dtype)
    dbias = None if ctx.bias_dtype is None else dbeta.to(ctx.bias_dtype)
    return dx, dweight, dbias


def _train_grads(ctx, dy, backward):
    return (*_grads(ctx, dy, True, backward), None)  # None: eps


def _eval_grads(ctx, dy, backward):
    dx, dweight, dbias = _grads(ctx, dy, False, backward)
    return dx, None, None, dweight, dbias, None  # no gradient for the statistics or eps


def _setup_train(ctx, inputs, output):
    x, weight, bias, eps = inputs[:4]
    _setup(ctx, x, weight, bias, output[1], output[3], eps)
    ctx.mark_non_differentiable(*output[1:])  # the statistics: bookkeeping, not outputs


def _setup_eval(ctx, inputs, output):
    x, _, _, weight, bias, eps = inputs[:6]
    _setup(ctx, x, weight, bias, output[1], output[2], eps)
    ctx.mark_non_differentiable(*output[1:])


# --- custom ops: what torch.compile traces ------------------------------------------------


def _stat(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype)


def _stats_fake(x: Tensor, mean_dtype: torch.dtype, stat_dtype: torch.dtype, n: int):
    return (_stat(x, mean_dtype),) + tuple(_stat(x, stat_dtype) for _ in range(n - 1))


class Ops(NamedTuple):
    """One kernel family's four custom ops."""

    train: Any
    eval: Any
    backward: Any
    update: Any


def _custom_ops(
    prefix: str,
    train,
    eval_,
    backward,
    update,
    device_types,
    mean_dtype: torch.dtype,
    stat_dtype: torch.dtype,
) -> Ops:
    """Register ``bnlab::{prefix}batch_norm_train`` etc. (module docstring) around the
    implementations, with fake implementations (the mean of ``mean_dtype``, the other
    statistics and dgamma/dbeta of ``stat_dtype``) and the autograd formulas above."""

    def op(name, fn, mutates_args=()):
        return torch.library.custom_op(
            f"bnlab::{prefix}{name}", fn, mutates_args=mutates_args, device_types=device_types
        )

    ops = Ops(
        op("batch_norm_train", train),
        op("batch_norm_eval", eval_),
        op("batch_norm_backward", backward),
        op("update_running_stats", update, ("running_mean", "running_var", "num_batches_tracked")),
    )

    @ops.train.register_fake
    def _(x, weight, bias, eps):
        return _empty_like(x), *_stats_fake(x, mean_dtype, stat_dtype, 3)

    @ops.eval.register_fake
    def _(x, mean, var, weight, bias, eps):
        return _empty_like(x), *_stats_fake(x, mean_dtype, stat_dtype, 2)

    @ops.backward.register_fake
    def _(dy, x, mean, inv_std, weight, batch_stats):
        return _empty_like(x), _stat(x, stat_dtype), _stat(x, stat_dtype)

    @ops.update.register_fake
    def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        return None

    ops.train.register_autograd(
        lambda ctx, dy, *_: _train_grads(ctx, dy, ops.backward), setup_context=_setup_train
    )
    ops.eval.register_autograd(
        lambda ctx, dy, *_: _eval_grads(ctx, dy, ops.backward), setup_context=_setup_eval
    )
    return ops


NUMBA_OPS = _custom_ops("", train_impl, eval_impl, backward_impl, update_impl, "cpu", _F64, _F64)
TRITON_OPS = _custom_ops(
    "triton_",
    triton_train_impl,
    triton_eval_impl,
    triton_backward_impl,
    update_impl,
    None,
    _F64,
    torch.float32,
)
batch_norm_train, batch_norm_eval, batch_norm_backward, update_running_stats = NUMBA_OPS


# --- eager: the same implementations and formulas without the dispatcher -------------------
# A custom op call costs some 25-45 us of dispatch on this machine; per BN layer and
# training step that is four calls. Outside torch.compile the modules call the
# implementations through these Functions (or directly, when no gradient is needed).


# --- pieces for SyncBatchNorm: local reductions and the elementwise pass from given sums --


def moments_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch mean and biased var, float64 (C,)."""
    fmt = memory_format(x)
    xv, axis = _as_numpy(x, fmt)
    mean, var = _numba().moments(xv, axis, threads=_threads())
    return torch.from_numpy(mean), torch.from_numpy(var)


def grad_sums_impl(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``sum(dy)`` and ``sum(dy * (x - mean))``, float64 (C,)."""
    fmt = memory_format(x)
    xv, axis = _as_numpy(x, fmt)
    dyv, _ = _as_numpy(dy.to(x.dtype), fmt)
    s, p = _numba().grad_sums(dyv, xv, _own(mean), axis, threads=_threads())
    return torch.from_numpy(s), torch.from_numpy(p)


def dx_from_sums_impl(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    inv_std: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: int,
) -> Tensor:
    """dx (batch statistics) from sums over ``count`` values per channel."""
    xv, dyv, axis, dx, dxv = _grad_views(dy, x)
    _numba().dx_from_sums(
        dyv,
        xv,
        _own(mean),
        _own(inv_std),
        _vec(weight),
        _own(sum_dy),
        _own(sum_dy_xmu),
        count,
        axis,
        out=dxv,
        threads=_threads(),
    )
    return dx


def _triton_method(name):
    return lambda *args: getattr(_triton(), name)(*args)


class Engine(NamedTuple):
    """One kernel family's implementations, for the eager Functions and the modules."""

    train: Any  # (x, weight, bias, eps, running_mean, running_var, nbt, count, momentum)
    eval: Any
    backward: Any
    ops: Ops
    moments: Any  # x -> mean, var
    grad_sums: Any  # (dy, x, mean) -> sum(dy), sum(dy * (x - mean))
    dx_from_sums: Any  # (dy, x, mean, inv_std, weight, sum_dy, sum_dy_xmu, count) -> dx


def _numba_train(x, weight, bias, eps, running_mean, running_var, nbt, count, momentum):
    y, mean, var, inv_std = train_impl(x, weight, bias, eps)
    if running_mean is not None:
        engine.update_running(running_mean, running_var, nbt, mean, var, count, momentum)
    return y, mean, var, inv_std


def _triton_train(x, weight, bias, eps, running_mean, running_var, nbt, count, momentum):
    # the update in the same launch: the kernel's form of engine.update_running (same
    # momentum, unbiased count and guard)
    return _triton().train_forward(
        x, weight, bias, eps, running_mean, running_var, nbt, engine.momentum_of(momentum, nbt)
    )


ENGINES = {
    "numba": Engine(
        _numba_train,
        eval_impl,
        backward_impl,
        NUMBA_OPS,
        moments_impl,
        grad_sums_impl,
        dx_from_sums_impl,
    ),
    "triton": Engine(
        _triton_train,
        triton_eval_impl,
        triton_backward_impl,
        TRITON_OPS,
        _triton_method("moments"),
        _triton_method("grad_sums"),
        _triton_method("dx_from_sums"),
    ),
}


# Classic-style Functions (ctx as forward's first argument): a Function with a separate
# setup_context binds its arguments through inspect.signature on every call (~30 us on a
# GPU host, more than a small tensor's kernels take). Gradients of the statistics outputs
# are not materialized (no zero tensors made for them); a None dy gives None gradients.
# torch.func transforms need setup_context-style Functions: under them the engine layer
# runs the reference engine instead (bnlab.torch.engine.select).


class TrainFunction(torch.autograd.Function):
    """y, mean, var, inv_std = engine's training forward; updates the running statistics
    (if given) as a side effect. Differentiable in x, weight, bias, to any order."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, eps, running_mean, running_var, nbt, count, momentum, engine
    ):
        output = engine.train(
            x, weight, bias, eps, running_mean, running_var, nbt, count, momentum
        )
        _setup_train(ctx, (x, weight, bias, eps), output)
        ctx.engine = engine
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:
            return (None,) * 10
        return (*_train_grads(ctx, dy, ctx.engine.backward), None, None, None, None, None, None)


class EvalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, engine):
        output = engine.eval(x, mean, var, weight, bias, eps)
        _setup_eval(ctx, (x, mean, var, weight, bias, eps), output)
        ctx.engine = engine
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dy, *_):
        if dy is None:
            return (None,) * 7
        return (*_eval_grads(ctx, dy, ctx.engine.backward), None)


def _given_stats(mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Evaluation's statistics for the numba passes: float64 copies of mean and
    1 / sqrt(var + eps)."""
    inv_std = torch.from_numpy(F.inv_std_of(_arr(var), eps, np.float64))
    return mean.detach().to(_F64, copy=True), inv_std


class ActFunction(torch.autograd.Function):
    """BN followed by an activation in the kernels' fused passes (``act`` "relu" or
    "identity"; BatchNormAct2d): training (batch statistics, running statistics updated
    by :func:`bnlab.torch.engine.update_running`) or evaluation (given statistics). Eager
    mode; ``engine`` "numba" (CPU float32/64) or "triton"."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        nbt,
        eps,
        momentum,
        training,
        act,
        engine_name="numba",
    ):
        ctx.training, ctx.act, ctx.engine = training, act, engine_name
        if engine_name == "triton":
            tb = _triton()
            if training:
                y, mean, _, inv_std = tb.train_forward(
                    x,
                    weight,
                    bias,
                    eps,
                    running_mean,
                    running_var,
                    nbt,
                    engine.momentum_of(momentum, nbt),
                    act,
                )
            else:
                y, mean, inv_std = tb.inference(
                    x, running_mean, running_var, weight, bias, eps, act
                )
        else:
            fmt = memory_format(x)
            xv, axis = _as_numpy(x, fmt)
            y, yv = _output(x, fmt)
            w, b = _vec(weight), _vec(bias)
            if training:
                _, mean, var, inv_std = _numba().train_forward(
                    xv, w, b, eps, axis, out=yv, threads=_threads(), act=act
                )
                mean, var, inv_std = (torch.from_numpy(a) for a in (mean, var, inv_std))
                if running_mean is not None:
                    engine.update_running(
                        running_mean, running_var, nbt, mean, var, count_per_channel(x), momentum
                    )
            else:
                mean, inv_std = _given_stats(running_mean, running_var, eps)
                _numba().inference(
                    xv,
                    mean.numpy(),
                    inv_std.numpy(),
                    w,
                    b,
                    axis,
                    out=yv,
                    threads=_threads(),
                    act=act,
                )
        _setup(ctx, x, weight, bias, mean, inv_std, eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        def backward(dy, x, mean, inv_std, weight, batch_stats):
            _, _, bias, _, _ = ctx.saved_tensors
            if ctx.engine == "triton":
                return _triton().backward(dy, x, mean, inv_std, weight, batch_stats, bias, ctx.act)
            xv, dyv, axis, dx, dxv = _grad_views(dy, x)
            _, dgamma, dbeta = _numba().backward(
                dyv,
                xv,
                _own(mean),
                _own(inv_std),
                _vec(weight),
                axis,
                batch_stats,
                out=dxv,
                threads=_threads(),
                beta=_vec(bias),
                act=ctx.act,
            )
            return dx, torch.from_numpy(dgamma), torch.from_numpy(dbeta)

        return (*_grads(ctx, dy, ctx.training, backward, ctx.act),) + (None,) * 8


def count_per_channel(x: Tensor) -> int:
    """m, the number of values per channel."""
    return x.numel() // x.shape[1]


def unpack_mask(bits: Tensor, x: Tensor) -> Tensor:
    """The 1-bit mask of BN + add + ReLU (bit i of byte i // 8: element i of x's memory) as
    a bool tensor like x (for the differentiable backward)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[: x.numel()].bool()
    fmt = memory_format(x)
    if fmt == torch.contiguous_format:
        return flat.reshape(x.shape)
    # channels-last memory is (N, *spatial, C) in C order
    return flat.reshape(x.shape[0], *x.shape[2:], x.shape[1]).permute(
        0, x.dim() - 1, *range(1, x.dim() - 1)
    )


class AddActFunction(torch.autograd.Function):
    """``act(BN(x) + residual)`` in one pass (BatchNormAddAct2d; ``act`` "relu" or
    "identity"): training (batch statistics, running statistics updated with the guard of
    :func:`bnlab.torch.engine.update_running`) or evaluation (the given statistics). The
    forward keeps the ReLU's mask as bits, so the backward reads x, dy and the bits, never
    y: g = dy where not y <= 0 (torch's ReLU backward) is the residual's gradient, and dx,
    dweight, dbias are BN's for g. Eager mode; ``engine_name`` "numba" (CPU float32/64) or "triton"; residual of x's
    shape and dtype."""

    @staticmethod
    def forward(
        ctx,
        x,
        residual,
        weight,
        bias,
        running_mean,
        running_var,
        nbt,
        eps,
        momentum,
        training,
        act,
        engine_name="numba",
    ):
        ctx.training, ctx.act, ctx.engine = training, act, engine_name
        if engine_name == "triton":
            stats = (
                (None, None, running_mean, running_var)
                if training
                else (running_mean, running_var, None, None)
            )
            y, mean, inv_std, bits = _triton().add_act_forward(
                x,
                residual,
                weight,
                bias,
                eps,
                training,
                *stats,
                nbt,
                engine.momentum_of(momentum, nbt),
                act,
            )
        else:
            nb = _numba()
            fmt = memory_format(x)
            xv, axis = _as_numpy(x, fmt)
            rv_, _ = _as_numpy(residual, fmt)
            y, yv = _output(x, fmt)
            if training:
                mean_np, var_np = nb.moments(xv, axis, threads=_threads())
                mean, var = torch.from_numpy(mean_np), torch.from_numpy(var_np)
                inv_std = torch.from_numpy(F.inv_std_of(var_np, eps, np.float64))
                if running_mean is not None:
                    engine.update_running(
                        running_mean, running_var, nbt, mean, var, count_per_channel(x), momentum
                    )
            else:
                mean, inv_std = _given_stats(running_mean, running_var, eps)
            bits = torch.empty(
                (x.numel() + 7) // 8 if act == "relu" else 0, dtype=torch.uint8
            )  # 1 bit per element
            nb.add_act_forward(
                xv,
                mean.numpy(),
                inv_std.numpy(),
                _vec(weight),
                _vec(bias),
                rv_,
                axis,
                out=yv,
                bits=bits.numpy(),
                threads=_threads(),
                act=act,
            )
            if act != "relu":
                bits = None
        _setup(ctx, x, weight, bias, mean, inv_std, eps)
        ctx.bits = bits
        ctx.residual_dtype = residual.dtype
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 12
        x, weight, bias, mean, inv_std = ctx.saved_tensors
        bits = ctx.bits
        if graph_wanted(dy):  # differentiable: the mask is a constant of the gradient
            g = dy if bits is None else torch.where(unpack_mask(bits, x), dy, dy.new_zeros(()))
            dx, dgamma, dbeta = reference.grads(
                g, x, weight, bias, ctx.eps, ctx.training, mean, inv_std
            )
            dr = g
        elif bits is None:  # identity: the residual's gradient is dy itself
            dx, dgamma, dbeta = ENGINES[ctx.engine].backward(
                dy, x, mean, inv_std, weight, ctx.training
            )
            dr = dy
        elif ctx.engine == "triton":
            dx, dr, dgamma, dbeta = _triton().backward(
                dy, x, mean, inv_std, weight, ctx.training, bits=bits
            )
        else:
            xv, dyv, axis, dx, dxv = _grad_views(dy, x)
            dr, drv = _output(x, memory_format(x))
            _, _, dg, db = _numba().add_act_backward(
                dyv,
                xv,
                bits.numpy(),
                _own(mean),
                _own(inv_std),
                _vec(weight),
                axis,
                ctx.training,
                out=dxv,
                out_residual=drv,
                threads=_threads(),
                act="relu",
            )
            dgamma, dbeta = torch.from_numpy(dg), torch.from_numpy(db)
        dweight = None if ctx.weight_dtype is None else dgamma.to(ctx.weight_dtype)
        dbias = None if ctx.bias_dtype is None else dbeta.to(ctx.bias_dtype)
        return (dx, dr.to(ctx.residual_dtype), dweight, dbias) + (None,) * 8
