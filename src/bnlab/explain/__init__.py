"""``bnlab explain``: the lesson's four steps as one self-contained interactive page.

The page is built from real data: a mini-batch of the embedded digits passed through the
first convolution of the seed CNN. For each batch size (:data:`SIZES`, nested: the first B
digits of one shuffled draw) and channel, bnlab computes the batch statistics
(:func:`bnlab.functional.batch_norm_forward`), the z-score (:func:`bnlab.functional.standardize`)
and min-max scaling (:func:`bnlab.functional.minmax_scale`); the running statistics come from a
:class:`bnlab.nn.BatchNorm2d` trained (momentum 0.1) on other batches of the same digits.

Every step of BN is affine in the input, ``step_k(x) = a_k x + b_k``:

    1. x                    a = 1,               b = 0
    2. x - mu               a = 1,               b = -mu
    3. (x - mu) / s         a = 1/s,             b = -mu/s          s = sqrt(var + eps)
    4. gamma (x - mu)/s + beta   a = gamma/s,     b = beta - gamma mu/s

so the page moves the input's histogram (counts over :data:`BINS` bins) and its statistics
(mean, variance, min, max) through these maps as the reader changes gamma, beta, eps, the
batch size, the channel or train/eval (mu, var: the batch's in training, the running ones in
evaluation), with no values recomputed in the browser. Charts are Chart.js (MIT, vendored
in ``vendor/``), inlined with the data, the script and the style into one HTML file that
works from ``file://`` with no network.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np

SIZES = (2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes offered (nested draws)
DEFAULT_SIZE = 32
DEFAULT_CHANNEL = 0
BINS = 40
EPS = 1e-5
RUNNING_BATCHES = 58  # batches of 64 that train the running statistics
HERE = Path(__file__).resolve().parent


def _stats(v: np.ndarray) -> dict:
    return {
        "mean": float(v.mean(dtype=np.float64)),
        "var": float(v.var(dtype=np.float64)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _network(net, image_shape) -> list[dict]:
    """The seed CNN's layers with their output shapes (an evaluation pass of one digit)."""
    x = np.zeros((1, *image_shape), np.float32)
    layers = [{"name": "input", "kind": "Input", "shape": list(image_shape), "bn": False}]
    net.eval()
    for name, layer in net._modules.items():
        x = layer(x)
        kind = type(layer).__name__
        layers.append(
            {"name": name, "kind": kind, "shape": list(x.shape[1:]), "bn": "BatchNorm" in kind}
        )
    return layers


def page_data(seed: int = 0) -> dict:
    """Everything the page shows, computed by bnlab (module docstring)."""
    from .. import functional as F
    from .. import models
    from ..data import datasets
    from ..nn import BatchNorm2d

    data = datasets.load("mnist-5k")
    images = data.train[0]  # (4000, 1, 28, 28)
    order = np.random.default_rng(seed).permutation(len(images))
    net = models.seed_cnn(seed=seed)
    conv = net[0]
    x = conv(images[order[: max(SIZES)]])  # (256, 8, 28, 28)
    C = x.shape[1]
    bn = BatchNorm2d(C)  # running statistics
    rest = order[max(SIZES) :]
    for i in range(RUNNING_BATCHES):
        bn(conv(images[rest[i * 64 : (i + 1) * 64]]))
    batches = {}
    for B in SIZES:
        xb = x[:B]
        ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
        _, cache = F.batch_norm_forward(xb, ones, zeros, eps=EPS, axis=1)
        z = F.standardize(xb, axis=(0, 2, 3))
        mm = F.minmax_scale(xb, axis=(0, 2, 3))
        rows = []
        for c in range(C):
            v = xb[:, c].ravel()
            counts, edges = np.histogram(v.astype(np.float64), bins=BINS)
            rows.append(
                {
                    "mean": float(cache.mean[c]),
                    "var": float(cache.var[c]),  # type: ignore[index]  # a training cache
                    "min": float(v.min()),
                    "max": float(v.max()),
                    "edges": [float(edges[0]), float(edges[-1])],
                    "counts": counts.tolist(),
                    "zscore": _stats(z[:, c]),
                    "minmax": _stats(mm[:, c]),
                }
            )
        batches[str(B)] = rows
    samples = (images[order[:16], 0] * 255).round().astype(np.uint8)
    return {
        "sizes": list(SIZES),
        "default_size": DEFAULT_SIZE,
        "default_channel": DEFAULT_CHANNEL,
        "channels": C,
        "eps": EPS,
        "bins": BINS,
        "batches": batches,
        "running": {
            "mean": bn.running_mean.astype(float).tolist(),
            "var": bn.running_var.astype(float).tolist(),
            "batches": int(bn.num_batches_tracked),
            "momentum": bn.momentum,
        },
        "network": _network(net, images.shape[1:]),
        "samples": base64.b64encode(samples.tobytes()).decode(),
        "sample_shape": list(samples.shape),
        "run": None,
    }


def _thin(xs, ys, most: int = 400):
    stride = max(1, len(xs) // most)
    return [float(v) for v in xs[::stride]], [float(v) for v in ys[::stride]]


def _curves(h: dict) -> dict | None:
    """One run's curves, from either results.json layout: ``bnlab train``/``compare``
    (step, loss, eval_step, test_accuracy) or ``bnlab reproduce`` (train_loss_every_100,
    steps, test_accuracy, and Figure 1's percentiles at probe_steps)."""
    out = {}
    if h.get("step") and h.get("loss"):
        out["loss"] = _thin(h["step"], h["loss"])
    elif h.get("train_loss_every_100"):
        losses = h["train_loss_every_100"]
        out["loss"] = _thin([100 * (i + 1) for i in range(len(losses))], losses)
    steps = h.get("eval_step") or h.get("steps")
    if steps and h.get("test_accuracy"):
        out["accuracy"] = _thin(steps, h["test_accuracy"])
    if isinstance(h.get("percentiles"), dict) and h.get("probe_steps"):
        out["percentiles"] = {q: _thin(h["probe_steps"], v) for q, v in h["percentiles"].items()}
    return out or None


def run_curves(run_dir) -> dict:
    """A run folder's learning curves (its results.json), thinned to at most 400 points:
    training loss and test accuracy by step, and Figure 1's percentiles where present."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    path = run_dir / "results.json"
    if not path.exists():
        raise ValueError(
            f"{run_dir} has no curves: expected results.json from bnlab train, "
            f"compare or reproduce"
        )
    try:
        results = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    runs = results.get("runs") if isinstance(results, dict) else None
    curves = {
        name: c for name, h in (runs or {}).items() if isinstance(h, dict) and (c := _curves(h))
    }
    if not curves:
        raise ValueError(
            f"{path} has no curves: expected 'runs' holding losses or accuracies by step"
        )
    return {
        "folder": str(run_dir),
        "title": results.get("title") or results.get("experiment") or run_dir.name,
        "curves": curves,
    }


def _asset(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The page: the template with the style, the data, Chart.js and the script inlined."""
    chart = re.sub(
        r"^//# sourceMappingURL=.*$", "", _asset("vendor/chart.umd.min.js"), flags=re.M
    )  # nothing for the browser to fetch
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    parts = {
        "STYLE": _asset("style.css"),
        "CHARTJS": chart,
        "DATA": payload,
        "CHARTJS_LICENSE": _asset("vendor/LICENSE.chart.js.md"),
        "APP": _asset("app.js"),
    }
    return re.sub(
        r"/\*(STYLE|CHARTJS_LICENSE|CHARTJS|DATA|APP)\*/",
        lambda m: parts[m.group(1)],
        _asset("page.html"),
    )  # one pass


def build(out=None, run=None, seed: int = 0) -> Path:
    """Write ``explain.html`` into ``out`` (default ``runs/explain``) and return its path.
    ``run``: a run folder whose curves are added as charts."""
    from ..train import atomic_write

    data = page_data(seed)
    if run is not None:
        data["run"] = run_curves(run)
    out = Path("runs/explain" if out is None else out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "explain.html"
        atomic_write(path, lambda f: f.write(render(data).encode("utf-8")))
        path.chmod(0o644)  # a page to open or serve, like any other
    except OSError as e:  # a file in the way, no permission, a full disk
        raise ValueError(f"cannot write the page into {out}: {e.strerror or e}") from e
    return path
