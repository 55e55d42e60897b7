"""What resumable checkpoints cost: size and time per checkpoint, and the time to resume,
for the seed CNN (NumPy engine, `bnlab train`) and for a state of ResNet-50's size (its
25,557,032 parameters and their SGD momentum, float32: what a checkpoint of it holds).

    .venv/bin/python tools/checkpoint_cost.py --json docs/checkpoint_cost.json

Times are the fastest of 5 on this machine's disk (a temporary folder), one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def fastest(fn, n=5) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class _State:
    def __init__(self, arrays):
        self.arrays = arrays

    def state_dict(self):
        return self.arrays


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    from bnlab import data, models, train
    from bnlab.bench import report_json
    from bnlab.experiments import single

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # the seed CNN, as bnlab train writes it (model, SGD state, resume metadata)
        ds = data.load("mnist-5k")
        net = models.seed_cnn()
        states = []
        train.fit(net, ds, steps=20, lr=0.05, momentum=0.9, progress=False,
                  checkpoint=states.append, checkpoint_every=10)
        state = states[-1]
        opt = _State(state.pop("optimizer"))
        path = folder / single.RESUME

        def save():
            train.save_checkpoint(path, net, opt, config={}, resume=state, resumed_from=[])

        t_save = fastest(save)

        def load():
            m = models.seed_cnn()
            s, o, meta = train.read_checkpoint(path)
            m.load_state_dict(s)
            stream = data.BatchStream(*ds.train, 64, np.random.default_rng(0))
            stream.restore(meta["resume"]["stream"])

        rows["seed CNN (NumPy engine)"] = {
            "parameters": int(sum(v.size for v in net.state_dict().values())),
            "bytes": path.stat().st_size, "save_s": t_save, "resume_s": fastest(load)}
        # ResNet-50's size: parameters and momentum, float32
        n = 25_557_032
        rng = np.random.default_rng(0)
        big = {"model/weights": rng.standard_normal(n, dtype=np.float32)}
        mom = {"momentum": rng.standard_normal(n, dtype=np.float32)}

        class Fake:
            def state_dict(self):
                return big

        path = folder / "big.npz"
        t_save = fastest(lambda: train.save_checkpoint(path, Fake(), _State(mom), step=1), n=3)
        t_load = fastest(lambda: train.read_checkpoint(path), n=3)
        rows["ResNet-50's size (25,557,032 parameters + SGD momentum)"] = {
            "parameters": n, "bytes": path.stat().st_size, "save_s": t_save,
            "resume_s": t_load}
    result = {"rows": rows, "note": "fastest of 5 (3 for ResNet-50's size), one run"}
    return report_json(result, args.json)  # printed, and written atomically


if __name__ == "__main__":
    sys.exit(main())
