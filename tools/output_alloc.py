"""Output allocation in bnlab.torch, measured: bnlab's (torch-allocated storages, reused
once freed: bnlab.torch._ops._Outputs), a fresh torch.empty per output, and NumPy-allocated
outputs (what bnlab.torch had before its outputs were ordinary tensors). One BatchNorm2d
training step (forward + backward) of a float32 64x64x32x32 tensor on the numba engine,
the three interleaved in random order: fastest and median of each, and the page faults a
step takes (minor faults of the process).

    .venv/bin/python tools/output_alloc.py [--rounds 41] [--json docs/output_alloc.json]
"""

import argparse
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import bnlab.torch as bt  # noqa: E402
from bnlab.bench import report_json  # noqa: E402
from bnlab.torch import _ops  # noqa: E402

_TORCH = _ops._output


def _plain_torch_output(x, fmt):
    """A fresh torch.empty each call, laid out as _ops._output's."""
    y = torch.empty(x.shape, dtype=x.dtype, memory_format=fmt)
    return y, _ops._view(y if fmt == torch.contiguous_format else
                         y.permute(0, *range(2, y.dim()), 1))


def _numpy_output(x, fmt):
    """The allocation before: NumPy's (torch.from_numpy), laid out as _ops._output's."""
    dtype = {torch.float32: np.float32, torch.float64: np.float64}[x.dtype]
    if fmt == torch.contiguous_format:
        a = np.empty(x.shape, dtype)
        return torch.from_numpy(a), a
    N, C, *spatial = x.shape
    a = np.empty((N, *spatial, C), dtype)
    return torch.from_numpy(a).permute(0, a.ndim - 1, *range(1, a.ndim - 1)), a


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = torch.randn(64, 64, 32, 32).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(64, 64, 32, 32).contiguous(memory_format=fmt)
        bn = bt.BatchNorm2d(64)
        times = {"torch": [], "torch.empty": [], "numpy": []}
        faults = dict.fromkeys(times, 0)
        impl = {"torch": _TORCH, "torch.empty": _plain_torch_output,
                "numpy": _numpy_output}
        for _ in range(args.rounds):
            for name in random.sample(list(times), len(times)):
                _ops._output = impl[name]
                x.grad = None
                f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                bn(x).backward(dy)
                times[name].append(time.perf_counter() - t)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
        _ops._output = _TORCH
        rows[layout] = {k: {"min_ms": 1e3 * min(v), "median_ms": 1e3 * float(np.median(v)),
                            "page_faults_per_step": faults[k] / len(v)}
                        for k, v in times.items()}
        for name in ("torch", "torch.empty"):
            rows[layout][f"{name} / numpy, min"] = min(times[name]) / min(times["numpy"])
            rows[layout][f"{name} / numpy, median"] = float(np.median(times[name]) /
                                                             np.median(times["numpy"]))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "rows": rows}
    return report_json(result, args.json)  # printed, and written atomically


if __name__ == "__main__":
    sys.exit(main())
