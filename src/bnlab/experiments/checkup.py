"""``bnlab doctor FILE``: the BN doctor on a checkpoint file.

Two kinds of file:

* bnlab's ``.npz`` checkpoints (:func:`bnlab.train.save_checkpoint`), read without pickle;
* PyTorch state dicts (``.pt``/``.pth``), read with ``torch.load(weights_only=True)``: a
  file that holds pickled Python objects other than tensors and plain containers is
  refused, and nothing in it runs. A state dict may also sit under a ``"state_dict"`` or
  ``"model"`` key, as training scripts often save it.

A state dict alone has no topology, modes or momenta, so only some rules apply: BN layers
are recognized by their ``running_mean``/``running_var`` keys, and ``nonfinite-stats``,
``dead-channel`` and ``cold-stats`` (with the frameworks' default momentum, 0.1) run on
them. With ``--model seed-cnn|paper-mlp`` the network is built for ``--data`` and the
state dict loaded into it (bnlab's model for ``.npz``, its torch twin for ``.pt``), which
adds ``bias-before-bn`` and, with batches of the data's test split, ``small-batch`` and
``stale-stats``. What was skipped, and why, is part of the result.
"""

from __future__ import annotations

import pickle
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import doctor as D
from ..train import CheckpointError, read_checkpoint

MODELS = ("seed-cnn", "paper-mlp")
ASSUMED_MOMENTUM = 0.1  # torch's and bnlab's default; a state dict does not hold it
NOT_IN_FILES = {  # rules that read what no state dict holds
    "keras-momentum": "momentum is not stored in a state dict",
    "mixed-mode": "train/eval modes are not stored in a state dict",
    "frozen-train": "requires_grad and modes are not stored in a state dict",
}
NEEDS_MODEL = {"bias-before-bn": "needs the network's topology: give --model"}
NEEDS_DATA = {
    "small-batch": "needs batches: give --model and --data",
    "stale-stats": "needs batches: give --model and --data",
}


def read_state(path) -> tuple[str, dict, dict]:
    """("bnlab" or "torch", the state dict as float64/int NumPy arrays, metadata)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".npz":
        state, _, meta = read_checkpoint(path)
        return "bnlab", state, meta
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(
            f"{path}: expected a bnlab checkpoint (.npz) or a PyTorch state dict "
            f"(.pt/.pth), got a {path.suffix or 'suffix-less'} file"
        )
    return "torch", _torch_state(path), {}


def _torch_state(path: Path) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install 'bnlab[torch]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            what = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
            raise CheckpointError(
                f"refused {path}: it holds pickled Python objects that are not tensors or "
                f"plain containers, and loading them could run code"
                + (f" ({what[0]})" if what else "")
                + "; nothing in it was run. bnlab reads "
                "state dicts with torch.load(weights_only=True) only: save "
                "model.state_dict() instead"
            ) from e
        raise CheckpointError(f"{path} is damaged or not a PyTorch file ({e})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path} is damaged or not a PyTorch file "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, expected a state dict (a dict of tensors)"
        )
    state = {
        k: v.detach().numpy()
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }
    if not state:
        raise CheckpointError(f"{path} holds no tensors: expected a state dict")
    return state


def file_layers(state: dict) -> list[D.Layer]:
    """The BN layers of a state dict (prefixes with running_mean and running_var)."""
    layers = []
    for key in state:
        if not key.endswith("running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        if prefix + "running_var" not in state:
            continue

        def get(name, prefix=prefix):
            v = state.get(prefix + name)
            return None if v is None else np.array(v, np.float64)

        rm = get("running_mean")
        nbt = state.get(prefix + "num_batches_tracked")
        layers.append(
            D.Layer(
                name=prefix.rstrip("."),
                num_features=len(rm),
                momentum=ASSUMED_MOMENTUM,
                training=False,
                weight=get("weight"),
                bias=get("bias"),
                running_mean=rm,
                running_var=get("running_var"),
                num_batches_tracked=None if nbt is None else int(np.asarray(nbt)),
            )
        )
    return layers


def _build(kind: str, name: str, state: dict, meta: dict, data):
    """The ``name`` network for ``data`` (bnlab's, or its torch twin), with ``state``
    loaded, in evaluation mode."""
    from .. import models

    C, S, _ = data.image_shape
    config = meta.get("config", {})
    net: Any
    if name == "seed-cnn":
        net = models.seed_cnn(in_channels=C, image_size=S, num_classes=data.num_classes)
    else:
        net = models.paper_mlp(
            activation=config.get("activation", "sigmoid"),
            in_features=C * S * S,
            num_classes=data.num_classes,
        )
    if kind == "torch":
        import torch

        from ..torch.models import twin

        net = twin(net)
        try:
            net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        except RuntimeError as e:
            raise CheckpointError(
                f"the state dict does not fit --model {name} for "
                f"--data {data.name}: {' '.join(str(e).split())[:400]}"
            ) from e
    else:
        try:
            net.load_state_dict(state)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"the checkpoint does not fit --model {name} for --data {data.name}: {e}"
            ) from e
    return net.eval()


def check(
    path,
    model: str | None = None,
    data: str | None = None,
    batches: int = 4,
    batch_size: int = 250,
) -> dict:
    """The doctor's report on a checkpoint file: ``findings`` (:class:`bnlab.doctor.Finding`),
    ``skipped`` {code: why}, ``assumptions`` and what was read."""
    kind, state, meta = read_state(path)
    report: dict[str, Any] = {
        "file": str(path),
        "format": kind,
        "model": model,
        "data": None,
        "assumptions": [],
        "skipped": dict(NOT_IN_FILES),
    }
    if model is not None and model not in MODELS:
        raise ValueError(f"--model must be one of {MODELS}, got {model!r}")
    if model is None and data is not None:
        raise ValueError("--data needs --model (the network to run the batches through)")
    layers = file_layers(state)
    report["layers"] = [layer.name for layer in layers]
    if model is not None and kind == "bnlab":
        nonfinite = sorted(
            k
            for k, v in state.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()
        )
        if nonfinite:  # bnlab's models refuse NaN/inf on loading: report what the file shows
            report["skipped"].update(
                {
                    code: f"bnlab models do not load NaN/inf ({nonfinite[0]}): fix that first"
                    for code in (*NEEDS_MODEL, *NEEDS_DATA)
                }
            )
            model = report["model"] = None
    if model is None:
        report["assumptions"].append(
            f"cold-stats assumes momentum {ASSUMED_MOMENTUM} (the default of torch and bnlab)"
        )
        for code, why in {**NEEDS_MODEL, **NEEDS_DATA}.items():
            report["skipped"].setdefault(code, why)
        report["findings"] = D.static_findings(layers, model_training=False)
    else:
        from ..data import datasets

        name = data or meta.get("config", {}).get("dataset") or "mnist-5k"
        ds = datasets.load(name)
        report["data"] = name
        net = _build(kind, model, state, meta, ds)
        images, labels = ds.test
        n = min(len(images), batches * batch_size)
        xs: list[Any] = [images[i : i + batch_size] for i in range(0, n, batch_size)]
        ys = [labels[i : i + batch_size] for i in range(0, n, batch_size)]
        if kind == "torch":
            import torch

            from ..torch import doctor as torch_doctor

            xs = [torch.from_numpy(x) for x in xs]
            doctor: Callable[..., list] = torch_doctor
        else:
            from ..nn import doctor as nn_doctor

            doctor = nn_doctor
        report["batches"] = [len(x) for x in xs]
        report["assumptions"].append(
            f"{model} built for {name} with its default momentum, in evaluation mode"
        )
        report["findings"] = doctor(net, xs, ys)
    return report


def to_json(report: dict) -> dict:
    return {**report, "findings": [asdict(f) for f in report["findings"]]}


def _evidence(e: dict) -> list[str]:
    return [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()]


def format_table(report: dict, width: int | None = None) -> str:
    """The findings as a terminal table (severity, layer, code, message, evidence, fix),
    errors first, then what was skipped and assumed."""
    width = width or max(110, shutil.get_terminal_size((130, 24)).columns)
    findings = sorted(report["findings"], key=lambda f: D.SEVERITIES.index(f.severity))
    head = ("severity", "layer", "code", "message", "evidence", "fix")
    rows = [
        (f.severity, f.layer or "(model)", f.code, f.message, _evidence(f.evidence), f.fix)
        for f in findings
    ]
    fixed = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    evidence = max([len("evidence")] + [len(item) for r in rows for item in r[4]])
    fixed.append(min(evidence, 36))
    rest = max(40, width - sum(fixed) - 5 * 2)
    widths = fixed[:3] + [rest // 2, fixed[3], rest - rest // 2]
    lines = [
        f"bnlab doctor: {report['file']} ({report['format']} checkpoint, "
        f"{len(report['layers'])} BN layers"
        + (
            f"; {report['model']} on {report['data']}, batches {report['batches']}"
            if report["model"]
            else ""
        )
        + ")"
    ]

    def cell(value, w):
        items = value if isinstance(value, list) else [value]
        return [line for item in items for line in (textwrap.wrap(item, w) or [""])]

    def emit(cells):
        wrapped = [cell(c, w) for c, w in zip(cells, widths)]
        for i in range(max(map(len, wrapped))):
            lines.append(
                "  ".join(
                    (col[i] if i < len(col) else "").ljust(w) for col, w in zip(wrapped, widths)
                ).rstrip()
            )

    if rows:
        emit(head)
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            emit(r)
    else:
        lines.append("no findings")
    counts = {s: sum(f.severity == s for f in findings) for s in D.SEVERITIES}
    lines.append(", ".join(f"{n} {s}" + ("s" if n != 1 else "") for s, n in counts.items()))
    for code, why in report["skipped"].items():
        lines.append(f"skipped {code}: {why}")
    for a in report["assumptions"]:
        lines.append(f"assumed: {a}")
    return "\n".join(lines)
