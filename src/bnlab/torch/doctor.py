"""``bnlab.torch.doctor``: the BN doctor for torch models (rules: :mod:`bnlab.doctor`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import doctor as D

_WEIGHTED = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _biases_before(model: torch.nn.Module) -> dict:
    """BN qualified name -> the Conv/Linear (with a bias) right before it in a Sequential."""
    found = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            prev, cur = seq._modules[a], seq._modules[b]
            if isinstance(cur, _TorchBatchNorm) and isinstance(prev, _WEIGHTED) and \
                    prev.bias is not None:
                pre = f"{prefix}." if prefix else ""
                found[pre + b] = pre + a
    return found


def describe(model: torch.nn.Module) -> list[D.Layer]:
    """Every BN layer of ``model`` as :class:`bnlab.doctor.Layer` (copies; nothing changes)."""
    before = _biases_before(model)
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, _TorchBatchNorm):
            continue
        nbt = m.num_batches_tracked
        params = [p for p in (m.weight, m.bias) if p is not None]
        layers.append(D.Layer(
            name=name, num_features=m.num_features, momentum=m.momentum, training=m.training,
            weight=_np(m.weight), bias=_np(m.bias), running_mean=_np(m.running_mean),
            running_var=_np(m.running_var), num_batches_tracked=None if nbt is None else int(nbt),
            params_trainable=any(p.requires_grad for p in params) or not params,
            bias_before=before.get(name)))
    return layers


def doctor(model: torch.nn.Module, batches=None, targets=None) -> list[D.Finding]:
    """The BN doctor's static checks (:mod:`bnlab.doctor`) on a torch model: parameters,
    buffers and modes only; the model is not changed. The dynamic checks (``batches``:
    ``stale-stats``, ``small-batch``) are not implemented yet and say so."""
    if batches is not None or targets is not None:
        raise NotImplementedError("doctor's dynamic checks (batches=, targets=) are not "
                                  "implemented yet; call doctor(model) for the static ones")
    return D.static_findings(describe(model), model.training)
