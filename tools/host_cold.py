"""What bnlab.torch's module costs around torch's kernel, warm and cache-cold, on this CPU.

``bnlab.torch.BatchNorm2d`` on ``backend="native"`` (torch's kernel with bnlab's engine
decision, checks and NaN guard around it) against ``torch.nn.BatchNorm2d``, same state, on a
tensor small enough that the kernel itself costs little (4x16x8x8), training (forward +
backward) and inference. Two settings, interleaved round by round:

* warm: the calls back to back, as a loop of small layers runs;
* cold: each call right after ``np.copyto`` of 32 MiB (what a BN kernel on a 16 MiB tensor
  streams through the caches), which evicts the interpreter's working set; only the BN
  call is timed.

Reports the minimum and median of each, and bnlab minus torch in microseconds.

    .venv/bin/python tools/host_cold.py [--rounds 201] [--json docs/host_cold.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import bnlab.torch as bt  # noqa: E402
from bnlab.bench import environment, report_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=201)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    x = torch.randn(4, 16, 8, 8).requires_grad_(True)
    dy = torch.randn(4, 16, 8, 8)
    ours, theirs = bt.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    ours.backend = "native"
    big = np.ones(8 << 20, np.float32)  # 32 MiB
    sink = np.empty_like(big)

    def train(bn):
        x.grad = None
        bn.train()
        bn(x).backward(dy)

    def infer(bn):
        bn.eval()
        with torch.no_grad():
            bn(x)

    cands = {f"{op}/{name}": (fn, bn) for op, fn in (("train", train), ("infer", infer))
             for name, bn in (("bnlab", ours), ("torch", theirs))}
    times: dict[str, list[float]] = {f"{k}/{s}": [] for k in cands for s in ("warm", "cold")}
    rng = np.random.default_rng(0)
    keys = list(times)
    for _ in range(3):
        for fn, bn in cands.values():
            fn(bn)
    for _ in range(args.rounds):
        for k in rng.permutation(keys):
            op, name, setting = k.split("/")
            fn, bn = cands[f"{op}/{name}"]
            if setting == "cold":
                np.copyto(sink, big)
            else:
                fn(bn)  # the same call just before: warm
            t0 = time.perf_counter()
            fn(bn)
            times[k].append(time.perf_counter() - t0)
    stats = {k: {"min_us": 1e6 * float(np.min(v)), "median_us": 1e6 * float(np.median(v))}
             for k, v in times.items()}
    extra = {f"{op}/{setting}": {s: stats[f"{op}/bnlab/{setting}"][s] -
                                 stats[f"{op}/torch/{setting}"][s]
                                 for s in ("min_us", "median_us")}
             for op in ("train", "infer") for setting in ("warm", "cold")}
    for k, v in extra.items():
        print(f"{k:12s} bnlab - torch: min {v['min_us']:6.1f} us, median {v['median_us']:6.1f} us",
              file=sys.stderr)
    return report_json({"environment": environment(), "rounds": args.rounds,
                        "shape": [4, 16, 8, 8], "times": stats, "bnlab_minus_torch": extra},
                       args.json)


if __name__ == "__main__":
    sys.exit(main())
