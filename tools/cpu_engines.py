"""Where bnlab's numba kernels beat torch's batch norm on this CPU: the measurements behind
``backend="auto"`` on CPU (src/bnlab/torch/measured.py, made by tools/measured_table.py).

For each layout (NCHW, channels_last, (N, C)), dtype (float32, float64) and size (2**12 to
2**24 elements), ``bnlab.torch``'s module forced onto its kernels (``backend="numba"``)
and ``torch.nn``'s, same state, same tensors, as a user calls them: a training step
(forward with batch statistics and the running-statistics update, backward through
autograd) and an inference forward. The four candidates of a case are interleaved round by
round in random order (bnlab.bench's harness); the ratios are of the minima (the statistic
the targets are judged on), the medians are kept beside them.

    .venv/bin/python tools/cpu_engines.py [--rounds 31] [--json docs/bench-cpu-engines.json]
    .venv/bin/python tools/measured_table.py   # regenerate the table from both JSON files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import bnlab.torch as bt  # noqa: E402
from bnlab import bench  # noqa: E402

SIZES = {  # layout: shapes from 2**12 to 2**24 elements (2**19 too: where the wins begin)
    "NCHW": [(4, 16, 8, 8), (8, 32, 8, 8), (16, 64, 8, 8), (16, 64, 16, 16), (32, 64, 16, 16),
             (64, 64, 16, 16), (64, 64, 32, 32), (128, 128, 32, 32)],
    "NHWC": [(4, 16, 8, 8), (8, 32, 8, 8), (16, 64, 8, 8), (16, 64, 16, 16), (32, 64, 16, 16),
             (64, 64, 16, 16), (64, 64, 32, 32), (128, 128, 32, 32)],
    "NC": [(16, 256), (64, 256), (64, 1024), (256, 1024), (512, 1024), (256, 4096),
           (1024, 4096), (4096, 4096)],
}


def case(layout: str, shape: tuple, dtype: torch.dtype, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = (1 + 2 * torch.randn(shape, generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if layout == "NHWC":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    x.requires_grad_(True)
    C = shape[1]
    cls = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
    ours, theirs = getattr(bt, cls)(C, dtype=dtype), getattr(torch.nn, cls)(C, dtype=dtype)
    ours.backend = "numba"
    fns = {}
    for name, bn in (("bnlab", ours), ("torch", theirs)):

        def train(bn=bn):
            x.grad = bn.weight.grad = bn.bias.grad = None
            bn.train()
            bn(x).backward(dy)

        def infer(bn=bn):
            bn.eval()
            with torch.no_grad():
                bn(x)

        fns[f"train/{name}"], fns[f"infer/{name}"] = train, infer
    stats = bench._statistics(bench._round_times(fns, rounds))
    row = {"case": f"{layout} {'x'.join(map(str, shape))}", "layout": layout,
           "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
           "seconds": stats["median"], "seconds_min": stats["min"]}
    for op in ("train", "infer"):
        for stat, suffix in bench.SUFFIX.items():
            t = stats[stat]
            row[f"{op}_bnlab_vs_torch{suffix}"] = t[f"{op}/bnlab"] / t[f"{op}/torch"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="two sizes per layout (a dry run)")
    args = p.parse_args(argv)
    rows = []
    for layout, shapes in SIZES.items():
        for shape in shapes[:2] if args.quick else shapes:
            for dtype in (torch.float32, torch.float64):
                rows.append(case(layout, shape, dtype, args.rounds))
                r = rows[-1]
                print(f"{r['case']:22s}{r['dtype']:>9s}  train {r['train_bnlab_vs_torch_min']:.2f}"
                      f"  infer {r['infer_bnlab_vs_torch_min']:.2f}", file=sys.stderr)
    env = bench.environment()
    env["cpu"] = _cpu_name()
    return bench.report_json({"environment": env, "rounds": args.rounds, "rows": rows},
                             args.json)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
