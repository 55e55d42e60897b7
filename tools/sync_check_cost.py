"""What SyncBatchNorm's per-call rank check costs: 2 gloo processes on this machine, a
SyncBatchNorm training step (forward + backward) with the check (one all-gather of three
integers) and without it, interleaved, fastest and median per step.

    .venv/bin/python tools/sync_check_cost.py [--steps 200] [--json docs/sync_check_cost.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {"small 32x16x8x8": (32, 16, 8, 8), "seed-CNN layer 64x32x28x28": (64, 32, 28, 28)}


def _worker(rank, world, steps, out):
    import numpy as np
    import torch

    import bnlab.torch as bt
    from bnlab.torch import sync

    real = sync._check_ranks
    rows = {}
    for name, shape in SHAPES.items():
        bn = bt.SyncBatchNorm(shape[1])
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        times = {"with check": [], "without": []}
        for i in range(steps):
            order = ["with check", "without"] if i % 2 else ["without", "with check"]
            for k in order:
                sync._check_ranks = real if k == "with check" else (lambda x, group: None)
                t = time.perf_counter()
                bn(x).backward(dy)
                times[k].append(time.perf_counter() - t)
        sync._check_ranks = real
        rows[name] = {k: {"min_ms": 1e3 * min(v), "median_ms": 1e3 * float(np.median(v))}
                      for k, v in times.items()}
        rows[name]["extra_ms_median"] = rows[name]["with check"]["median_ms"] - \
            rows[name]["without"]["median_ms"]
        rows[name]["ratio_median"] = rows[name]["with check"]["median_ms"] / \
            rows[name]["without"]["median_ms"]
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from bnlab.bench import report_json
    import torch

    from bnlab.torch import distributed

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        distributed.launch(_worker, 2, args=(args.steps, str(out)), threads=1, deadline=600)
        rows = json.loads(out.read_text())
    result = {"torch": torch.__version__, "backend": "gloo", "processes": 2,
              "threads_per_process": 1, "steps": args.steps, "rows": rows}
    return report_json(result, args.json)  # printed, and written atomically


if __name__ == "__main__":
    sys.exit(main())
