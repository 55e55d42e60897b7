"""``batch_norm`` for torch tensors: torch's semantics, bnlab's kernels, one dispatch.

Which path runs (``backend="auto"``):

* **bnlab's numba kernels** (:mod:`bnlab.kernels.numba_bn`, through the custom ops in
  :mod:`bnlab.torch._ops`): CPU tensors of dtype float32 or float64 with at least one
  element, whose weight, bias and running statistics are (C,) tensors of the same dtype,
  when numba imports. Contiguous and channels-last memory are read in place (zero-copy);
  other strides are copied to contiguous memory first.
* **bnlab's Triton kernels** (:mod:`bnlab.kernels.triton_bn`, through the same autograd
  formulas and their own custom ops): CUDA tensors of dtype float32, float16 or bfloat16
  with at least one element, whose weight, bias and running statistics are (C,) tensors of
  x's dtype or float32 (half-precision activations with float32 parameters, as autocast
  makes them), when Triton imports. Statistics are float32; outputs keep x's dtype.
* **torch's own path** (``torch.nn.functional.batch_norm``) for everything else: other
  devices, float64 on CUDA, float16/bfloat16 on CPU, empty tensors, mixed dtypes, and any
  input torch would reject, so the error is torch's own.

``backend="numba"`` and ``backend="triton"`` insist on their kernels (a TypeError/ValueError
for an input they do not take; "triton" also runs on CPU tensors in Triton's interpreter,
``TRITON_INTERPRET=1``, which is how the tests check it); ``backend="native"`` is torch's
function exactly, for comparison.

Gradients: first order (autograd, gradcheck). Second derivatives are not implemented and
say so (a RuntimeError), rather than coming out silently wrong.

One deliberate difference from torch, on every path of ``"auto"``/``"numba"``/``"triton"``:
a training batch whose statistics are not finite (NaN/inf in the input: a mixed-precision
overflow step) gives NaN output as torch does, so a gradient scaler still skips the step, but leaves
``running_mean``, ``running_var`` (and a module's ``num_batches_tracked``) unchanged. In
torch they become NaN and the model is ruined for evaluation.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.torch_layout import TRITON_DTYPES
from . import _ops

BACKENDS = ("auto", "numba", "triton", "native")


def _numba_available() -> bool:
    return not isinstance(kernels._numba_module(), ImportError)


def _triton_available() -> bool:
    return not isinstance(kernels._triton_module(), ImportError)


def _verify_batch_size(x: torch.Tensor) -> None:
    """torch's check and message: training needs more than one value per channel."""
    size = x.shape
    m = size[0]
    for n in size[2:]:
        m *= n
    if m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


def _triton_takes(x: torch.Tensor) -> bool:
    """A device and dtype the Triton kernels run on."""
    on_device = x.device.type == "cuda" or (x.device.type == "cpu"
                                            and kernels.triton_interpreted())
    return on_device and x.dtype in TRITON_DTYPES


def _params_fit(engine: str, x: torch.Tensor, params) -> bool:
    """weight, bias and running statistics are (C,) on x's device, of x's dtype (numba) or of
    x's dtype or float32 (Triton: half-precision activations with float32 parameters)."""
    dtypes = (x.dtype,) if engine == "numba" else (x.dtype, torch.float32)
    C = x.shape[1]
    return all(t is None or (t.shape == (C,) and t.dtype in dtypes and t.device == x.device)
               for t in params)


def kernel_engine(backend: str, x: torch.Tensor, running_mean, running_var, weight, bias,
                  training: bool) -> str | None:
    """Which of bnlab's kernels run this call: "numba", "triton", or None for torch's own
    path (module docstring).

    Inputs torch would reject (wrong rank, wrong channel count, mismatched dtypes) go to
    torch's path, so the error is torch's own. A forced backend that cannot take the input
    (device, dtype, missing package) is a clear error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native":
        return None
    if (running_mean is None) != (running_var is None) or (running_mean is None and not training):
        return None  # torch's path (and its error for eval without statistics)
    if x.dim() < 2 or x.numel() == 0:
        return None
    params = (running_mean, running_var, weight, bias)
    if backend == "triton":
        kernels.resolve_triton().check_device(x)  # or the ImportError saying why Triton is missing
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f'backend="triton" takes float32, float16 or bfloat16 tensors, '
                            f'got {x.dtype}')
        return "triton" if _params_fit("triton", x, params) else None
    if backend == "auto" and x.device.type == "cuda":
        if _triton_takes(x) and _triton_available() and _params_fit("triton", x, params):
            return "triton"
        return None
    if not _params_fit("numba", x, params):
        return None
    if x.device.type == "cpu" and x.dtype in _ops.DTYPES and _numba_available():
        return "numba"
    if backend == "numba":
        if x.device.type != "cpu":
            raise ValueError(f'backend="numba" runs on CPU tensors, got a tensor on {x.device}')
        if x.dtype not in _ops.DTYPES:
            raise TypeError(f'backend="numba" takes float32 or float64 tensors, got {x.dtype}')
        kernels.resolve("numba")  # raises the ImportError that says why numba is missing
    return None


def kernel_batch_norm(x, running_mean, running_var, weight, bias, training: bool,
                      momentum: float | None, eps: float, num_batches_tracked=None,
                      engine: str = "numba"):
    """The kernels' path (``kernel_engine`` chose ``engine``); semantics of :func:`batch_norm`.

    ``num_batches_tracked`` (a module's buffer) is incremented with each update; with it,
    ``momentum=None`` means the cumulative average ``1 / num_batches_tracked`` (without it,
    momentum is a number: :func:`batch_norm` and the modules see to that).
    """
    impl = _ops.ENGINES[engine]
    traced = torch.compiler.is_compiling()  # custom ops for the tracer, else no dispatcher
    if not training:
        args = (x, running_mean, running_var, weight, bias, eps)
        if traced:
            return impl.ops.eval(*args)[0]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias)):
            return _ops.EvalFunction.apply(*args, impl)[0]
        return impl.eval(*args)[0]
    _verify_batch_size(x)
    if running_mean is not None and num_batches_tracked is None:
        # the functional form: momentum is a number; counted, then dropped
        num_batches_tracked = torch.zeros((), dtype=torch.long, device=x.device)
    count = _ops.count_per_channel(x)
    if not traced:
        return _ops.TrainFunction.apply(x, weight, bias, eps, running_mean, running_var,
                                        num_batches_tracked, count, momentum, impl)[0]
    y, mean, var, _ = impl.ops.train(x, weight, bias, eps)
    if running_mean is not None:
        impl.ops.update(running_mean, running_var, num_batches_tracked, mean, var, count,
                        momentum)
    return y


def guarded_native(x, running_mean, running_var, weight, bias, training: bool,
                   momentum: float | None, eps: float, num_batches_tracked=None):
    """torch's own ``batch_norm`` with bnlab's guard: in training, torch updates copies of
    the running statistics, which replace the buffers (and count in ``num_batches_tracked``)
    only if they are finite. (Restoring the buffers afterwards instead would change tensors
    that torch's backward saved.) ``momentum=None`` (only with ``num_batches_tracked``):
    the cumulative average, as torch's modules compute it."""
    if not training or (running_mean is None and running_var is None):
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                              training, momentum or 0.0, eps)
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked + 1)
    buffers = [b for b in (running_mean, running_var) if b is not None]
    new = [b.clone() for b in buffers]
    new_mean = new[0] if running_mean is not None else None
    new_var = new[-1] if running_var is not None else None
    y = torch.nn.functional.batch_norm(x, new_mean, new_var, weight, bias, True, momentum, eps)
    with torch.no_grad():
        ok = torch.stack([torch.isfinite(b).all() for b in new]).all()
        for b, n in zip(buffers, new):
            b.copy_(torch.where(ok, n, b))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, backend="auto"):
    """``torch.nn.functional.batch_norm`` with bnlab's kernels (module docstring: which path).

        y = (x - mean) / sqrt(var + eps) * weight + bias

    In training, mean and (biased) var are the batch's, over every dimension except 1, and
    ``running_mean``/``running_var`` (if given) are updated in place with the batch mean and
    the *unbiased* variance: ``running = (1 - momentum) * running + momentum * batch``. In
    evaluation the running statistics are used. Conventions: :mod:`bnlab.functional`.

    Args:
        input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), any memory format.
        running_mean, running_var: (C,) tensors, or None (training only).
        weight, bias: (C,) gamma and beta, or None. Differentiable, as is ``input``.
        training: use batch statistics; default False.
        momentum: weight of the new batch; default 0.1 (Keras's 0.99 is 0.01 here).
        eps: default 1e-5.
        backend: "auto" (default), "numba", "triton" or "native".

    Returns:
        y with the input's shape, dtype and memory format (channels-last in, channels-last out).

    Example:
        >>> x = torch.randn(8, 3, 4, 4, requires_grad=True)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, training=True)
        >>> y.sum().backward()
    """
    if backend == "native":
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps)
    engine = kernel_engine(backend, input, running_mean, running_var, weight, bias, training)
    if training and momentum is None and running_mean is not None:
        raise TypeError("momentum=None (a cumulative average) needs a module's "
                        "num_batches_tracked; pass a number to the functional form")
    if engine is None:
        return guarded_native(input, running_mean, running_var, weight, bias, training,
                              momentum, eps)
    return kernel_batch_norm(input, running_mean, running_var, weight, bias, training,
                             momentum, eps, engine=engine)
