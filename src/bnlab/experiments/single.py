"""``bnlab train``: one model, one configuration, with a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .. import data as datasets
from .. import models, report
from ..train import fit, load_checkpoint, read_checkpoint, save_checkpoint
from .runs import environment, run_dir, write_json


@dataclass(frozen=True)
class TrainConfig:
    model: str = "cnn"  # "cnn" (seed CNN) or "mlp" (the paper's MLP)
    bn: bool = True
    activation: str = "sigmoid"  # MLP only
    weight_std: float | None = None  # MLP only: N(0, std^2) weights
    dataset: str = "mnist-5k"
    epochs: int = 5
    steps: int | None = None
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int | None = None
    accumulate: int = 1  # --engine torch: micro-batches per optimizer step


def build_model(config: TrainConfig, data):
    C, S, _ = data.image_shape
    if config.model == "cnn":
        return models.seed_cnn(
            bn=config.bn,
            in_channels=C,
            image_size=S,
            num_classes=data.num_classes,
            seed=config.seed,
        )
    if config.model == "mlp":
        return models.paper_mlp(
            bn=config.bn,
            activation=config.activation,
            in_features=C * S * S,
            num_classes=data.num_classes,
            weight_std=config.weight_std,
            seed=config.seed,
        )
    raise ValueError(f'model must be "cnn" or "mlp", got {config.model!r}')


class _OptimizerState:
    """What save_checkpoint asks of an optimizer: its state dict."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


RESUME = "resume.npz"  # the resumable checkpoint in a run folder


def run(
    config: TrainConfig,
    out=None,
    init_from=None,
    progress=True,
    print_fn=print,
    checkpoint_every: int | None = None,
    resume=None,
) -> dict:
    """Train one network (NumPy engine) into a run folder. During training a resumable
    checkpoint (model, optimizer, step, history, batch stream, generators) is written
    atomically to ``RUN_DIR/resume.npz`` every ``checkpoint_every`` steps (default: about
    once a minute); ``resume=RUN_DIR`` continues that run from it, with its configuration,
    and ends as the uninterrupted run would (``results.json`` lists ``resumed_from``)."""
    resumed_from: list[int] = []
    state = None
    if resume is not None:
        folder = Path(resume)
        model_state, optim_state, meta = read_checkpoint(folder / RESUME)
        config = TrainConfig(**meta["config"])
        state = {**meta["resume"], "optimizer": optim_state}
        resumed_from = [*meta.get("resumed_from", []), int(state["step"])]
        print_fn(f"resuming {folder} after step {state['step']}")
    else:
        folder = run_dir(out, "train")
    data = datasets.load(config.dataset)
    model = build_model(config, data)
    if state is not None:
        model.load_state_dict(model_state)
    elif init_from is not None:
        meta = load_checkpoint(init_from, model)
        print_fn(f"initialized from {init_from} (saved after step {meta.get('step')})")

    def checkpoint(resume_state: dict) -> None:
        optimizer = _OptimizerState(resume_state.pop("optimizer"))
        save_checkpoint(
            folder / RESUME,
            model,
            optimizer,
            config=asdict(config),
            resume=resume_state,
            resumed_from=resumed_from,
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
        weight_decay=config.weight_decay,
        seed=config.seed,
        eval_every=config.eval_every,
        progress=progress,
        desc=f"{config.model}, {'with' if config.bn else 'without'} BN",
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=state,
    )
    name = "bn" if config.bn else "plain"
    results = {
        "experiment": "train",
        "dataset": data.name,
        "config": asdict(config),
        "title": f"{config.model.upper()} on {data.name}",
        "runs": {name: hist.to_dict()},
        "environment": environment(),
        "resumed_from": resumed_from,
    }
    write_json(folder / "results.json", results)
    report.write_report(results, folder)
    save_checkpoint(
        folder / "checkpoint.npz",
        model,
        config=asdict(config),
        step=hist.step[-1],
        test_accuracy=hist.test_accuracy[-1],
    )
    print_fn(
        f"{'diverged at' if hist.diverged else 'finished'} step {hist.step[-1]}: "
        f"test accuracy {hist.test_accuracy[-1]:.4f}, test loss {hist.test_loss[-1]:.4f} "
        f"({hist.seconds:.1f} s)"
    )
    print_fn(
        f"wrote {folder / 'results.json'}, {folder / 'learning_curves.png'}, "
        f"{folder / 'report.md'}, {folder / 'checkpoint.npz'}"
    )
    results["run_dir"] = str(folder)
    return results
