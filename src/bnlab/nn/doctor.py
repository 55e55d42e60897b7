"""``bnlab.nn.doctor``: the BN doctor for bnlab models (rules: :mod:`bnlab.doctor`), the
same checks as :func:`bnlab.torch.doctor`."""

from __future__ import annotations

import copy

import numpy as np

from .. import doctor as D
from .batchnorm import _BatchNorm
from .layers import Conv2d, Linear, Sequential
from .module import Module
from .variants import recalibrate


def _f64(a):
    return None if a is None else np.array(a, np.float64)


def describe(model: Module) -> list[D.Layer]:
    """Every BN layer of ``model`` as :class:`bnlab.doctor.Layer` (copies; nothing changes).
    bnlab's parameters have no ``requires_grad``: they always learn (a frozen layer is a
    :class:`~bnlab.nn.FrozenBatchNorm2d`, which is not a BN layer the rules read)."""
    before = D.biases_before(model, Sequential, _BatchNorm, (Conv2d, Linear))
    return [
        D.Layer(
            name=name,
            num_features=m.num_features,
            momentum=m.momentum,
            training=m.training,
            weight=None if m.weight is None else _f64(m.weight.data),
            bias=None if m.bias is None else _f64(m.bias.data),
            running_mean=_f64(m.running_mean),
            running_var=_f64(m.running_var),
            num_batches_tracked=m.num_batches_tracked,
            bias_before=before.get(name),
        )
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    ]


def _outputs(model, batches):
    return [np.array(model(x), np.float64) for x in batches]


def dynamic_findings(model: Module, batches, targets=None) -> list[D.Finding]:
    """``small-batch`` and ``stale-stats`` (:func:`bnlab.doctor.dynamic_findings`), from
    ``batches`` (arrays) run through copies of the model: with its running statistics
    (eval), with batch statistics (train mode, no update) and recalibrated on the batches.
    The model itself is not touched."""
    batches = [np.asarray(b) for b in batches]
    if not batches:
        raise ValueError("batches is empty: the dynamic checks need at least one batch")
    seen: dict[str, list] = {}
    probe = copy.deepcopy(model).train()
    for name, m in probe.named_modules():
        if isinstance(m, _BatchNorm):

            def record(x, _forward=m.forward, _name=name, **kwargs):
                per_channel = x.size // max(x.shape[1], 1)
                seen[_name] = min(seen.get(_name, per_channel), per_channel)
                return _forward(x, **kwargs)

            object.__setattr__(m, "forward", record)  # on the copy only
    return D.probe_batches(
        model,
        probe,
        batches,
        targets,
        seen,
        is_bn=lambda m: isinstance(m, _BatchNorm),
        run=_outputs,
        recalibrate=recalibrate,
        array=_f64,
    )


def doctor(model: Module, batches=None, targets=None) -> list[D.Finding]:
    """The BN doctor on a bnlab model (rules: :mod:`bnlab.doctor`): the static checks on
    parameters, buffers and modes, and with ``batches`` (arrays, e.g. a few validation
    batches; ``targets`` their labels) the dynamic ones. The model is not changed:
    parameters, buffers, modes and momenta stay as they are (copies are probed)."""
    return D.examine(describe, dynamic_findings, model, batches, targets)
