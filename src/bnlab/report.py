"""Plots and written reports for the run folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .train import atomic_write

COLORS = {"bn": "#1f77b4", "plain": "#d62728"}
LABELS = {"bn": "with BN", "plain": "without BN"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it."""
    def write(f):
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        _pyplot().close(fig)


def moving_average(values, window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    window = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_compare(results: dict, path) -> Path:
    """Two panels: test accuracy and (smoothed) training loss against steps for each run
    in ``results["runs"]`` (keys "bn" and/or "plain")."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results["runs"].items():
        ax_acc.plot(run["eval_step"], run["test_accuracy"], color=COLORS[name], label=LABELS[name])
        w = max(1, len(run["loss"]) // 50)
        ax_loss.plot(np.asarray(run["step"][w - 1:]), moving_average(run["loss"], w),
                     color=COLORS[name], label=LABELS[name])
    target = results["config"].get("target")
    if target:
        ax_acc.axhline(target, color="gray", lw=0.8, ls="--")
    title = results.get("title", f"Seed CNN on {results['dataset']}")
    ax_acc.set(xlabel="training step", ylabel="test accuracy", title=f"{title}: test accuracy")
    ax_acc.set_ylim(max(0.0, min(min(r["test_accuracy"]) for r in results["runs"].values()) - 0.05), 1.0)
    ax_loss.set(xlabel="training step", ylabel="cross-entropy (moving average)",
                title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def write_compare_report(results: dict, table: str, path) -> Path:
    cfg = results["config"]
    text = f"""# Seed CNN with and without batch normalization

Command: `{results['environment']['command']}`

Network: [conv 3x3 -> BN -> ReLU -> max-pool 2x2] x 2 -> linear, channels
{tuple(cfg['channels'])}; without BN the convolutions get their biases back. Same
initial weights (seed {cfg['seed']}), same batches, same schedule.

```
{table}
```

![learning curves](learning_curves.png)
"""
    return atomic_write(path, lambda f: f.write(text.encode()))
