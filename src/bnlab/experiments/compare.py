"""The main job: the seed CNN with and without BN, same data, seed and schedule.

Writes ``results.json``, ``learning_curves.png`` and ``report.md`` into a run folder and
prints a side-by-side table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import data as datasets
from .. import models
from ..train import fit
from .runs import environment, finish


@dataclass(frozen=True)
class CompareConfig:
    dataset: str = "mnist-5k"
    epochs: int = 8
    steps: int | None = None  # overrides epochs when given
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.0
    seed: int = 0
    eval_every: int = 10
    target: float = 0.95  # "steps to reach" this test accuracy
    channels: tuple[int, int] = (8, 16)


def run(config: CompareConfig, out=None, progress: bool = True, print_fn=print) -> dict:
    data = datasets.load(config.dataset)
    C, S, _ = data.image_shape
    runs = {}
    for name, bn in (("bn", True), ("plain", False)):
        model = models.seed_cnn(
            bn=bn,
            in_channels=C,
            image_size=S,
            num_classes=data.num_classes,
            channels=config.channels,
            seed=config.seed,
        )
        hist = fit(
            model,
            data,
            epochs=config.epochs,
            steps=config.steps,
            lr=config.lr,
            batch_size=config.batch_size,
            optimizer=config.optimizer,
            momentum=config.momentum,
            seed=config.seed,
            eval_every=config.eval_every,
            progress=progress,
            desc=f"seed CNN, {'with' if bn else 'without'} BN",
        )
        h = hist.to_dict()
        h["steps_to_target"] = hist.steps_to_reach(config.target)
        h["final_test_accuracy"] = h["test_accuracy"][-1]
        h["final_test_loss"] = h["test_loss"][-1]
        runs[name] = h
    results = {
        "experiment": "compare",
        "dataset": data.name,
        "config": asdict(config),
        "runs": runs,
        "environment": environment(),
    }
    return finish(results, out, "compare", print_fn)
