"""Host time of bnlab.torch's Triton path without a GPU: the kernels replaced by stubs.

Every launch (``triton_bn._go``) becomes a no-op and the device check accepts CPU tensors,
so what is timed is everything bnlab does on the host around the kernels: the module's
bookkeeping, the engine's choice, the autograd Function, geometry and allocations (not the
launch plan's cache lookup, which runs for CUDA tensors only, nor the launches). Against it: torch.nn's module on the same tiny CPU tensor, whose kernels take
a few microseconds, as the yardstick for torch's own host time. A BatchNorm2d(16) training
step (forward + backward through autograd) and an evaluation forward on (8, 16, 4, 4)
float32; fastest and median of interleaved rounds.

    .venv/bin/python tools/host_stub.py [--json FILE]

(On the GPU, ``tools/gpu_profile.py`` measures the real host time beside the kernels.)
"""

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: backend="triton" takes CPU

import numpy as np
import torch


def stub_kernels():
    """Launches do nothing; CPU tensors pass the device check."""
    from bnlab.kernels import triton_bn

    triton_bn._go = lambda *args, **kwargs: None
    triton_bn.check_device = lambda x: None


def measure(calls: int = 2000, rounds: int = 5) -> dict:
    import bnlab.torch as bt

    torch.set_num_threads(1)
    x = torch.randn(8, 16, 4, 4).requires_grad_()
    dy = torch.randn(8, 16, 4, 4)
    ours = bt.BatchNorm2d(16)
    ours.backend = "triton"
    fns = {}
    for name, bn in (("bnlab (Triton path, stub kernels)", ours),
                     ("torch", torch.nn.BatchNorm2d(16))):
        def step(bn=bn):
            x.grad = None
            bn(x).backward(dy)

        def evaluate(bn=bn):
            with torch.no_grad():
                bn.eval()
                bn(x)
                bn.train()

        fns[f"{name}: train step"] = step
        fns[f"{name}: eval forward"] = evaluate
    times = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(200):
            fn()
    for _ in range(rounds):  # interleaved: each round runs every candidate
        for k, fn in fns.items():
            for _ in range(calls // rounds):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: {"min_us": round(1e6 * min(v), 1), "median_us": round(1e6 * float(np.median(v)), 1)}
            for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    stub_kernels()
    from bnlab.bench import report_json

    result = {"torch": torch.__version__, "calls": args.calls, "shape": [8, 16, 4, 4],
              "rows": measure(args.calls)}
    return report_json(result, args.json)  # printed, and written atomically


if __name__ == "__main__":
    sys.exit(main())
