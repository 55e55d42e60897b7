"""The main job: the seed CNN with and without BN, same data, seed and schedule.

Writes ``results.json``, ``learning_curves.png`` and ``report.md`` into a run folder and
prints a side-by-side table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import data as datasets
from .. import models, report
from ..train import fit
from .runs import environment, run_dir, write_json


@dataclass(frozen=True)
class CompareConfig:
    dataset: str = "mnist-5k"
    epochs: int = 8
    steps: int | None = None          # overrides epochs when given
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.0
    seed: int = 0
    eval_every: int = 10
    target: float = 0.95              # "steps to reach" this test accuracy
    channels: tuple[int, int] = (8, 16)


EARLY_STEPS = (50, 100, 200)


def accuracy_at(history, step: int) -> float | None:
    """Test accuracy at the last evaluation at or before ``step``."""
    best = None
    for s, a in zip(history["eval_step"], history["test_accuracy"]):
        if s <= step:
            best = a
    return best


def run(config: CompareConfig, out=None, progress: bool = True, print_fn=print) -> dict:
    data = datasets.load(config.dataset)
    C, S, _ = data.image_shape
    runs = {}
    for name, bn in (("bn", True), ("plain", False)):
        model = models.seed_cnn(bn=bn, in_channels=C, image_size=S,
                                num_classes=data.num_classes, channels=config.channels,
                                seed=config.seed)
        hist = fit(model, data, epochs=config.epochs, steps=config.steps, lr=config.lr,
                   batch_size=config.batch_size, optimizer=config.optimizer,
                   momentum=config.momentum, seed=config.seed, eval_every=config.eval_every,
                   progress=progress, desc=f"seed CNN, {'with' if bn else 'without'} BN")
        h = hist.to_dict()
        h["steps_to_target"] = hist.steps_to_reach(config.target)
        h["final_test_accuracy"] = h["test_accuracy"][-1]
        h["final_test_loss"] = h["test_loss"][-1]
        runs[name] = h
    results = {"experiment": "compare", "dataset": data.name, "config": asdict(config),
               "runs": runs, "environment": environment()}
    folder = run_dir(out, "compare")
    write_json(folder / "results.json", results)
    report.plot_compare(results, folder / "learning_curves.png")
    table = comparison_table(results)
    report.write_compare_report(results, table, folder / "report.md")
    print_fn(table)
    print_fn(f"\nwrote {folder / 'results.json'}, {folder / 'learning_curves.png'}, "
             f"{folder / 'report.md'}")
    results["run_dir"] = str(folder)
    return results


def comparison_table(results: dict) -> str:
    cfg, bn, plain = results["config"], results["runs"]["bn"], results["runs"]["plain"]
    fmt = lambda v, spec: "never" if v is None else format(v, spec)  # noqa: E731
    rows = [(f"test accuracy at step {s}", accuracy_at(bn, s), accuracy_at(plain, s), ".3f")
            for s in EARLY_STEPS if s <= bn["step"][-1]]
    rows += [
        ("final test accuracy", bn["final_test_accuracy"], plain["final_test_accuracy"], ".3f"),
        ("final test loss", bn["final_test_loss"], plain["final_test_loss"], ".3f"),
        (f"steps to {cfg['target']:.0%} test accuracy", bn["steps_to_target"],
         plain["steps_to_target"], "d"),
        ("training steps", bn["step"][-1], plain["step"][-1], "d"),
        ("training time (s)", bn["seconds"], plain["seconds"], ".1f"),
    ]
    head = (f"seed CNN on {results['dataset']}: {cfg['optimizer']} lr={cfg['lr']} "
            f"batch={cfg['batch_size']} seed={cfg['seed']}")
    lines = [head, f"{'':34s}{'with BN':>10s}{'without':>10s}"]
    lines += [f"{label:34s}{fmt(a, spec):>10s}{fmt(b, spec):>10s}" for label, a, b, spec in rows]
    return "\n".join(lines)
