"""Output allocation in bnlab.torch, measured: torch-allocated outputs with the huge-page
advice (what bnlab.torch does, so every storage method works), the same without the advice,
and NumPy-allocated ones (what it did before), one BatchNorm2d training step (forward + backward) of a float32 64x64x32x32
tensor on the numba engine, interleaved in random order, fastest and median of each.

    .venv/bin/python tools/output_alloc.py [--rounds 41] [--json docs/output_alloc.json]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import bnlab.torch as bt  # noqa: E402
from bnlab.torch import _ops  # noqa: E402

_TORCH = _ops._output


def _plain_torch_output(x, fmt):
    """torch-allocated without the huge-page advice."""
    saved, _ops._MADVISE = _ops._MADVISE, None
    try:
        return _TORCH(x, fmt)
    finally:
        _ops._MADVISE = saved


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
        times = {"torch": [], "torch without advice": [], "numpy": []}
        impl = {"torch": _TORCH, "torch without advice": _plain_torch_output,
                "numpy": _numpy_output}
        for _ in range(args.rounds):
            for name in random.sample(list(times), len(times)):
                _ops._output = impl[name]
                x.grad = None
                t = time.perf_counter()
                bn(x).backward(dy)
                times[name].append(time.perf_counter() - t)
        _ops._output = _TORCH
        rows[layout] = {k: {"min_ms": 1e3 * min(v), "median_ms": 1e3 * float(np.median(v))}
                        for k, v in times.items()}
        for name in ("torch", "torch without advice"):
            rows[layout][f"{name} / numpy, min"] = min(times[name]) / min(times["numpy"])
            rows[layout][f"{name} / numpy, median"] = float(np.median(times[name]) /
                                                             np.median(times["numpy"]))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
