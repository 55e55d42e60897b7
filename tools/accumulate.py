"""Gradient accumulation and BN on the seed CNN (torch, CPU): one batch of K*b against K
micro-batches of b, with bnlab.torch.accumulating and without it.

* ``one batch``: batch K*b, one forward per optimizer step.
* ``accumulating``: K micro-batches of b per step inside ``bnlab.torch.accumulating``: the
  running statistics are updated once per step from the pooled micro-batches.
* ``naive``: the same K micro-batches, each updating the running statistics itself (K
  updates per step with the micro-batch's statistics), as plain accumulation does.

Each micro-batch is *normalized* by its own statistics in both accumulated runs: that, no
running-statistics bookkeeping can change. Reported per run: test accuracy in evaluation
mode (running statistics), test accuracy with batch statistics of b samples (training
mode, the statistics the network learned with), and their gap.

    .venv/bin/python tools/accumulate.py [--steps 300] [--seeds 3] --json docs/accumulate.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np
import torch


def run(mode: str, K: int, b: int, steps: int, seed: int, data) -> dict:
    import bnlab.torch as bt

    torch.manual_seed(seed)
    net = bt.convert(bt.models.seed_cnn(seed=seed))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x_train, y_train = (torch.from_numpy(a) for a in data.train)
    x_test, y_test = (torch.from_numpy(a) for a in data.test)
    rng = np.random.default_rng(seed)
    B = K * b
    pooled = bt.accumulating(net, K) if mode == "accumulating" else contextlib.nullcontext()
    start = time.perf_counter()
    with pooled:
        for _ in range(steps):
            idx = torch.from_numpy(rng.choice(len(y_train), B, replace=False))
            xb, yb = x_train[idx], y_train[idx]
            opt.zero_grad()
            chunks = [(xb, yb)] if mode == "one batch" else zip(xb.chunk(K), yb.chunk(K))
            for xm, ym in chunks:
                loss = torch.nn.functional.cross_entropy(net(xm), ym, reduction="sum") / B
                loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        net.eval()
        eval_acc = (net(x_test).argmax(1) == y_test).float().mean().item()
        net.train()  # batch statistics of b test samples (no update: a copy's buffers)
        probe = bt.convert(bt.models.seed_cnn(seed=seed))
        probe.load_state_dict(net.state_dict())
        probe.train()
        correct = sum(int((probe(x_test[i:i + b]).argmax(1) == y_test[i:i + b]).sum())
                      for i in range(0, len(y_test) - b + 1, b))
        train_mode_acc = correct / (len(y_test) // b * b)
    return {"mode": mode, "seed": seed, "K": K, "b": b, "steps": steps,
            "test_accuracy_eval": eval_acc, "test_accuracy_batch_stats": train_mode_acc,
            "gap": train_mode_acc - eval_acc, "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--b", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from bnlab import data
    from bnlab.bench import report_json

    torch.set_num_threads(1)
    ds = data.load("mnist-5k")
    rows = []
    for seed in range(args.seeds):
        for mode in ("one batch", "accumulating", "naive"):
            row = run(mode, args.K, args.b, args.steps, seed, ds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for mode in ("one batch", "accumulating", "naive"):
        r = [x for x in rows if x["mode"] == mode]
        summary[mode] = {k: [min(x[k] for x in r), max(x[k] for x in r)]
                         for k in ("test_accuracy_eval", "test_accuracy_batch_stats", "gap")}
    result = {"torch": torch.__version__, "K": args.K, "b": args.b, "steps": args.steps,
              "seeds": args.seeds, "rows": rows, "range_over_seeds": summary}
    return report_json(result, args.json)  # printed, and written atomically


if __name__ == "__main__":
    sys.exit(main())
