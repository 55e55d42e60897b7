"""``bnlab bench --device cuda``: bnlab's Triton kernels against torch's own batch norm.

For each case it times, with ``triton.testing.do_bench`` medians (the L2 cache flushed
before every call):

* ``copy``: ``dst.copy_(x)``, a same-size device-to-device copy (one read + one write):
  the bandwidth yardstick. Times are reported in copy-times;
* ``torch``: ``torch.nn.BatchNorm1d/2d`` (cuDNN or ATen, whichever torch picks);
* ``bnlab``: ``bnlab.torch.BatchNorm1d/2d`` with the same state, forced to the Triton kernels;
* ``auto``: the same module with ``backend="auto"``: Triton where the committed measurements
  (:mod:`bnlab.torch.measured`) say it is faster, else torch's kernel with bnlab's guard;
  the row says which engine it ran (``auto_engine``).

"train" is the training forward (batch statistics, running-statistics update) and the
backward through autograd, as a user calls it (``torch.autograd.grad`` of y with respect to
x, weight and bias for a given dy); "infer" is the evaluation forward under ``no_grad``.

The floor for a tensor larger than the L2 cache: training 4 copy-times (forward: read x
twice, write y; backward: read x and dy twice, write dx: 8 passes over 2 per copy),
inference 1. On a CPU (``--device cpu``: the kernels in Triton's interpreter, for a dry
run of the script) times come from ``time.perf_counter`` and mean nothing.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, NamedTuple

import torch

from .bench import write_json  # noqa: F401  (re-exported for the CLI)
from .torch import engine


class GpuCase(NamedTuple):
    shape: tuple
    dtype: str
    fmt: str = "contiguous"  # or "channels_last"

    @property
    def name(self) -> str:
        layout = {2: "NC", 4: "NCHW"}[len(self.shape)]
        if self.fmt == "channels_last":
            layout = "NHWC"
        return f"{'x'.join(map(str, self.shape))} {self.dtype} {layout}"


CASES = [
    GpuCase((256, 64, 56, 56), "float32"),
    GpuCase((256, 64, 56, 56), "float32", "channels_last"),
    GpuCase((256, 64, 56, 56), "float16"),
    GpuCase((256, 64, 56, 56), "float16", "channels_last"),
    GpuCase((256, 64, 56, 56), "bfloat16", "channels_last"),
    GpuCase((8192, 4096), "float32"),
    GpuCase((64, 64, 32, 32), "float32"),
]
SMALL_CASES = [
    GpuCase((6, 5, 7, 9), "float32"),
    GpuCase((6, 5, 7, 9), "float16", "channels_last"),
    GpuCase((40, 24), "bfloat16"),
]  # for a CPU dry run in the interpreter

# the GPU targets: training at most 4.5 copy-times (6 for the L2-sized
# 64x64x32x32), inference at most 1.15, never slower than torch
TARGETS = {"train": 4.5, "train_l2": 6.0, "infer": 1.15}


def _timer(device: str, rep_ms: int):
    if device == "cuda":
        import triton.testing

        def cuda_time(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3

        return cuda_time

    def cpu_time(fn, n=5):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[n // 2]

    return cpu_time


def _modules(case: GpuCase, device: str):
    """(torch module, bnlab module) with the same random state, on ``device``."""
    from . import torch as bt

    C = case.shape[1]
    cls = "BatchNorm2d" if len(case.shape) == 4 else "BatchNorm1d"
    theirs = getattr(torch.nn, cls)(C).to(device)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = getattr(bt, cls)(C).to(device)
    ours.load_state_dict(theirs.state_dict())
    ours.backend = "triton"
    auto = copy.deepcopy(ours)
    auto.backend = "auto"
    return theirs, ours, auto


def case_tensors(case: GpuCase, device: str):
    """x and dy of a case: standard normal, in its dtype and memory format, on ``device``."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if case.fmt == "channels_last" else torch.contiguous_format
    dtype = getattr(torch, case.dtype)
    x = torch.randn(case.shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    dy = torch.randn(case.shape, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    return x, dy


def bench_case(case: GpuCase, device: str = "cuda", rep_ms: int = 100) -> dict:
    """Seconds per candidate and op, copy-times, and bnlab/torch ratios for one case."""
    timer = _timer(device, rep_ms)
    x, dy = case_tensors(case, device)
    dst = torch.empty_like(x)
    seconds = {"copy": timer(lambda: dst.copy_(x))}
    modules = _modules(case, device)
    for name, module in zip(("torch", "bnlab", "auto"), modules):
        xx = x.detach().requires_grad_()
        wrt = (xx, module.weight, module.bias)

        def train(module=module, xx=xx, wrt=wrt):
            return torch.autograd.grad(module(xx), wrt, dy)

        evaluation = copy.deepcopy(module).eval()

        def infer(module=evaluation):
            with torch.no_grad():
                return module(x)

        seconds[f"train/{name}"] = timer(train)
        seconds[f"infer/{name}"] = timer(infer)
    row = {
        "case": case.name,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "memory_format": case.fmt,
        "bytes": x.numel() * x.element_size(),
        "seconds": seconds,
        "copy_times": {k: v / seconds["copy"] for k, v in seconds.items() if k != "copy"},
    }
    for op in ("train", "infer"):
        row[f"{op}_bnlab_vs_torch"] = seconds[f"{op}/bnlab"] / seconds[f"{op}/torch"]
        row[f"{op}_auto_vs_torch"] = seconds[f"{op}/auto"] / seconds[f"{op}/torch"]
    auto = modules[2]
    params = (auto.running_mean, auto.running_var, auto.weight, auto.bias)
    row["auto_engine"] = {
        op: engine.select("auto", x, params, update=op == "train", training=op == "train")
        for op in ("train", "infer")
    }
    return row


def environment(device: str) -> dict:
    env: dict[str, Any] = {"torch": torch.__version__, "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    return env


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def meets_targets(row: dict) -> dict:
    """Which of the issue's targets this row meets (None: no target for it)."""
    ct = row["copy_times"]
    l2 = row["bytes"] <= 32 * 2**20
    return {
        "train": ct["train/bnlab"] <= TARGETS["train_l2" if l2 else "train"],
        "infer": ct["infer/bnlab"] <= TARGETS["infer"],
        "not_slower": row["train_bnlab_vs_torch"] <= 1.0 and row["infer_bnlab_vs_torch"] <= 1.0,
        "auto_not_slower": row["train_auto_vs_torch"] <= 1.0 and row["infer_auto_vs_torch"] <= 1.0,
    }


def run(
    device: str = "cuda", cases=None, rep_ms: int = 100, progress: bool = True, on_row=None
) -> dict:
    """Benchmark ``cases`` (default: :data:`CASES` on CUDA, :data:`SMALL_CASES` on CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA GPU, and torch sees none")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "--device cpu runs the Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1"
        )
    cases = cases or (CASES if device == "cuda" else SMALL_CASES)
    rows: list[dict] = []
    result = {"environment": environment(device), "rep_ms": rep_ms, "rows": rows}
    for i, case in enumerate(cases):
        if progress:
            print(f"[{i + 1}/{len(cases)}] {case.name}", flush=True)
        row = bench_case(case, device, rep_ms)
        row["meets"] = meets_targets(row)
        rows.append(row)
        if on_row is not None:
            on_row(result)
    return result


def format_table(result: dict) -> str:
    head = (
        f"{'case':32s}{'copy us':>9s}{'train torch':>12s}{'bnlab':>7s}{'auto':>7s}"
        f"{'ratio':>7s}{'infer torch':>12s}{'bnlab':>7s}{'auto':>7s}{'ratio':>7s}  auto ran"
    )
    lines = [
        "times in copy-times (1.0 = a device-to-device copy of the same tensor); "
        "bnlab = forced Triton, auto = backend='auto'; ratio = auto/torch (<= 1: never "
        "slower)",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        ct = r["copy_times"]
        ran = r.get("auto_engine", {})
        lines.append(
            f"{r['case']:32s}{r['seconds']['copy'] * 1e6:9.1f}"
            f"{ct['train/torch']:12.2f}{ct['train/bnlab']:7.2f}"
            f"{ct.get('train/auto', float('nan')):7.2f}"
            f"{r.get('train_auto_vs_torch', float('nan')):7.2f}{ct['infer/torch']:12.2f}"
            f"{ct['infer/bnlab']:7.2f}{ct.get('infer/auto', float('nan')):7.2f}"
            f"{r.get('infer_auto_vs_torch', float('nan')):7.2f}  "
            f"{ran.get('train', '-')}/{ran.get('infer', '-')}"
        )
    env = result["environment"]
    lines.append(
        f"\n{env.get('gpu', env['device'])}, torch {env['torch']}, Triton "
        f"{env['triton']}, driver {env.get('driver')}, cuDNN {env.get('cudnn')}; "
        f"do_bench medians over {result['rep_ms']} ms"
    )
    return "\n".join(lines)
