"""Which engine runs a bnlab.torch call, and the running-statistics bookkeeping: both once.

Every module and function of :mod:`bnlab.torch` (BatchNorm1d/2d/3d, SyncBatchNorm, the
variants, ``mask=``, :func:`bnlab.torch.batch_norm`) asks :func:`select` which engine runs
it, and updates its running statistics through :func:`update_running`.

Engines:

* ``numba``: bnlab's CPU kernels (:mod:`bnlab.kernels.numba_bn`), zero-copy on contiguous
  and channels-last memory.
* ``triton``: bnlab's GPU kernels (:mod:`bnlab.kernels.triton_bn`); CPU tensors too when
  Triton runs in its interpreter (``TRITON_INTERPRET=1``), which is how the tests run them.
* ``reference``: the definition in torch operations (:mod:`bnlab.torch.reference`), any
  device and dtype, differentiable to any order: ``mask=``, ``torch.func`` transforms and
  forward-mode AD.
* ``native``: ``torch.nn.functional.batch_norm``, with bnlab's bookkeeping around it
  (NaN-guarded running statistics, :func:`bnlab.torch.functional.guarded_native`).

The rules are :data:`RULES`, in the order ``backend="auto"`` tries them; the docs' table
is :func:`table`. A forced backend (``"numba"``, ``"triton"``, ``"reference"``,
``"native"``) runs its engine or raises a TypeError/ValueError (an ImportError for a missing
package) that names what it does not take; it never hands the call elsewhere.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import math
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as _fwad

from .. import kernels
from . import measured as _measured
from .layout import memory_format

BACKENDS = ("auto", "numba", "triton", "reference", "native")

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float32, torch.float64, *_HALF)


@dataclass(frozen=True)
class Rule:
    """What one engine takes. ``devices``: where ``auto`` picks it ("cpu", "cuda");
    ``dtypes``: x's dtypes; ``param_dtypes``: "x" (weight, bias and running statistics of
    x's dtype), "x or float32" (also float32: half activations with float32 parameters, as
    autocast makes them) or "any"; ``package``: what must import; ``transforms``: runs under
    ``torch.func`` transforms and forward-mode AD; ``mask``: takes ``mask=``."""

    engine: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    param_dtypes: str
    package: str | None
    transforms: bool
    mask: bool
    note: str
    measured: bool = False  # auto picks it only where measured faster than torch's kernel


RULES = (
    Rule(
        "triton",
        ("cuda",),
        (torch.float32, *_HALF),
        "x or float32",
        "triton",
        False,
        False,
        "statistics in float32 by Welford/Chan merges",
        measured=True,
    ),
    Rule(
        "numba",
        ("cpu",),
        (torch.float32, torch.float64),
        "x",
        "numba",
        False,
        False,
        "statistics accumulated in float64",
        measured=True,
    ),
    Rule(
        "reference",
        ("cpu", "cuda"),
        _FLOAT,
        "any",
        None,
        True,
        True,
        "two-pass statistics in float64 (float64 input) or float32",
    ),
    Rule(
        "native",
        ("cpu", "cuda"),
        _FLOAT,
        "any",
        None,
        True,
        False,
        "torch's kernel; bnlab's NaN guard and checks around it",
    ),
)
RULE = {r.engine: r for r in RULES}


def table() -> str:
    """The rules as a Markdown table (docs/performance.md shows it)."""
    rows = [
        "| engine | auto picks it for | dtypes | parameters | masks | torch.func | statistics |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    name = {
        torch.float32: "float32",
        torch.float64: "float64",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
    }
    for r in RULES:
        where = " where measured faster than torch's kernel" if r.measured else ""
        rows.append(
            f"| `{r.engine}` | {' and '.join(r.devices)} tensors{where} | "
            f"{', '.join(name[d] for d in r.dtypes)} | {r.param_dtypes} | "
            f"{'yes' if r.mask else 'no'} | {'yes' if r.transforms else 'no'} | "
            f"{r.note} |"
        )
    return "\n".join(rows)


# --- what is installed ------------------------------------------------------------------------


_triton: list = []  # bnlab.kernels.triton_bn, or the ImportError, once loaded


def triton_module():
    """:mod:`bnlab.kernels.triton_bn` (the Triton kernels, on torch tensors), or the
    ImportError that stopped it; loaded once."""
    if not _triton:
        try:
            from ..kernels import triton_bn
        except ImportError as e:  # triton (or torch) missing: bnlab.torch uses torch's path
            _triton.append(e)
        else:
            _triton.append(triton_bn)
    return _triton[0]


def resolve_triton():
    """:mod:`bnlab.kernels.triton_bn`, or the ImportError that says why Triton is missing.
    Triton decides when that module is first imported whether its kernels compile for the
    GPU or run in its interpreter (``TRITON_INTERPRET=1``, for CPU tensors)."""
    mod = triton_module()
    if isinstance(mod, ImportError):
        raise ImportError(
            f"the Triton kernels need triton, which failed to import: {mod}; pip install triton"
        ) from mod
    return mod


def available(engine: str) -> bool:
    """The engine's package imports."""
    package = RULE[engine].package
    if package is None:
        return True
    mod = kernels.numba_module() if package == "numba" else triton_module()
    return not isinstance(mod, ImportError)


def _require(engine: str) -> None:
    """The ImportError that says why a forced engine's package is missing."""
    if RULE[engine].package == "numba":
        kernels.resolve("numba")
    else:
        resolve_triton()


# --- checks torch makes -----------------------------------------------------------------------


def check_eps(eps: float, training: bool) -> None:
    """torch's check and message: eps > 0 in training, eps >= 0 in evaluation."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def verify_batch_size(x: torch.Tensor) -> None:
    """torch's check and message: training needs more than one value per channel."""
    size = x.shape
    m = size[0]
    for n in size[2:]:
        m *= n
    if m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def transformed() -> bool:
    """Inside a ``torch.func`` transform (vmap, grad, jacrev, jvp) or a forward-mode AD
    dual level: only engines written in torch operations can run."""
    return torch._C._are_functorch_transforms_active() or _fwad._current_level >= 0


# --- the choice -------------------------------------------------------------------------------


def _on(rule: Rule, x: torch.Tensor, forced: bool) -> bool:
    """x is on a device of the rule's (forced Triton: also CPU tensors in its interpreter)."""
    if x.device.type in rule.devices:
        return True
    return (
        forced
        and rule.engine == "triton"
        and x.device.type == "cpu"
        and kernels.triton_interpreted()
    )


def _names(dtypes) -> str:
    """ "float32, float16 or bfloat16"."""
    names = [str(d).removeprefix("torch.") for d in dict.fromkeys(dtypes)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _refusal(rule: Rule, x: torch.Tensor, params, forced: bool) -> str | None:
    """Why ``rule``'s engine does not take this call (None: it does)."""
    if not _on(rule, x, forced):
        where = (
            "CUDA tensors (CPU ones with TRITON_INTERPRET=1)"
            if rule.engine == "triton"
            else f"{' and '.join(rule.devices)} tensors"
        )
        return f"runs on {where}, got a tensor on {x.device}"
    if x.dtype not in rule.dtypes:
        return f"takes {_names(rule.dtypes)} input, got {_names([x.dtype])}"
    if rule.param_dtypes == "any":
        return None
    dtypes = (x.dtype,) if rule.param_dtypes == "x" else (x.dtype, torch.float32)
    C, device = x.shape[1], x.device
    for name, t in zip(("running_mean", "running_var", "weight", "bias"), params):
        if t is None:
            continue
        if t.shape != (C,) or t.dtype not in dtypes or t.device != device:
            return (
                f"takes {name} as a ({C},) {_names(dtypes)} tensor on {device} for "
                f"input of {C} channels, got {tuple(t.shape)} {_names([t.dtype])} on "
                f"{t.device}"
            )
    return None


def layout_kind(x: torch.Tensor) -> str:
    """How the kernels see ``x``, as the measurements are keyed: "channels_first"
    (contiguous memory with a spatial size > 1: NCHW, NCDHW, (N, C, L)), "channels_last"
    (channels-last memory with a spatial size > 1) or "features" (no spatial extent: (N, C),
    and (N, C, 1...) in either memory)."""
    spatial = x.numel() // max(1, x.shape[0] * x.shape[1])
    if x.dim() < 3 or spatial == 1:
        return "features"
    return "channels_first" if memory_format(x) == torch.contiguous_format else "channels_last"


AUTO_MODES = ("measured", "kernels")


def weighs() -> bool:
    """Whether ``auto`` weighs bnlab's kernels against torch's by the measurements: the
    environment variable ``BNLAB_AUTO``, "measured" (the default: bnlab's kernels only where
    measured faster, :func:`faster_than_torch`) or "kernels" (bnlab's kernels wherever they
    take the input, whatever the speed: float64-accumulated statistics on every CPU call, or
    one engine for every batch size)."""
    mode = os.environ.get("BNLAB_AUTO", "measured")
    if mode not in AUTO_MODES:
        raise ValueError(f"BNLAB_AUTO must be one of {AUTO_MODES}, got {mode!r}")
    return mode == "measured"


def faster_than_torch(engine: str, training: bool, x: torch.Tensor) -> bool:
    """``engine``'s kernels were measured faster than torch's kernel for inputs like x
    (:data:`bnlab.torch.measured.MEASURED`: a committed GPU bench run for "triton", a
    committed CPU run for "numba"): among the measurements of x's mode (training step or
    inference), layout (:func:`layout_kind`) and dtype, the nearest one at x's size or
    below is a win (bnlab's time under :data:`WIN_BELOW` of torch's), and so is the nearest
    one at or above it (if any). Between a loss and a
    win, below the smallest measurement, and for anything not measured, torch's kernel:
    ``auto`` never runs a kernel measured slower than torch's, and runs torch's where
    nothing is known."""
    kind = (engine, "train" if training else "infer", layout_kind(x), _DTYPE_NAMES.get(x.dtype))
    sizes, wins = _measurements().get(kind, ((), ()))
    n = x.numel()
    i = bisect.bisect_right(sizes, n)  # sizes[:i] <= n
    if i == 0 or not wins[i - 1]:
        return False  # nothing measured at or below n, or the nearest there is a loss
    if sizes[i - 1] == n:
        return True
    return i == len(sizes) or wins[i]  # the nearest above n, if any, must be a win too


WIN_BELOW = {"triton": 1.0, "numba": 0.9}
"""A measured ratio (bnlab's time / torch's) counts as bnlab's win only below this, per
engine. On CPU a single run's ratio of minima moves by up to about 10% (the control of
``bnlab bench``, torch against itself: 0.93-1.10 on training steps in
docs/bench/run-11..13.json), so numba must have been measured at least 10% faster; the
GPU's timings are steadier."""

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_index: list = [None, {}]  # [the MEASURED object indexed, {kind: (sizes, wins)}]


def _measurements() -> dict:
    """:data:`bnlab.torch.measured.MEASURED` indexed by (engine, mode, layout, dtype):
    sorted sizes and whether bnlab won at each (a ratio under :data:`WIN_BELOW`); rebuilt
    when the table object changes."""
    table_now = _measured.MEASURED
    if _index[0] is not table_now:
        rows: dict = {}
        for engine, table in table_now.items():
            for mode, layout, dtype, n, ratio in table:
                win = ratio < WIN_BELOW[engine]
                rows.setdefault((engine, mode, layout, dtype), []).append((n, win))
        _index[1] = {k: tuple(zip(*sorted(v))) for k, v in rows.items()}
        _index[0] = table_now
    return _index[1]


def select(
    backend: str,
    x: torch.Tensor,
    params=(None, None, None, None),
    *,
    mask: torch.Tensor | None = None,
    update: bool = False,
    training: bool = True,
    measured: bool = True,
) -> str:
    """The engine for a call on ``x`` with ``params`` = (running_mean, running_var, weight,
    bias) as they are passed (None where not used); ``update``: the call updates running
    statistics; ``training``: batch statistics (for :func:`faster_than_torch`); ``measured``:
    False where only bnlab's kernels can run the call (SyncBatchNorm's collectives), so
    ``auto`` does not weigh them against torch's kernel.

    ``auto``: the reference with ``mask`` or under transforms (there, torch's kernel if
    running statistics are updated: a transform cannot mutate buffers, and torch raises
    its own error for it); else the first rule of
    :data:`RULES` that takes the input, whose package imports and that was measured faster
    than torch's kernel for such input on its device (:func:`faster_than_torch`; not weighed
    with ``BNLAB_AUTO=kernels``, :func:`weighs`); torch's
    kernel for anything else (so the error for an input torch rejects is torch's own). A forced
    backend returns itself or raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "native" and x.dim() >= 2:
        channels = x.shape[1:2]
        for t in params:
            if t is not None and t.shape != channels:
                _torch_rejects(x, params)  # torch's error for (C,) vectors of another size
    special = (
        "mask="
        if mask is not None
        else "torch.func transforms or forward-mode AD"
        if transformed()
        else None
    )
    if backend == "auto":
        if special:
            return "native" if update and mask is None else "reference"
        if x.dim() < 2 or x.numel() == 0:
            return "native"
        device = x.device.type
        for rule in RULES[:2]:
            if device not in rule.devices:
                continue
            if (
                rule.measured
                and measured
                and weighs()
                and not faster_than_torch(rule.engine, training, x)
            ):
                continue  # torch's kernel is faster here (weighed first: it is the cheaper test)
            if _refusal(rule, x, params, False) is None:
                if available(rule.engine):
                    return rule.engine
                _warn_missing(rule.engine)
        return "native"
    rule = RULE[backend]
    if special and not (rule.mask if mask is not None else rule.transforms):
        raise ValueError(
            f'backend="{backend}" cannot run {special}: its kernels are not '
            'torch operations; use backend="auto" or "reference"'
        )
    if backend in ("reference", "native"):
        return backend
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(
            f'backend="{backend}" takes (N, C, ...) input with at least one '
            f"element, got shape {tuple(x.shape)}"
        )
    why = _refusal(rule, x, params, True)
    if why is not None:
        _torch_rejects(x, params)  # torch's own error for what torch rejects too
        kind = ValueError if why.startswith("runs on") else TypeError
        raise kind(f'backend="{backend}" {why}')
    _require(backend)
    return backend


def _torch_rejects(x: torch.Tensor, params) -> None:
    """Raise torch's own error if torch's batch norm rejects these shapes (checked on meta
    tensors: nothing is computed and nothing is handed to torch's kernel)."""
    rm, rv, w, b = (None if t is None else t.to("meta") for t in params)
    torch.batch_norm(x.to("meta"), w, b, rm, rv, rm is None, 0.1, 1e-5, False)


def _warn_missing(engine: str) -> None:
    if engine == "numba":
        kernels.warn_once("numba", kernels.missing_numba_message())


# --- NumPy views of torch memory ------------------------------------------------------------

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A NumPy array over a C-contiguous float32/float64 CPU tensor's memory (for the numba
    kernels and the running-statistics update).

    Not ``t.numpy()``: that marks the tensor's storage as not resizable for good, so a
    user's input, parameter (FSDP frees them with ``resize_(0)``), buffer or output would
    lose ``resize_``."""
    return _array_over(t, owner=True)


def _array_over(t: torch.Tensor, owner: bool) -> np.ndarray:
    """An ndarray over t's memory; with ``owner``, its base keeps ``t`` alive."""
    buf = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    if owner:
        buf.owner = t  # type: ignore[attr-defined]  # the array's base, buf, keeps t alive
    return np.ndarray(t.shape, _NUMPY[t.dtype], buf)  # type: ignore[arg-type]  # a buffer


_HELD: dict[int, tuple] = {}  # id(t) -> (weakref to t, data_ptr, shape, stride, dtype, view)


def held_view(t: torch.Tensor) -> np.ndarray | None:
    """:func:`numpy_view` of a long-lived tensor (a parameter or running buffer), made once
    and handed out again while ``t`` keeps the same memory (address, shape, strides,
    dtype: a parameter moved by ``.data =`` or ``.to()`` gets a new view); None where
    ``t`` is not a contiguous float32/float64 CPU tensor. Saves building the view on every
    step.

    The view does not keep ``t`` alive (the entry goes with ``t``): use it only while
    holding ``t``, as the callers do within one call."""
    key = id(t)
    hit = _HELD.get(key)
    ptr = t.data_ptr()
    if (
        hit is not None
        and hit[0]() is t
        and hit[1] == ptr
        and hit[2] == t.shape
        and hit[3] == t.stride()
        and hit[4] is t.dtype
        and t.is_cpu
    ):
        return hit[5]
    if not _plain(t):
        return None
    view = _array_over(t, owner=False)
    gone = weakref.ref(t, functools.partial(_forget, key))
    _HELD[key] = (gone, ptr, t.shape, t.stride(), t.dtype, view)
    return view


def _forget(key: int, _gone) -> None:
    """A held tensor died: its view goes too."""
    _HELD.pop(key, None)


def held_views(buffers) -> list[np.ndarray] | None:
    """:func:`held_view` of each buffer given (None entries skipped), or None if any is not
    a contiguous float32/float64 CPU tensor."""
    views = []
    for b in buffers:
        if b is not None:
            v = held_view(b)
            if v is None:
                return None
            views.append(v)
    return views


_ZEROS: dict[tuple[int, np.dtype], np.ndarray] = {}


def all_finite(arrays) -> bool:
    """Every value of every NumPy array is finite: one dot product with zeros each (0 for
    finite values whatever their size, NaN if any is NaN or infinite; infinity times zero
    is the invalid operation this asks about, so NumPy is told not to warn of it), cheaper
    on the small (C,) vectors of a training step than ``np.isfinite(a).all()``."""
    total = 0.0
    with np.errstate(invalid="ignore"):
        for a in arrays:
            a = a if a.ndim == 1 else a.reshape(-1)
            zeros = _ZEROS.get((a.size, a.dtype))
            if zeros is None:
                zeros = _ZEROS.setdefault((a.size, a.dtype), np.zeros(a.size, a.dtype))
            total += float(a.dot(zeros))
    return math.isfinite(total)


# --- the running-statistics bookkeeping (every path) -----------------------------------------


def momentum_of(momentum: float | None, num_batches_tracked: torch.Tensor | None) -> float:
    """The weight of this batch: ``momentum``, or with ``momentum=None`` the cumulative
    average ``1 / (num_batches_tracked + 1)`` (torch's modules; the count read on the host),
    or 0.0 without a count (torch's value)."""
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        return 0.0
    return 1.0 / (float(num_batches_tracked) + 1.0)


def update_running(
    running_mean,
    running_var,
    num_batches_tracked,
    mean,
    var,
    count,
    momentum: float | None,
    extra=(),
) -> None:
    """In place, for every path and module: ``running = (1 - w) * running + w * batch``
    with w = :func:`momentum_of`, the batch's unbiased ``var * count / (count - 1)`` into
    ``running_var``, ``num_batches_tracked += 1``, and each ``(buffer, value, w)`` of
    ``extra`` (batch renormalization's averages) likewise, all under one guard: if the
    batch's mean, var or any extra value is not finite, no buffer changes.

    ``mean``/``var``: (C,) batch mean and biased var of any float dtype and device;
    ``count``: values per channel (int or 0-d tensor). Any buffer may be None.
    """
    w = momentum_of(momentum, num_batches_tracked)
    buffers = (running_mean, running_var, *(b for b, _, _ in extra))
    if all(b is None or b.device.type == "cpu" for b in buffers):
        # decided on the host: NumPy on the small (C,) vectors, no torch op per step
        unbias = float(count) / (float(count) - 1.0)
        terms = [
            (b, _host(v), ww, wv)
            for b, v, ww, wv in (
                (running_mean, mean, w, w),
                (running_var, var, w, w * unbias),
                *((b, v, ww, ww) for b, v, ww in extra),
            )
            if b is not None
        ]
        if all_finite([v for _, v, _, _ in terms]):
            for b, v, ww, wv in terms:
                a = held_view(b)
                if a is not None:
                    a *= 1.0 - ww
                    a += wv * v
                else:
                    with torch.no_grad():
                        b.mul_(1.0 - ww).add_(torch.from_numpy(v), alpha=wv)
            if num_batches_tracked is not None:
                with torch.no_grad():
                    num_batches_tracked.add_(1)
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        commit(
            [
                (b, b * (1.0 - ww) + v.detach().to(b.device, b.dtype) * ww)
                for b, v, ww in ((running_mean, mean, w), (running_var, unbiased, w), *extra)
                if b is not None
            ],
            num_batches_tracked,
        )


def guard_in_place(views, num_batches_tracked, update):
    """The guard of :func:`commit` around an update made in place by someone else (torch's
    kernel updates the running statistics itself): ``update()`` runs, and if any of the
    buffers seen through ``views`` (:func:`held_views`) is then not finite, each gets back
    the values it had before (written through NumPy, so no version counter moves: in
    training torch's backward reads the batch statistics it saved, never these buffers),
    else ``num_batches_tracked`` counts one more. Returns ``update()``'s result. Cheaper
    than copies for :func:`commit`: two small NumPy copies and one check, no torch op but
    the count."""
    saved = [v.copy() for v in views]
    out = update()
    if all_finite(views):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # an integer buffer: nothing for autograd to record
    else:
        for v, s in zip(views, saved):
            v[...] = s
    return out


def _plain(b) -> bool:
    """A contiguous float32/float64 CPU buffer (NumPy updates it in place)."""
    return b is not None and b.device.type == "cpu" and b.dtype in _NUMPY and b.is_contiguous()


def _finite(t: torch.Tensor) -> bool:
    """Every value of bnlab's own CPU tensor ``t`` is finite (NumPy on float32/float64: a
    few microseconds less than a torch op, once per training step)."""
    t = t.detach()
    if t.dtype in _NUMPY:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _host(v: torch.Tensor) -> np.ndarray:
    """A (C,) batch statistic (bnlab's own tensor, never a user's) as a float64 NumPy
    array, a view where it already is one."""
    v = v.detach()
    if v.dtype != torch.float64 or v.device.type != "cpu":
        v = v.to("cpu", torch.float64)
    return v.numpy()


def commit(pairs, num_batches_tracked=None) -> None:
    """The guard, once for every path: each ``(buffer, new)`` of ``pairs`` is copied in
    place and ``num_batches_tracked`` counts one more, if every ``new`` is finite; else
    nothing changes. Decided on the device (no host sync on CUDA); None entries are
    skipped."""
    pairs = [(b, n) for b, n in pairs if b is not None]
    with torch.no_grad():
        if all(b.device.type == "cpu" for b, _ in pairs):
            if all(_finite(n) for _, n in pairs):
                for b, n in pairs:
                    b.copy_(n)
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
            return
        ok = torch.stack([torch.isfinite(n).all() for _, n in pairs]).all()
        for b, n in pairs:
            b.copy_(torch.where(ok, n, b))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
