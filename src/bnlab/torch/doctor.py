"""``bnlab.torch.doctor``: the BN doctor for torch models (rules: :mod:`bnlab.doctor`)."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import doctor as D

_WEIGHTED = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def describe(model: torch.nn.Module) -> list[D.Layer]:
    """Every BN layer of ``model`` as :class:`bnlab.doctor.Layer` (copies; nothing changes)."""
    before = D.biases_before(model, torch.nn.Sequential, _TorchBatchNorm, _WEIGHTED)
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


def _outputs(model, batches):
    with torch.no_grad():
        return [model(x) for x in batches]


def _score(outputs, targets) -> dict:
    logits = torch.cat(outputs)
    t = torch.cat([torch.as_tensor(y).long() for y in targets])
    return {"loss": float(torch.nn.functional.cross_entropy(logits.float(), t)),
            "accuracy": float((logits.argmax(1) == t).float().mean())}


def dynamic_findings(model: torch.nn.Module, batches, targets=None) -> list[D.Finding]:
    """``small-batch`` and ``stale-stats`` (:mod:`bnlab.doctor`), from ``batches`` run
    through copies of the model: with its running statistics (eval), with batch statistics
    (train mode) and recalibrated on the batches; with ``targets``, their losses and
    accuracies are the evidence. The model itself is not touched."""
    import copy

    from .variants import recalibrate

    batches = [torch.as_tensor(b) for b in batches]
    if not batches:
        raise ValueError("batches is empty: the dynamic checks need at least one batch")
    seen = {}
    probe = copy.deepcopy(model).train()

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            seen[name] = min(seen.get(name, x.numel()), x.numel() // max(x.shape[1], 1))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in probe.named_modules()
               if isinstance(m, _TorchBatchNorm)]
    for m in probe.modules():  # measure only: no running-statistics update
        if isinstance(m, _TorchBatchNorm):
            m.momentum = 0.0
    train_out = _outputs(probe, batches)
    for h in handles:
        h.remove()
    eval_model = copy.deepcopy(model).eval()
    eval_out = _outputs(eval_model, batches)
    recal = recalibrate(copy.deepcopy(model), batches).eval()
    recal_out = _outputs(recal, batches)
    evidence = {}
    if targets is not None:
        for key, outs in (("running", eval_out), ("batch", train_out), ("recalibrated", recal_out)):
            for k, v in _score(outs, targets).items():
                evidence[f"{k}_{key}_stats"] = v
    evidence["output_change_recalibrated"] = float(
        max((a - b).abs().max() for a, b in zip(eval_out, recal_out)))
    findings = []
    exact = dict(recal.named_modules())
    for name, m in model.named_modules():
        if not isinstance(m, _TorchBatchNorm):
            continue
        f = D.small_batch_finding(name, seen.get(name, 0))
        if f is not None and m.training:
            findings.append(f)
        if m.running_mean is not None:
            r = exact[name]
            f = D.stale_finding(name, _np(m.running_mean), _np(m.running_var),
                                _np(r.running_mean), _np(r.running_var), m.eps, evidence)
            if f is not None:
                findings.append(f)
    return findings


def doctor(model: torch.nn.Module, batches=None, targets=None) -> list[D.Finding]:
    """The BN doctor on a torch model (rules: :mod:`bnlab.doctor`): the static checks on
    parameters, buffers and modes, and with ``batches`` (tensors, e.g. a few validation
    batches; ``targets`` their labels) the dynamic ones. The model is not changed:
    parameters, buffers, modes and momenta stay as they are (copies are probed)."""
    findings = D.static_findings(describe(model), model.training)
    if batches is not None:
        findings += dynamic_findings(model, batches, targets)
    return findings
