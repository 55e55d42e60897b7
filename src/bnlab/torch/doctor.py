"""``bnlab.torch.doctor``: the BN doctor for torch models (rules: :mod:`bnlab.doctor`)."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import doctor as D

_WEIGHTED = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def biases_before(model: torch.nn.Module) -> dict:
    """BN qualified name -> the Conv/Linear with a bias whose output feeds only that BN.

    Through ``torch.fx`` (residual blocks and any traceable forward); a model fx cannot
    trace falls back to neighbours in Sequentials (:func:`bnlab.doctor.biases_before`)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow, ...)
        return D.biases_before(model, torch.nn.Sequential, _TorchBatchNorm, _WEIGHTED)
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _TorchBatchNorm):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), _WEIGHTED)
            and modules[src.target].bias is not None
            and len(src.users) == 1
        ):
            found[node.target] = src.target
    return found


def describe(model: torch.nn.Module) -> list[D.Layer]:
    """Every BN layer of ``model`` as :class:`bnlab.doctor.Layer` (copies; nothing changes)."""
    before = biases_before(model)
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, _TorchBatchNorm):
            continue
        nbt = m.num_batches_tracked
        params = [p for p in (m.weight, m.bias) if p is not None]
        layers.append(
            D.Layer(
                name=name,
                num_features=m.num_features,
                momentum=m.momentum,
                training=m.training,
                weight=_np(m.weight),
                bias=_np(m.bias),
                running_mean=_np(m.running_mean),
                running_var=_np(m.running_var),
                num_batches_tracked=None if nbt is None else int(nbt),
                params_trainable=any(p.requires_grad for p in params) or not params,
                bias_before=before.get(name),
            )
        )
    return layers


def _outputs(model, batches):
    with torch.no_grad():
        return [_np(model(x)) for x in batches]


def dynamic_findings(model: torch.nn.Module, batches, targets=None) -> list[D.Finding]:
    """``small-batch`` and ``stale-stats`` (:func:`bnlab.doctor.dynamic_findings`), from
    ``batches`` run through copies of the model: with its running statistics (eval), with
    batch statistics (train mode, no update) and recalibrated on the batches. The model
    itself is not touched."""
    import copy

    from .variants import recalibrate

    batches = [torch.as_tensor(b) for b in batches]
    if not batches:
        raise ValueError("batches is empty: the dynamic checks need at least one batch")
    seen: dict[str, list] = {}
    probe = copy.deepcopy(model).train()

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            seen[name] = min(seen.get(name, x.numel()), x.numel() // max(x.shape[1], 1))

        return record

    for n, m in probe.named_modules():
        if isinstance(m, _TorchBatchNorm):
            m.register_forward_hook(hook(n))
    return D.probe_batches(
        model,
        probe,
        batches,
        targets,
        seen,
        is_bn=lambda m: isinstance(m, _TorchBatchNorm),
        run=_outputs,
        recalibrate=recalibrate,
        array=_np,
    )


def doctor(model: torch.nn.Module, batches=None, targets=None) -> list[D.Finding]:
    """The BN doctor on a torch model (rules: :mod:`bnlab.doctor`): the static checks on
    parameters, buffers and modes, and with ``batches`` (tensors, e.g. a few validation
    batches; ``targets`` their labels) the dynamic ones. The model is not changed:
    parameters, buffers, modes and momenta stay as they are (copies are probed)."""
    return D.examine(describe, dynamic_findings, model, batches, targets)
