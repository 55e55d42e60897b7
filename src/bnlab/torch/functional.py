"""``batch_norm`` for torch tensors: torch's semantics, bnlab's engines.

Which engine runs is decided by :mod:`bnlab.torch.engine` (its rules and table), for this
function and every module alike; this module runs the chosen one:

* ``numba`` / ``triton``: bnlab's kernels through the custom ops and autograd Functions of
  :mod:`bnlab.torch._ops`;
* ``reference``: the definition in torch operations (:mod:`bnlab.torch.reference`);
* ``native``: ``torch.nn.functional.batch_norm`` with bnlab's guard (:func:`guarded_native`).

Gradients: first and second order on every engine (the kernels' backward gives way to the
differentiable closed form when a graph of the gradient is asked for); ``torch.func``
transforms and forward-mode AD run the reference engine (under ``backend="auto"``).

One deliberate difference from torch, on every engine: a training batch whose statistics
are not finite (NaN/inf in the input: a mixed-precision overflow step) gives NaN output as
torch does, so a gradient scaler still skips the step, but leaves ``running_mean``,
``running_var`` (and a module's ``num_batches_tracked``) unchanged. In torch they become NaN
and the model is ruined for evaluation.
"""

from __future__ import annotations

import torch

from . import _ops, engine, reference
from .engine import BACKENDS, verify_batch_size

__all__ = ["BACKENDS", "batch_norm"]


def kernel_batch_norm(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked=None,
    name: str = "numba",
):
    """The kernels' path (the engine layer chose ``name``); semantics of :func:`batch_norm`.

    ``num_batches_tracked`` (a module's buffer) is incremented with each update; with it,
    ``momentum=None`` means the cumulative average ``1 / num_batches_tracked`` (without it,
    momentum is a number: :func:`batch_norm` and the modules see to that).
    """
    impl = _ops.ENGINES[name]
    traced = torch.compiler.is_compiling()  # custom ops for the tracer, else no dispatcher
    if not training:
        args = (x, running_mean, running_var, weight, bias, eps)
        if traced:
            return impl.ops.eval(*args)[0]
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)
        ):
            return _ops.EvalFunction.apply(*args, impl)[0]
        return impl.eval(*args)[0]
    count = _ops.count_per_channel(x)
    if not traced:
        return _ops.TrainFunction.apply(
            x,
            weight,
            bias,
            eps,
            running_mean,
            running_var,
            num_batches_tracked,
            count,
            momentum,
            impl,
        )[0]
    y, mean, var, _ = impl.ops.train(x, weight, bias, eps)
    if running_mean is not None:
        impl.ops.update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    return y


def reference_batch_norm(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked=None,
    mask=None,
):
    """The reference engine: :func:`bnlab.torch.reference.forward` (autograd differentiates
    it), the running statistics updated from its statistics (with ``mask``, the unmasked
    count)."""
    y, mean, var, count = reference.forward(
        x, weight, bias, eps, training, running_mean, running_var, mask
    )
    if training and running_mean is not None:
        engine.update_running(
            running_mean, running_var, num_batches_tracked, mean, var, count, momentum
        )
    return y


def guarded_native(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked=None,
):
    """torch's own ``batch_norm`` with bnlab's guard: in training, on CPU buffers torch
    updates the running statistics in place and :func:`bnlab.torch.engine.guard_in_place`
    puts the old values back if they are not finite (else counts the batch in
    ``num_batches_tracked``); elsewhere (CUDA, half buffers) torch updates copies, which
    :func:`bnlab.torch.engine.commit` puts in place only if finite, deciding on the device
    with no host sync."""
    momentum = engine.momentum_of(momentum, num_batches_tracked)
    if engine.transformed() and training and num_batches_tracked is not None:
        # as torch's module: counted first (a grad transform refuses the in-place add, a
        # vmap the kernel's update of unbatched buffers: torch's own errors)
        num_batches_tracked.add_(1)
    if not training or (running_mean is None and running_var is None) or engine.transformed():
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps
        )
    views = engine.held_views((running_mean, running_var))
    if views is not None:
        return engine.guard_in_place(
            views,
            num_batches_tracked,
            lambda: torch.nn.functional.batch_norm(
                x, running_mean, running_var, weight, bias, True, momentum, eps
            ),
        )
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    y = torch.nn.functional.batch_norm(x, new_mean, new_var, weight, bias, True, momentum, eps)
    engine.commit(((running_mean, new_mean), (running_var, new_var)), num_batches_tracked)
    return y


def run(
    name: str,
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked=None,
    mask=None,
):
    """Run the call on engine ``name`` (:func:`bnlab.torch.engine.select`'s choice). In
    training, batch statistics (over ``mask``'s True positions if given) normalize x and
    update the running buffers if given; otherwise the running statistics normalize it."""
    if training:
        verify_batch_size(x)
    if name == "native":
        return guarded_native(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked,
        )
    if name == "reference":
        return reference_batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked,
            mask,
        )
    return kernel_batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked,
        name,
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
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
        backend: "auto" (default), "numba", "triton", "reference" or "native"
            (:mod:`bnlab.torch.engine`).

    Returns:
        y with the input's shape, dtype and memory format (channels-last in, channels-last out).

    Example:
        >>> x = torch.randn(8, 3, 4, 4, requires_grad=True)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, training=True)
        >>> y.sum().backward()
    """
    engine.check_eps(eps, training)
    if training and momentum is None and running_mean is not None:
        raise TypeError(
            "momentum=None (a cumulative average) needs a module's "
            "num_batches_tracked; pass a number to the functional form"
        )
    name = engine.select(
        backend,
        input,
        (running_mean, running_var, weight, bias),
        update=training and running_mean is not None,
        training=training,
    )
    return run(name, input, running_mean, running_var, weight, bias, training, momentum, eps)
