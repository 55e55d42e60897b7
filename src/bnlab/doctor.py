"""The BN doctor's rules, once, for bnlab models and torch models alike.

:func:`bnlab.torch.doctor` and :func:`bnlab.nn.doctor` describe each BN layer of a model as
a :class:`Layer` (NumPy arrays, no framework) and hand the descriptions to
:func:`static_findings`. Each rule returns :class:`Finding` s with a code (each has its
section in docs/doctor.md), the layer's qualified name, a one-line message, the evidence as numbers
and the fix.

Static rules (parameters, buffers and flags only):

* ``nonfinite-stats`` (error): NaN/inf in the running statistics or in gamma/beta.
* ``keras-momentum`` (warning): momentum >= 0.5 in PyTorch's convention, where the new
  batch gets weight ``momentum``: Keras's ``momentum=0.99`` copied over makes the running
  statistics follow the last batch.
* ``bias-before-bn`` (info): a Conv/Linear with a bias feeds the BN directly; BN subtracts
  the mean, so the bias is cancelled (a wasted parameter).
* ``dead-channel`` (warning): |gamma| <= ``DEAD_GAMMA`` or running_var <= ``DEAD_VAR``.
* ``cold-stats`` (warning): fewer batches tracked than it takes the running averages to
  forget their initial values (0 and 1) down to 5%: ``(1 - momentum)^n > 0.05``.
* ``mixed-mode`` (warning): a BN layer in train mode inside a model in eval mode, or the
  reverse.
* ``frozen-train`` (warning): gamma and beta do not require grad (meant frozen) but the
  layer is in train mode, so it still normalizes with, and updates from, batch statistics.

Dynamic rules (with batches run through copies of the model; :func:`dynamic_findings` reads
a :class:`Probe` per layer and the model's outputs with running, batch and recalibrated
statistics):

* ``small-batch`` (warning): fewer than ``SMALL_BATCH`` values per channel reach the layer
  in training: its batch statistics are noisy.
* ``stale-stats`` (warning): the layer's running statistics are far from the exact ones
  over the batches (recalibrated): the mean off by more than ``STALE_SHIFT`` standard
  deviations, or the variance off by more than a factor ``STALE_RATIO``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SEVERITIES = ("error", "warning", "info")
DEAD_GAMMA = 1e-6
DEAD_VAR = 1e-8
FORGOTTEN = 0.05  # the initial values' weight below which the running averages are warm
SMALL_BATCH = 32  # values per channel
STALE_SHIFT = 0.5  # standard deviations
STALE_RATIO = 2.0


@dataclass
class Finding:
    """One problem found: ``code`` (the contract's), ``layer`` (the BN layer's qualified name
    as in ``named_modules()``), ``severity`` ("error", "warning", "info"), a one-line
    ``message``, ``evidence`` (numbers) and the ``fix``."""

    code: str
    layer: str
    severity: str
    message: str
    evidence: dict = field(default_factory=dict)
    fix: str = ""


@dataclass
class Layer:
    """What the rules read of one BN layer (framework-free)."""

    name: str
    num_features: int
    momentum: float | None
    training: bool
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    num_batches_tracked: int | None = None
    params_trainable: bool = True
    bias_before: str | None = None  # the Conv/Linear with a bias that feeds it, if known


def biases_before(model, sequential: type[Any], bn: type, weighted: tuple) -> dict:
    """BN qualified name -> the layer (of ``weighted`` types, with a bias) right before it
    in a ``sequential`` container: bnlab and torch models alike (``named_modules()``,
    ``_modules``)."""
    found = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, sequential):
            continue
        pre = f"{prefix}." if prefix else ""
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            prev, cur = seq._modules[a], seq._modules[b]
            if isinstance(cur, bn) and isinstance(prev, weighted) and prev.bias is not None:
                found[pre + b] = pre + a
    return found


def warm_batches(momentum: float | None) -> float:
    """Batches after which the running averages' initial values weigh less than 5%."""
    if momentum is None:  # the cumulative average: the initial values are gone at once
        return 1
    if momentum >= 1:
        return 1
    if momentum <= 0:
        return math.inf
    return math.ceil(math.log(FORGOTTEN) / math.log(1.0 - momentum))


def static_findings(layers, model_training: bool) -> list[Finding]:
    """Every static rule (module docstring) on every layer, in the layers' order."""
    out = []
    for layer in layers:
        for rule in RULES:
            finding = rule(layer, model_training)
            if finding is not None:
                out.append(finding)
    return out


def _nonfinite(layer: Layer, model_training: bool):
    bad = {
        name: int((~np.isfinite(v)).sum())
        for name, v in (
            ("running_mean", layer.running_mean),
            ("running_var", layer.running_var),
            ("weight", layer.weight),
            ("bias", layer.bias),
        )
        if v is not None and not np.isfinite(v).all()
    }
    if not bad:
        return None
    return Finding(
        "nonfinite-stats",
        layer.name,
        "error",
        f"NaN/inf in {', '.join(bad)}: evaluation outputs will be NaN",
        {f"nonfinite_{k}": v for k, v in bad.items()},
        "recalibrate the running statistics (bnlab recalibrate) from clean batches, "
        "and find the overflowing step (mixed precision: a gradient scaler)",
    )


def _keras_momentum(layer: Layer, model_training: bool):
    if layer.momentum is None or layer.momentum < 0.5:
        return None
    return Finding(
        "keras-momentum",
        layer.name,
        "warning",
        f"momentum {layer.momentum:g}: the running statistics follow the last "
        f"batch (Keras's 0.99 is PyTorch's 0.01)",
        {"momentum": layer.momentum},
        f"use momentum {1 - layer.momentum:g} (PyTorch's convention)",
    )


def _bias_before(layer: Layer, model_training: bool):
    if layer.bias_before is None:
        return None
    return Finding(
        "bias-before-bn",
        layer.name,
        "info",
        f"{layer.bias_before} has a bias that this BN cancels (it subtracts the mean)",
        {},
        f"create {layer.bias_before} with bias=False",
    )


def _dead(layer: Layer, model_training: bool):
    dead = np.zeros(layer.num_features, bool)
    if layer.weight is not None:
        dead |= np.abs(layer.weight) <= DEAD_GAMMA
    if layer.running_var is not None:
        dead |= layer.running_var <= DEAD_VAR
    if not dead.any():
        return None
    channels = np.flatnonzero(dead)
    return Finding(
        "dead-channel",
        layer.name,
        "warning",
        f"{len(channels)} of {layer.num_features} channels are dead (gamma or "
        f"running variance ~0): {channels[:8].tolist()}",
        {"dead_channels": len(channels), "first": int(channels[0])},
        "check the initialization and weight decay on gamma; prune the channels",
    )


def _cold(layer: Layer, model_training: bool):
    if layer.num_batches_tracked is None or layer.running_mean is None:
        return None
    need = warm_batches(layer.momentum)
    if layer.num_batches_tracked >= need:
        return None
    return Finding(
        "cold-stats",
        layer.name,
        "warning",
        f"{layer.num_batches_tracked} batches tracked; momentum "
        f"{layer.momentum} needs {need} before the running statistics forget "
        f"their initial values",
        {"num_batches_tracked": layer.num_batches_tracked, "needed": need},
        "train longer, or recalibrate (bnlab recalibrate) on a few hundred batches",
    )


def _mixed(layer: Layer, model_training: bool):
    if layer.training == model_training:
        return None
    return Finding(
        "mixed-mode",
        layer.name,
        "warning",
        f"this BN is in {'train' if layer.training else 'eval'} mode inside a model "
        f"in {'train' if model_training else 'eval'} mode",
        {"layer_training": int(layer.training), "model_training": int(model_training)},
        "call model.eval() / model.train() after changing submodules' modes, or set "
        "the mode deliberately and document it",
    )


def _frozen_train(layer: Layer, model_training: bool):
    if layer.weight is None or layer.params_trainable or not layer.training:
        return None
    return Finding(
        "frozen-train",
        layer.name,
        "warning",
        "gamma and beta do not learn, but the layer is in train mode: it still "
        "normalizes with and updates from batch statistics",
        {},
        "put the layer in eval mode (or use FrozenBatchNorm2d / bnlab freeze)",
    )


RULES = (_nonfinite, _keras_momentum, _bias_before, _dead, _cold, _mixed, _frozen_train)


def small_batch_finding(name: str, values_per_channel: int):
    if values_per_channel >= SMALL_BATCH:
        return None
    return Finding(
        "small-batch",
        name,
        "warning",
        f"{values_per_channel} values per channel reach this BN in training "
        f"(fewer than {SMALL_BATCH}): its batch statistics are noisy",
        {"values_per_channel": values_per_channel},
        "use larger batches, GhostBatchNorm/BatchRenorm, SyncBatchNorm across "
        "processes, or freeze the layer (FrozenBatchNorm2d) when fine-tuning",
    )


def stale_finding(
    name: str, running_mean, running_var, exact_mean, exact_var, eps: float, model_evidence: dict
):
    """Compare a layer's running statistics with the exact ones over the batches."""
    std = np.sqrt(np.asarray(exact_var, np.float64) + eps)
    shift = float(np.max(np.abs(np.asarray(running_mean) - exact_mean) / std))
    ratio = float(
        np.max(
            np.maximum(
                (running_var + eps) / (exact_var + eps), (exact_var + eps) / (running_var + eps)
            )
        )
    )
    if shift <= STALE_SHIFT and ratio <= STALE_RATIO:
        return None
    return Finding(
        "stale-stats",
        name,
        "warning",
        f"running statistics far from the batches' (mean off by {shift:.2f} "
        f"standard deviations, variance by a factor {ratio:.2f}): evaluation "
        f"outputs differ from training's",
        {"mean_shift_std": shift, "var_ratio": ratio, **model_evidence},
        "recalibrate the running statistics on representative batches "
        "(bnlab recalibrate / torch.optim.swa_utils.update_bn)",
    )


@dataclass
class Probe:
    """What the dynamic rules read of one BN layer once the batches went through copies of
    the model: the fewest values per channel it saw in training, its running statistics and
    the exact ones over the batches (after recalibration)."""

    name: str
    training: bool
    eps: float
    values_per_channel: int
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    exact_mean: np.ndarray | None = None
    exact_var: np.ndarray | None = None


def score(logits, targets) -> dict:
    """Mean cross-entropy and accuracy of a list of (N, K) logits against their labels."""
    z = np.concatenate([np.asarray(a, np.float64) for a in logits])
    t = np.concatenate([np.asarray(y).reshape(-1) for y in targets]).astype(np.int64)
    if len(t) != len(z):
        raise ValueError(f"targets hold {len(t)} labels for {len(z)} outputs")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return {
        "loss": float(-log_p[np.arange(len(t)), t].mean()),
        "accuracy": float((z.argmax(axis=1) == t).mean()),
    }


OUTPUTS = ("running", "batch", "recalibrated")  # the statistics the model's outputs used


def dynamic_findings(probes, outputs: dict, targets=None) -> list[Finding]:
    """``small-batch`` (layers in training) and ``stale-stats`` (layers with running
    statistics) for each :class:`Probe`. ``outputs`` maps each of :data:`OUTPUTS` to the
    model's (N, K) outputs over the batches; with ``targets``, their losses and accuracies
    are the evidence, and always the largest change recalibration makes to an output."""
    evidence = {}
    if targets is not None:
        for key in OUTPUTS:
            for k, v in score(outputs[key], targets).items():
                evidence[f"{k}_{key}_stats"] = v
    evidence["output_change_recalibrated"] = float(
        max(
            np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
            for a, b in zip(outputs["running"], outputs["recalibrated"])
        )
    )
    findings = []
    for p in probes:
        f = small_batch_finding(p.name, p.values_per_channel) if p.training else None
        if f is not None:
            findings.append(f)
        if p.running_mean is not None:
            f = stale_finding(
                p.name, p.running_mean, p.running_var, p.exact_mean, p.exact_var, p.eps, evidence
            )
            if f is not None:
                findings.append(f)
    return findings


def probe_batches(
    model, probe, batches, targets, seen: dict, *, is_bn, run, recalibrate, array
) -> list[Finding]:
    """The dynamic checks' bookkeeping, for bnlab and torch models alike: ``probe`` (a
    train-mode copy whose BN layers record into ``seen`` the fewest values per channel they
    get; the copy's running statistics change, the model's do not) and copies of ``model`` with its running statistics (eval) and
    recalibrated on the batches run ``batches``; then :func:`dynamic_findings`. ``run(model,
    batches)`` gives the outputs as arrays, ``array`` makes a buffer an array (or None)."""
    outputs = {"batch": run(probe, batches), "running": run(copy.deepcopy(model).eval(), batches)}
    recal = recalibrate(copy.deepcopy(model), batches).eval()
    outputs["recalibrated"] = run(recal, batches)
    exact = dict(recal.named_modules())
    probes = [
        Probe(
            name,
            m.training,
            m.eps,
            seen.get(name, 0),
            array(m.running_mean),
            array(m.running_var),
            array(exact[name].running_mean),
            array(exact[name].running_var),
        )
        for name, m in model.named_modules()
        if is_bn(m)
    ]
    return dynamic_findings(probes, outputs, targets)


def examine(describe, dynamic, model, batches=None, targets=None) -> list[Finding]:
    """Static findings of ``describe(model)``, then with ``batches`` the dynamic ones of
    ``dynamic(model, batches, targets)``: a framework's ``doctor``.

    ``cold-stats`` guesses from ``num_batches_tracked`` that the running statistics may still
    hold their initial values; with batches, a layer's statistics are measured instead, so
    the guess stays only where they are also stale (after ``recalibrate`` over 4 batches,
    say, the count is 4 but the statistics are exact)."""
    findings = static_findings(describe(model), model.training)
    if batches is not None:
        dynamic_found = dynamic(model, batches, targets)
        stale = {f.layer for f in dynamic_found if f.code == "stale-stats"}
        findings = [f for f in findings if f.code != "cold-stats" or f.layer in stale]
        findings += dynamic_found
    return findings
