"""Measure the thread policy of bnlab.torch inside a real torch training step.

torch's intra-op threads (OpenMP) and numba's (another OpenMP runtime: numba's omppool
links the system's libgomp, torch bundles its own) share the cores. This times one training
step of the torch seed CNN (channels 32/64, batch 64, SGD) with torch's BN and with bnlab's
(``convert``) under three policies, interleaved round by round, medians:

* "torch grain": parallel from 2**15 elements, at most torch.get_num_threads() threads
  (bnlab.torch's policy, ``bnlab.torch._ops.PARALLEL_MIN_SIZE``);
* "bnlab grain": parallel from 2**20 elements, as in bnlab's own NumPy stack;
* "one thread": the kernels on the calling thread only.

It also times the BN layers alone (forward + backward) at the CNN's two shapes.

    .venv/bin/python tools/torch_threads.py [--repeats 31] [--json docs/torch_threads.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import bnlab.torch as bt
from bnlab import kernels
from bnlab.bench import _median_times, environment, torch_seed_cnn_step
from bnlab.torch import _ops

POLICIES = {"torch grain": (1 << 15, None), "bnlab grain": (1 << 20, None),
            "one thread": (1 << 15, 1)}  # name: (parallel_min_size, thread cap)


def _under(policy, fn):
    """``fn`` run under ``policy`` (a key of POLICIES; None: nothing to set)."""
    if policy is None:
        return fn
    least, cap = POLICIES[policy]

    def run():
        saved = _ops.PARALLEL_MIN_SIZE
        _ops.PARALLEL_MIN_SIZE = least
        try:
            with kernels.num_threads(cap):
                fn()
        finally:
            _ops.PARALLEL_MIN_SIZE = saved
    return run


def step_fns() -> dict:
    """The torch seed CNN step (bnlab bench's) with torch's BN and under each policy."""
    return {"torch BN": torch_seed_cnn_step(False),
            **{f"bnlab, {p}": _under(p, torch_seed_cnn_step(True)) for p in POLICIES}}


def layer_fns(batch: int = 64, channels=(32, 64)) -> dict:
    """BN forward + backward alone at the seed CNN's two shapes."""
    fns = {}
    for C, S in zip(channels, (28, 14)):
        x = torch.randn(batch, C, S, S, requires_grad=True)
        dy = torch.randn(batch, C, S, S)
        for policy in (None, *POLICIES):
            bn = torch.nn.BatchNorm2d(C) if policy is None else bt.BatchNorm2d(C)

            def run(bn=bn, x=x, dy=dy):
                x.grad = None
                bn(x).backward(dy)
            fns[f"{C}x{S}x{S} {policy or 'torch'}"] = _under(policy, run)
    return fns


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--json")
    args = p.parse_args(argv)
    steps = _median_times(step_fns(), args.repeats)
    layers = _median_times(layer_fns(), args.repeats)
    base = steps["torch BN"]
    out = {"environment": environment(), "repeats": args.repeats,
           "step_ms": {k: v * 1e3 for k, v in steps.items()},
           "step_vs_torch": {k: v / base for k, v in steps.items()},
           "bn_layer_ms": {k: v * 1e3 for k, v in layers.items()}}
    for k, v in out["step_ms"].items():
        print(f"step  {k:28s}{v:8.2f} ms  {out['step_vs_torch'][k]:.2f}x torch")
    for k, v in out["bn_layer_ms"].items():
        print(f"layer {k:28s}{v:8.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
