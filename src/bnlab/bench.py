"""``bnlab bench``: batch normalization speed as ratios measured in one run.

For each shape and dtype it times, interleaved round by round in a fresh random order (so
machine noise hits every candidate alike), and reports two statistics of the rounds: the
**minimum** (the fastest round: noise only ever adds time, so on a shared machine the
minimum moves least between runs; targets are judged on it) and the **median** (what a
typical call costs under the machine's load). Each has its own copy-times (time / the same
statistic of the copy) and ratios (keys ending in ``_min`` for the minimum):

* ``copy``: ``np.copyto`` of a same-size array, one read + one write: the bandwidth
  yardstick. BN training forward+backward must read x and dy and write y and dx, about
  five tensor passes, 2.5 copy-times: that is the floor.
* ``reference``: the NumPy reference (``backend="numpy"``).
* ``fused``: bnlab's numba kernels (``backend="numba"``); ``fused_act``: the same with the
  ReLU fused into the passes (BatchNormAct2d; ``train_fused_act_vs_fused`` is its cost over
  BN alone).
* ``torch``: ``torch.nn.BatchNorm1d/2d`` (PyTorch's native CPU batch norm; training:
  autograd forward + backward and the running-statistics update) on NCHW memory, and
  ``torch_channels_last`` on channels-last memory, for every 4-D case whatever bnlab's
  layout (so "NHWC vs PyTorch NCHW" is also measured in one interleaved run), when torch is
  installed.
* ``bnlab_torch`` and ``bnlab_torch_channels_last``: ``bnlab.torch.BatchNorm1d/2d`` with
  the same state on the same tensors, on bnlab's kernels (``backend="numba"``;
  float32/float64: float16 is torch's own path there); ``auto`` and ``auto_channels_last``:
  the same module with ``backend="auto"``, which runs torch's kernel where the committed
  CPU measurements (:mod:`bnlab.torch.measured`) found it faster; the row says which engine
  it ran (``auto_engine``).
* ``torch_again`` and ``torch_again_channels_last``: a second ``torch.nn`` module, same
  state, same tensors: a control. Both sides run the same code, so how far
  ``torch_again_vs_torch`` strays from 1 in a run is how far this machine's noise moves a
  ratio of two candidates: a bnlab ratio within that distance of a target is not told
  apart from it.

"train" is forward with batch statistics + backward (dx, dgamma, dbeta); "infer" is the
forward with running statistics. Every candidate allocates its outputs, as in real use.
It also times one training step of the seed CNN (with BN) in bnlab and in PyTorch, and one
step of the torch seed CNN (channels 32/64, batch 64, SGD) with torch's BN and after
``bnlab.torch.convert``, on contiguous and on channels-last memory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from . import functional as F
from .extras import need

SHAPES = {  # name: (layout, shape with channels on axis)
    "NCHW 64x64x32x32": ("NCHW", (64, 64, 32, 32)),
    "NHWC 64x32x32x64": ("NHWC", (64, 32, 32, 64)),
    "NC 256x4096": ("NC", (256, 4096)),
    "NCHW 128x256x8x8": ("NCHW", (128, 256, 8, 8)),
}
AXIS = {"NCHW": 1, "NHWC": -1, "NC": 1}


@dataclass
class Case:
    name: str
    layout: str
    shape: tuple
    dtype: str


STATS = ("median", "min")  # the statistics reported; suffix "" for the median, "_min"
SUFFIX = {"median": "", "min": "_min"}


def _round_times(fns: dict, repeats: int, warmup: int = 2, seed: int = 0) -> dict:
    """Run every candidate once per round, in a fresh random order each round (so neither
    machine noise nor cache state left by a neighbour favours anyone); return each
    candidate's round times (s)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rng = np.random.default_rng(seed)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(repeats):
        for k in rng.permutation(names):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _statistics(times: dict) -> dict:
    """{"median": {name: s}, "min": {name: s}} of :func:`_round_times`' result."""
    return {
        "median": {k: float(np.median(v)) for k, v in times.items()},
        "min": {k: float(np.min(v)) for k, v in times.items()},
    }


def _torch_fns(case: Case, x, dy, gamma, beta, mean, var):
    """torch.nn's BN module and bnlab.torch's (same state), on NCHW memory and, for 4-D
    cases, on channels-last memory: {name: (train, infer)}; {} without torch."""
    try:
        import torch

        import bnlab.torch as bt
    except ImportError:
        return {}
    tdt = getattr(torch, case.dtype)
    rank = len(case.shape)
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[rank]

    def tensor(a, channels_last=False):
        """Logical NCHW (or (N, C)) tensor in the requested physical layout."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if case.layout == "NHWC":
            t = t.permute(0, 3, 1, 2)  # a channels-last view of the NHWC array
        if t.dim() == 4:
            t = t.contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
        return t.to(tdt)

    def module(cls):
        bn = cls(len(gamma), dtype=torch.float32 if case.dtype == "float16" else tdt)
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(gamma))
            bn.bias.copy_(torch.from_numpy(beta))
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
        return bn

    out: dict = {}
    variants = [("", False)]  # 4-D: NCHW memory; 4-D rows also time channels-last
    if rank == 4:
        variants.append(("_channels_last", True))
    owners: list[tuple[str, type, str | None]] = [
        ("torch", getattr(torch.nn, name), None),
        ("torch_again", getattr(torch.nn, name), None),  # the control: same code both sides
    ]
    if case.dtype != "float16":  # float16 on CPU is torch's own path in bnlab.torch
        owners += [
            ("bnlab_torch", getattr(bt, name), "numba"),
            ("auto", getattr(bt, name), "auto"),
        ]
    for suffix, cl in variants:
        xt = tensor(x, cl).requires_grad_(True)
        dyt = tensor(dy, cl)
        for owner, cls, backend in owners:
            bn = module(cls)
            if backend is not None:
                bn.backend = backend

            def train(xt=xt, dyt=dyt, bn=bn):
                xt.grad = bn.weight.grad = bn.bias.grad = None
                bn.train()
                bn(xt).backward(dyt)

            def infer(xt=xt, bn=bn):
                bn.eval()
                with torch.no_grad():
                    bn(xt)

            out[owner + suffix] = (train, infer)
            if backend == "auto":
                out[owner + suffix + "/engine"] = _auto_engines(bn, xt)
    return out


def _auto_engines(bn, x) -> dict:
    """Which engine ``backend="auto"`` runs for ``bn`` on ``x``, training and inference."""
    from bnlab.torch import engine

    params = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    return {
        op: engine.select("auto", x, params, update=op == "train", training=op == "train")
        for op in ("train", "infer")
    }


def bench_case(case: Case, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    dt = np.dtype(case.dtype)
    axis = AXIS[case.layout]
    x = (1.0 + 2.0 * rng.standard_normal(case.shape)).astype(dt)
    dy = rng.standard_normal(case.shape).astype(dt)
    C = case.shape[axis]
    pdt = np.float32 if dt == np.float16 else dt
    gamma, beta = (
        (1 + 0.1 * rng.standard_normal(C)).astype(pdt),
        rng.standard_normal(C).astype(pdt),
    )
    mean, var = np.zeros(C, pdt), np.ones(C, pdt)
    dst = np.empty_like(x)

    def impl(backend, act="identity"):
        def train():
            _, cache = F.batch_norm_forward(x, gamma, beta, axis=axis, backend=backend, act=act)
            F.batch_norm_backward(dy, cache, backend=backend)

        def infer():
            F.batch_norm_inference(x, mean, var, gamma, beta, axis=axis, backend=backend, act=act)

        return train, infer

    cands = {"reference": impl("numpy"), "fused": impl("numba")}
    if dt != np.float16:  # BN + ReLU in the same passes (BatchNormAct2d)
        cands["fused_act"] = impl("numba", "relu")
    torch_fns = _torch_fns(case, x, dy, gamma, beta, mean, var)
    engines = {k.split("/")[0]: torch_fns.pop(k) for k in list(torch_fns) if k.endswith("/engine")}
    cands.update(torch_fns)
    fns = {"copy": lambda: np.copyto(dst, x)}
    for k, (train, infer) in cands.items():
        fns[f"train/{k}"] = train
        fns[f"infer/{k}"] = infer
    stats = _statistics(_round_times(fns, repeats))
    row: dict = {
        "case": case.name,
        "layout": case.layout,
        "shape": list(case.shape),
        "dtype": case.dtype,
    }
    for stat in STATS:
        t, suffix = stats[stat], SUFFIX[stat]
        row["seconds" + suffix] = t
        row["copy_times" + suffix] = {k: v / t["copy"] for k, v in t.items()}
        for op in ("train", "infer"):
            for ours, theirs, key in PAIRS:
                if f"{op}/{ours}" in t and f"{op}/{theirs}" in t:
                    row[f"{op}_{key}{suffix}"] = t[f"{op}/{ours}"] / t[f"{op}/{theirs}"]
    if engines:
        row["auto_engine"] = engines
    return row


PAIRS = (  # (ours, theirs, ratio key): the ratios each row reports
    ("fused_act", "fused", "fused_act_vs_fused"),
    ("fused", "torch", "fused_vs_torch"),
    ("fused", "torch_channels_last", "fused_vs_torch_channels_last"),
    ("bnlab_torch", "torch", "bnlab_torch_vs_torch"),
    ("bnlab_torch_channels_last", "torch_channels_last", "bnlab_torch_vs_torch_channels_last"),
    ("auto", "torch", "auto_vs_torch"),
    ("auto_channels_last", "torch_channels_last", "auto_vs_torch_channels_last"),
    ("torch_again", "torch", "torch_again_vs_torch"),
    ("torch_again_channels_last", "torch_channels_last", "torch_again_vs_torch_channels_last"),
)


def bench_seed_cnn(repeats: int, batch_size: int = 64) -> dict:
    """One training step (forward, loss, backward, SGD update) of the seed CNN with BN."""
    from . import models, nn

    rng = np.random.default_rng(0)
    x = rng.random((batch_size, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch_size)
    model = models.seed_cnn(bn=True)
    opt = nn.SGD(model.parameters(), 0.01)
    loss_fn = nn.CrossEntropyLoss()

    def ours():
        opt.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()

    fns = {"bnlab": ours}
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]  # the CPU bench runs without PyTorch
    if torch is not None:
        c1, c2 = model[0].out_channels, model[4].out_channels
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, c1, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(c1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(c2),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(c2 * 49, 10),
        )
        net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
        topt = torch.optim.SGD(net.parameters(), 0.01)
        tloss = torch.nn.CrossEntropyLoss()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def theirs():
            topt.zero_grad()
            tloss(net(xt), yt).backward()
            topt.step()

        fns["torch"] = theirs
    stats = _statistics(_round_times(fns, repeats))
    out: dict = {"batch_size": batch_size}
    for stat in STATS:
        t, suffix = stats[stat], SUFFIX[stat]
        out["seconds" + suffix] = t
        if "torch" in t:
            out["bnlab_vs_torch" + suffix] = t["bnlab"] / t["torch"]
    return out


def torch_seed_cnn_step(
    convert: bool,
    batch_size: int = 64,
    channels=(32, 64),
    channels_last: bool = False,
    backend: str = "auto",
    bn: bool = True,
):
    """A function running one training step (forward, loss, backward, SGD update) of the
    torch seed CNN on a fixed random batch, with torch's BN or after
    ``bnlab.torch.convert`` (the same weights either way; ``backend`` set on every converted
    layer), or without BN (``bn=False``: what BN's share of the step is measured against),
    on contiguous or channels-last memory (model and batch). Needs torch."""
    import torch

    import bnlab.torch as bt

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    loss = torch.nn.CrossEntropyLoss()
    net: torch.nn.Module = bt.models.seed_cnn(bn, channels=channels)
    if convert:
        net = bt.convert(net)
        for layer in net.modules():
            if hasattr(layer, "backend"):
                setattr(layer, "backend", backend)  # noqa: B010  (torch.nn.Module's typing)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), 0.01)

    def step():
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()

    return step


STEP_CANDIDATES = {  # name: (convert, backend, bn)
    "torch": (False, "auto", True),
    "torch_again": (False, "auto", True),  # the control: a second torch model, same weights
    "bnlab_convert": (True, "auto", True),
    "bnlab_convert_numba": (True, "numba", True),
    "torch_without_bn": (False, "auto", False),  # for BN's share of the step
}


def bench_torch_step(repeats: int, batch_size: int = 64, channels=(32, 64)) -> dict | None:
    """:func:`torch_seed_cnn_step` with torch's BN and after ``bnlab.torch.convert`` (as it
    comes, ``backend="auto"``, and forced onto bnlab's kernels), on contiguous and on
    channels-last memory, all interleaved, with a second torch model as the control
    (``torch_again_vs_torch``: the noise of a ratio) and the model without BN
    (``bn_share``: 1 - its time / torch's, the fraction of torch's step that BN takes);
    None without torch."""
    try:
        fns = {
            name + suffix: torch_seed_cnn_step(convert, batch_size, channels, cl, backend, bn)
            for suffix, cl in (("", False), ("_channels_last", True))
            for name, (convert, backend, bn) in STEP_CANDIDATES.items()
        }
    except ImportError:
        return None
    stats = _statistics(_round_times(fns, repeats))
    out: dict = {"batch_size": batch_size, "channels": list(channels)}
    for stat in STATS:
        t, suffix = stats[stat], SUFFIX[stat]
        out["seconds" + suffix] = t
        for layout in ("", "_channels_last"):
            for ours, key in (
                ("bnlab_convert", "convert"),
                ("bnlab_convert_numba", "numba"),
                ("torch_again", "torch_again"),
            ):
                out[f"{key}_vs_torch{layout}{suffix}"] = t[ours + layout] / t["torch" + layout]
            out[f"bn_share{layout}{suffix}"] = (
                1 - t["torch_without_bn" + layout] / t["torch" + layout]
            )
    return out


def environment() -> dict:
    import platform

    from numba import get_num_threads

    env = {
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numba_threads": get_num_threads(),
    }
    try:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        env["torch"] = None
    return env


def run(
    shapes=None,
    dtypes=("float32", "float64"),
    repeats: int = 41,
    cnn: bool = True,
    progress: bool = True,
) -> dict:
    """Benchmark ``shapes`` (names of :data:`SHAPES`, or a dict name -> (layout, shape))."""
    tqdm = need("tqdm.auto", "the progress bar").tqdm

    table = (
        SHAPES
        if shapes is None
        else (shapes if isinstance(shapes, dict) else {n: SHAPES[n] for n in shapes})
    )
    cases = [Case(n, spec[0], spec[1], d) for n, spec in table.items() for d in dtypes]
    rows = []
    for case in tqdm(cases, desc="bench", disable=not progress, leave=False):
        rows.append(bench_case(case, repeats))
    result = {"environment": environment(), "repeats": repeats, "rows": rows}
    if cnn:
        result["seed_cnn_step"] = bench_seed_cnn(repeats)
        torch_step = bench_torch_step(repeats)
        if torch_step is not None:
            result["torch_seed_cnn_step"] = torch_step
    return result


def format_table(result: dict, stat: str = "min") -> str:
    """Times in copy-times (``stat`` of a candidate's rounds / the same statistic of the
    copy's, same run) and ratios to torch, for ``stat`` "min" or "median"."""
    suffix = SUFFIX[stat]
    cols = [
        ("ref", "reference", 6),
        ("fused", "fused", 7),
        ("+relu", "fused_act", 7),
        ("torch", "torch", 7),
        ("torchCL", "torch_channels_last", 8),
        ("bt", "bnlab_torch", 7),
        ("btCL", "bnlab_torch_channels_last", 7),
        ("auto", "auto", 7),
        ("autoCL", "auto_channels_last", 7),
    ]
    ratios = [
        ("relu/BN", "fused_act_vs_fused", 8),
        ("fused/torch", "fused_vs_torch", 12),
        ("fused/CL", "fused_vs_torch_channels_last", 9),
        ("bt/torch", "bnlab_torch_vs_torch", 9),
        ("btCL/CL", "bnlab_torch_vs_torch_channels_last", 8),
        ("auto/torch", "auto_vs_torch", 11),
        ("autoCL/CL", "auto_vs_torch_channels_last", 10),
        ("t/t", "torch_again_vs_torch", 6),
        ("CL/CL", "torch_again_vs_torch_channels_last", 7),
    ]
    head = f"{'case':20s}{'dtype':>9s}{'op':>7s}{'copy ms':>9s}" + "".join(
        f"{label:>{w}s}" for label, _, w in cols + ratios
    )
    lines = [
        f"{stat} of {result['repeats']} interleaved rounds: times in copy-times (1.0 = "
        "np.copyto of the same tensor); ratios < 1: bnlab faster",
        "fused: bnlab's kernels on NumPy arrays (+relu: BN+ReLU fused, BatchNormAct2d; "
        "relu/BN: its cost over BN alone); torch/torchCL: torch.nn's module on NCHW /"
        " channels-last memory; bt/btCL: bnlab.torch's module on bnlab's kernels, same "
        "tensors; auto/autoCL: the same module with backend='auto'; t/t, CL/CL: a second "
        "torch.nn module against the first (the control: same code, so the noise of a ratio)",
        head,
        "-" * len(head),
    ]

    def cell(v, width):
        return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}s}"

    for r in result["rows"]:
        ct = r["copy_times" + suffix]
        for op in ("train", "infer"):
            ran = r.get("auto_engine", {})
            engines = ", ".join(f"{k}: {v[op]}" for k, v in ran.items())
            lines.append(
                f"{r['case']:20s}{r['dtype']:>9s}{op:>7s}"
                f"{r['seconds' + suffix]['copy'] * 1e3:9.2f}"
                + "".join(cell(ct.get(f"{op}/{key}"), w) for _, key, w in cols)
                + "".join(cell(r.get(f"{op}_{key}{suffix}"), w) for _, key, w in ratios)
                + (f"  auto ran {engines}" if engines else "")
            )
    cnn = result.get("seed_cnn_step")
    if cnn:
        s = cnn["seconds" + suffix]
        line = f"\nseed CNN training step (batch {cnn['batch_size']}): bnlab {s['bnlab'] * 1e3:.1f} ms"
        if "torch" in s:
            line += (
                f", PyTorch {s['torch'] * 1e3:.1f} ms, bnlab/PyTorch = "
                f"{cnn['bnlab_vs_torch' + suffix]:.2f}"
            )
        lines.append(line)
    step = result.get("torch_seed_cnn_step")
    if step:
        s = step["seconds" + suffix]
        c1, c2 = step["channels"]
        lines.append(
            f"torch seed CNN training step (channels {c1}/{c2}, batch {step['batch_size']}, "
            "SGD), ms: torch BN / after bnlab.torch.convert (auto) / forced onto bnlab's kernels"
            " / torch BN again (the control)"
        )
        for layout, name in (("", "contiguous"), ("_channels_last", "channels_last")):
            again = f"torch_again_vs_torch{layout}{suffix}"
            lines.append(
                f"  {name:14s}{s['torch' + layout] * 1e3:7.1f}"
                f"{s['bnlab_convert' + layout] * 1e3:7.1f}"
                f"{s['bnlab_convert_numba' + layout] * 1e3:7.1f}"
                + (f"{s['torch_again' + layout] * 1e3:7.1f}" if again in step else "")
                + f"   ratios {step[f'convert_vs_torch{layout}{suffix}']:.2f}, "
                f"{step[f'numba_vs_torch{layout}{suffix}']:.2f}"
                + (f", control {step[again]:.2f}" if again in step else "")
                + (
                    f"; BN's share of torch's step {step[share]:.0%}"
                    if (share := f"bn_share{layout}{suffix}") in step
                    else ""
                )
            )
    env = result["environment"]
    lines.append(
        f"\n{env['cpus']} CPUs, numba threads {env['numba_threads']}, numpy {env['numpy']}, "
        f"torch {env.get('torch')} (threads {env.get('torch_threads')}); "
        f"{stat} of {result['repeats']} interleaved rounds"
    )
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    from .train import atomic_write

    text = json.dumps(result, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def report_json(result: dict, path=None) -> int:
    """A measuring tool's ending: print ``result`` as JSON, write it to ``path`` (if given,
    atomically), exit status 0."""
    print(json.dumps(result, indent=1))
    if path:
        write_json(result, path)
    return 0
