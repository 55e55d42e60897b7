"""What synchronized BN sends and costs: computed traffic, and measured steps per second.

    .venv/bin/python tools/scaling.py --json docs/scaling.json

1. Computed, per training step: SyncBatchNorm's collectives (forward: the ranks' input
   signatures, an all-gather of 3 int64, then count, sum and sum of squares, 3 float64 per
   channel; backward: two sums, 2 float64 per channel; three collectives per BN layer) next
   to DDP's gradient all-reduce (every parameter, float32,
   in 25 MiB buckets), for the seed CNN and for ResNet-50 (counted from its architecture).
2. Measured on this machine: steps per second of the torch seed CNN (embedded digits,
   batch 64, SGD) in one process, and in N processes under DistributedDataParallel with
   local BN and with SyncBatchNorm, interleaved over several rounds (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


def counts(net) -> dict:
    """Parameters, BN layers and BN channels of a torch model."""
    bns = [m for m in net.modules() if "BatchNorm" in type(m).__name__]
    return {"parameters": sum(p.numel() for p in net.parameters()), "bn_layers": len(bns),
            "bn_channels": sum(m.num_features for m in bns)}


def resnet50_counts() -> dict:
    """ResNet-50 (He et al. 2016, torchvision's layout: bnlab.torch.models.resnet50)."""
    from bnlab.torch.models import resnet50

    return counts(resnet50())


def seed_cnn_counts(channels=(8, 16)) -> dict:
    from bnlab.torch.models import seed_cnn

    return counts(seed_cnn(channels=channels))


def traffic(counts: dict) -> dict:
    """Bytes each rank contributes per step, and collectives per step."""
    sync_fwd = 3 * 8 * counts["bn_channels"] + 3 * 8 * counts["bn_layers"]  # + signatures
    sync_bwd = 2 * 8 * counts["bn_channels"]
    grads = 4 * counts["parameters"]
    return {**counts, "syncbn_forward_bytes": sync_fwd, "syncbn_backward_bytes": sync_bwd,
            "syncbn_collectives": 3 * counts["bn_layers"], "ddp_gradient_bytes": grads,
            "ddp_collectives": -(-grads // BUCKET_BYTES),
            "syncbn_share_of_bytes": (sync_fwd + sync_bwd) / (sync_fwd + sync_bwd + grads)}


def _worker(rank, world, sync, steps, warmup, out):
    import numpy as np
    import torch

    import bnlab.torch as bt
    from bnlab import data as datasets

    d = datasets.load("mnist-5k")
    images, labels = d.train
    net = bt.convert(bt.models.seed_cnn(), sync=sync)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    B = 64
    lo, hi = rank * B // world, (rank + 1) * B // world
    rng = np.random.default_rng(0)
    times = []
    for step in range(warmup + steps):
        idx = rng.choice(len(labels), B, replace=False)[lo:hi]
        x, y = torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]).long()
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") * (world / B)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if world > 1:
            torch.distributed.barrier()  # a step ends when every rank is done
        if step >= warmup:
            times.append(time.perf_counter() - t)
    if rank == 0:
        Path(out).write_text(json.dumps(times))


def measure(nproc: int, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per step of each configuration, configurations interleaved."""
    import tempfile

    import numpy as np
    import torch

    from bnlab.torch import distributed

    configs = {"1 process": (1, False), f"{nproc} processes, local BN": (nproc, False),
               f"{nproc} processes, SyncBatchNorm": (nproc, True)}
    per_round = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        for r in range(rounds):
            for name, (world, sync) in configs.items():
                if world == 1:
                    torch.set_num_threads(os.cpu_count() or 1)
                    _worker(0, 1, sync, steps, warmup, out)
                else:
                    distributed.launch(_worker, world, args=(sync, steps, warmup, out),
                                       threads=max(1, (os.cpu_count() or 1) // world),
                                       deadline=600)
                per_round[name].append(float(np.median(json.loads(Path(out).read_text()))))
                print(f"round {r + 1}: {name}: {per_round[name][-1] * 1e3:.1f} ms/step",
                      flush=True)
    med = {name: float(np.median(v)) for name, v in per_round.items()}
    sync, local = med[f"{nproc} processes, SyncBatchNorm"], med[f"{nproc} processes, local BN"]
    return {"seconds_per_step": med, "rounds": per_round,
            "steps_per_second": {k: 1.0 / v for k, v in med.items()},
            "syncbn_overhead_vs_local_bn": sync / local - 1.0,
            "nproc": nproc, "batch": 64, "steps_per_round": steps, "cpus": os.cpu_count(),
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--traffic-only", action="store_true",
                   help="recompute the traffic into --json's file, keeping its measurements")
    args = p.parse_args(argv)
    computed = {"seed_cnn": traffic(seed_cnn_counts()), "resnet50": traffic(resnet50_counts())}
    if args.traffic_only:
        if not args.json:
            p.error("--traffic-only needs --json FILE (the measurements to keep)")
        result = {**json.loads(Path(args.json).read_text()), "traffic": computed}
    else:
        result = {"traffic": computed,
                  "measured": measure(args.nproc, args.rounds, args.steps, args.warmup)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
