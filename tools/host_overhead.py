"""Host time per call of bnlab.torch on a tiny tensor, where the kernels take next to
nothing: a BatchNorm1d(16) training step (forward + backward) and an evaluation forward on
(32, 16) float32, bnlab's module and torch.nn's, fastest and median of 2000 calls each.

    .venv/bin/python tools/host_overhead.py --json FILE     # the bnlab on sys.path
    PYTHONPATH=OTHER/src .venv/bin/python tools/host_overhead.py --json FILE   # another one
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from bnlab.bench import report_json
    import bnlab.torch as bt

    torch.set_num_threads(2)
    x = torch.randn(32, 16).requires_grad_()
    dy = torch.randn(32, 16)
    rows = {}
    for name, bn in (("bnlab", bt.BatchNorm1d(16)), ("torch", torch.nn.BatchNorm1d(16))):
        def step():
            x.grad = None
            bn(x).backward(dy)

        def evaluate():
            with torch.no_grad():
                bn.eval()
                bn(x)
                bn.train()

        for what, fn in (("train step", step), ("eval forward", evaluate)):
            for _ in range(200):
                fn()
            ts = []
            for _ in range(args.calls):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            rows[f"{name} {what}"] = {"min_us": 1e6 * min(ts), "median_us": 1e6 * float(np.median(ts))}
    import bnlab
    result = {"bnlab": str(Path(bnlab.__file__).parent), "torch": torch.__version__,
              "calls": args.calls, "rows": rows}
    return report_json(result, args.json)  # printed, and written atomically


if __name__ == "__main__":
    sys.exit(main())
