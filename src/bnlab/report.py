"""Plots and written reports for run folders.

``write_report(results, folder)`` draws the figures and writes ``report.md`` for any
experiment's ``results.json`` (compare, train, fig1, lr-sweep, init-sweep), so
``bnlab report RUN_DIR`` can rebuild a run folder from its saved numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .extras import need
from .train import atomic_write

COLORS = {"bn": "#1f77b4", "plain": "#d62728"}
LABELS = {"bn": "with BN", "plain": "without BN"}
PCT_STYLE = {"15": ":", "50": "-", "85": "--"}


def _pyplot():
    matplotlib = need("matplotlib", "plotting")
    matplotlib.use("Agg")
    return need("matplotlib.pyplot", "plotting")


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it."""

    def write(f):
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        _pyplot().close(fig)


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def moving_average(values, window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    window = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(window) / window, mode="valid")


def _fmt(v, spec=".3f"):
    return "never" if v is None else format(v, spec)


def _command(results) -> str:
    return results.get("environment", {}).get("command", "(not recorded)")


# --- compare / train -----------------------------------------------------------------------

EARLY_STEPS = (50, 100, 200)


def accuracy_at(run: dict, step: int):
    """Test accuracy at the last evaluation at or before ``step`` (None before the first)."""
    best = None
    for s, a in zip(run["eval_step"], run["test_accuracy"]):
        if s <= step:
            best = a
    return best


def plot_curves(results: dict, path) -> Path:
    """Test accuracy and smoothed training loss against steps for each run (bn / plain)."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results["runs"].items():
        ax_acc.plot(run["eval_step"], run["test_accuracy"], color=COLORS[name], label=LABELS[name])
        w = max(1, len(run["loss"]) // 50)
        ax_loss.plot(
            np.asarray(run["step"][w - 1 :]),
            moving_average(run["loss"], w),
            color=COLORS[name],
            label=LABELS[name],
        )
    target = results["config"].get("target")
    if target:
        ax_acc.axhline(target, color="gray", lw=0.8, ls="--")
    title = results.get("title", f"Seed CNN on {results['dataset']}")
    ax_acc.set(xlabel="training step", ylabel="test accuracy", title=f"{title}: test accuracy")
    lowest = min(min(r["test_accuracy"]) for r in results["runs"].values())
    ax_acc.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax_loss.set(
        xlabel="training step",
        ylabel="cross-entropy (moving average)",
        title="training loss",
        yscale="log",
    )
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def compare_table(results: dict) -> str:
    cfg, bn, plain = results["config"], results["runs"]["bn"], results["runs"]["plain"]
    rows = [
        (f"test accuracy at step {s}", accuracy_at(bn, s), accuracy_at(plain, s), ".3f")
        for s in EARLY_STEPS
        if s <= bn["step"][-1]
    ]
    rows += [
        ("final test accuracy", bn["final_test_accuracy"], plain["final_test_accuracy"], ".3f"),
        ("final test loss", bn["final_test_loss"], plain["final_test_loss"], ".3f"),
        (
            f"steps to {cfg['target']:.0%} test accuracy",
            bn["steps_to_target"],
            plain["steps_to_target"],
            "d",
        ),
        ("training steps", bn["step"][-1], plain["step"][-1], "d"),
        ("training time (s)", bn["seconds"], plain["seconds"], ".1f"),
    ]
    head = (
        f"seed CNN on {results['dataset']}: {cfg['optimizer']} lr={cfg['lr']} "
        f"batch={cfg['batch_size']} seed={cfg['seed']}"
    )
    lines = [head, f"{'':34s}{'with BN':>10s}{'without':>10s}"]
    lines += [f"{label:34s}{_fmt(a, spec):>10s}{_fmt(b, spec):>10s}" for label, a, b, spec in rows]
    return "\n".join(lines)


def _report_compare(results, folder):
    plot_curves(results, folder / "learning_curves.png")
    cfg = results["config"]
    write_text(
        folder / "report.md",
        f"""# Seed CNN with and without batch normalization

Command: `{_command(results)}`

Network: [conv 3x3 -> BN -> ReLU -> max-pool 2x2] x 2 -> linear, channels
{tuple(cfg["channels"])}; without BN the convolutions get their biases back. Same
initial weights (seed {cfg["seed"]}), same batches, same schedule.

```
{compare_table(results)}
```

![learning curves](learning_curves.png)
""",
    )
    return ["learning_curves.png", "report.md"]


def _report_train(results, folder):
    plot_curves(results, folder / "learning_curves.png")
    ((name, run),) = results["runs"].items()
    write_text(
        folder / "report.md",
        f"""# {results["title"]}, {LABELS[name]}

Command: `{_command(results)}`

Configuration: {results["config"]}

Final test accuracy {run["test_accuracy"][-1]:.4f}, test loss {run["test_loss"][-1]:.4f}
after {run["step"][-1]} steps ({run["seconds"]:.1f} s){"; DIVERGED" if run["diverged"] else ""}.

![learning curves](learning_curves.png)
""",
    )
    return ["learning_curves.png", "report.md"]


# --- fig1 ------------------------------------------------------------------------------------

FIG1_STEPS = (500, 1000, 2000, 5000, 10000, 20000, 50000)


def plot_fig1(results: dict, path) -> Path:
    """The paper's Figure 1: (a) test accuracy, (b) without BN and (c) with BN percentiles."""
    plt = _pyplot()
    runs, cfg = results["runs"], results["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("plain", "bn"):
        axes[0].plot(
            runs[name]["steps"],
            runs[name]["test_accuracy"],
            color=COLORS[name],
            label=LABELS[name],
        )
    axes[0].set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0].set_ylim(0, 1)
    axes[0].legend(loc="lower right")
    values = [v for r in runs.values() for s in r["percentiles"].values() for v in s]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 1)
    for ax, name, letter in ((axes[1], "plain", "b"), (axes[2], "bn", "c")):
        run = runs[name]
        for p, series in run["percentiles"].items():
            ax.plot(
                run["probe_steps"],
                series,
                color=COLORS[name],
                ls=PCT_STYLE[p],
                label=f"{p}th percentile",
            )
        ax.set(
            xlabel="training step",
            ylabel=f"input to sigmoid #{cfg['unit']} of layer 3",
            title=f"({letter}) {LABELS[name]}",
            ylim=(lo - pad, hi + pad),
        )
        ax.legend(loc="best", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Ioffe & Szegedy (2015) Figure 1 on {results['dataset']}: MLP 784-100-100-100-10, "
        f"sigmoid, N(0, {cfg['weight_std']}²) weights, batch {cfg['batch_size']}, "
        f"SGD lr {cfg['lr']}",
        fontsize=10,
    )
    return save_figure(fig, path)


def fig1_tables(results: dict) -> str:
    runs, cfg = results["runs"], results["config"]
    evaluated = runs["bn"]["steps"]
    # the last evaluated step at or before each mark, so every column is a real evaluation
    marks = sorted(
        {
            max((s for s in evaluated if s <= m), default=evaluated[0])
            for m in FIG1_STEPS
            if m < evaluated[-1]
        }
        | {evaluated[-1]}
    )
    lines = [f"{'test accuracy at step':24s}" + "".join(f"{s:>8d}" for s in marks)]
    for name in ("bn", "plain"):
        by_step = dict(zip(runs[name]["steps"], runs[name]["test_accuracy"]))
        lines.append(f"{LABELS[name]:24s}" + "".join(f"{_fmt(by_step.get(s)):>8s}" for s in marks))
    lines.append("")
    lines.append(
        f"movement of sigmoid #{cfg['unit']}'s input percentiles after the first 10% "
        "of training (range = max - min)"
    )
    lines.append(f"{'':24s}{'without BN':>12s}{'with BN':>10s}")
    for p in ("15", "50", "85"):
        a, b = runs["plain"]["stability"][p]["range"], runs["bn"]["stability"][p]["range"]
        lines.append(f"{p + 'th percentile range':24s}{a:12.3f}{b:10.3f}")
    a, b = runs["plain"]["median_range_all_units"], runs["bn"]["median_range_all_units"]
    lines.append(
        f"{'median over 100 units':24s}{a:12.3f}{b:10.3f}   (range of each unit's median)"
    )
    return "\n".join(lines)


def _report_fig1(results, folder):
    plot_fig1(results, folder / "fig1.png")
    cfg = results["config"]
    write_text(
        folder / "report.md",
        f"""# Ioffe & Szegedy (2015), Figure 1, reproduced

Command: `{_command(results)}`

Dataset {results["dataset"]}; MLP 784-100-100-100-10 with sigmoid nonlinearities; every
weight drawn from N(0, {cfg["weight_std"]}²), biases 0; BN (when on) between each affine
map and its sigmoid, the affine maps then without bias; batch {cfg["batch_size"]}; plain SGD
with learning rate {cfg["lr"]}; {cfg["steps"]} steps; seed {cfg["seed"]} for weights and
batches, the same for both networks. Test accuracy every {cfg["eval_every"]} steps on the
test split. Percentiles: every {cfg["probe_every"]} steps, {cfg["probe_size"]} test images
are pushed through the network in evaluation mode and the 15th, 50th and 85th percentiles
of the input to sigmoid #{cfg["unit"]} of the last hidden layer are recorded.

![Figure 1](fig1.png)

```
{fig1_tables(results)}
```

The paper's Figure 1: (a) the network with BN trains faster and reaches higher test
accuracy; (b, c) without BN the distribution of a sigmoid's input shifts over training,
with BN it stays put.
""",
    )
    return ["fig1.png", "report.md"]


# --- sweeps ----------------------------------------------------------------------------------


def _sweep_key(results):
    return "lr" if results["experiment"] == "lr-sweep" else "weight_std"


def _sweep_grid(results):
    """Rows (activation, bn) -> {value: run}, in a fixed order."""
    key = _sweep_key(results)
    rows = {}
    for run in results["runs"]:
        rows.setdefault((run["activation"], run["bn"]), {})[run[key]] = run
    return rows


def sweep_table(results) -> str:
    key = _sweep_key(results)
    rows = _sweep_grid(results)
    values = sorted({v for r in rows.values() for v in r})
    labels = [f"{key}={format(v, 'g')}" for v in values]
    width = max(12, *(len(t) + 2 for t in labels))
    head = f"{'final test accuracy':22s}" + "".join(f"{t:>{width}s}" for t in labels)
    lines = [head]
    for (act, bn), by_value in rows.items():
        cells = []
        for v in values:
            run = by_value.get(v)
            cell = (
                "-"
                if run is None
                else f"{run['final_test_accuracy']:.3f}" + ("*" if run["diverged"] else "")
            )
            cells.append(f"{cell:>{width}s}")
        lines.append(f"{act + (' + BN' if bn else ''):22s}" + "".join(cells))
    lines.append(
        "* diverged (loss became NaN/inf); the accuracy is that of the network where it stopped"
    )
    return "\n".join(lines)


def plot_lr_sweep(results, path) -> Path:
    """Heatmap: rows = activation x BN, columns = learning rate, colour = final accuracy."""
    plt = _pyplot()
    rows = _sweep_grid(results)
    lrs = sorted({v for r in rows.values() for v in r})
    grid = np.array([[rows[k][lr]["final_test_accuracy"] for lr in lrs] for k in rows])
    fig, ax = plt.subplots(figsize=(1.3 * len(lrs) + 2.5, 0.8 * len(rows) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, k in enumerate(rows):
        for j, lr in enumerate(lrs):
            run = rows[k][lr]
            text = f"{run['final_test_accuracy']:.2f}" + ("\ndiverged" if run["diverged"] else "")
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if run["final_test_accuracy"] < 0.6 else "black",
            )
    ax.set_xticks(range(len(lrs)), [format(v, "g") for v in lrs])
    ax.set_yticks(range(len(rows)), [f"{a}{' + BN' if bn else ''}" for a, bn in rows])
    ax.set(
        xlabel="learning rate (plain SGD)",
        title=f"Final test accuracy after {results['config']['steps']} steps ({results['dataset']})",
    )
    fig.colorbar(im, ax=ax, label="test accuracy")
    return save_figure(fig, path)


def plot_init_sweep(results, path) -> Path:
    """Grouped bars: one group per weight scale, one bar per activation x BN."""
    plt = _pyplot()
    rows = _sweep_grid(results)
    stds = sorted({v for r in rows.values() for v in r})
    fig, ax = plt.subplots(figsize=(2.2 * len(stds) + 2, 4))
    width = 0.8 / len(rows)
    palette = {
        ("sigmoid", False): "#f4a582",
        ("sigmoid", True): "#92c5de",
        ("relu", False): "#ca0020",
        ("relu", True): "#0571b0",
    }
    for i, k in enumerate(rows):
        accs = [rows[k][s]["final_test_accuracy"] for s in stds]
        xs = np.arange(len(stds)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(xs, accs, width, label=f"{k[0]}{' + BN' if k[1] else ''}", color=palette.get(k))
        for x, s, a in zip(xs, stds, accs):
            label = f"{a:.2f}" + ("\ndiv." if rows[k][s]["diverged"] else "")
            ax.text(x, a + 0.01, label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(stds)), [f"std {format(s, 'g')}" for s in stds])
    ax.set(
        ylim=(0, 1.12),
        ylabel="final test accuracy",
        title=f"Initial weight scale, lr {results['config']['lr']}, "
        f"{results['config']['steps']} steps ({results['dataset']})",
    )
    ax.legend(loc="upper right", fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _report_sweep(results, folder):
    lr_sweep = results["experiment"] == "lr-sweep"
    name = "lr_sweep.png" if lr_sweep else "init_sweep.png"
    (plot_lr_sweep if lr_sweep else plot_init_sweep)(results, folder / name)
    cfg = results["config"]
    what = (
        "learning rates "
        + ", ".join(format(v, "g") for v in cfg["lrs"])
        + (
            f", weights N(0, {cfg['weight_std']}²)"
            if cfg.get("weight_std")
            else ", weights Xavier-normal (sigmoid) / He-normal (ReLU)"
        )
        if lr_sweep
        else "weights N(0, std²) with std "
        + ", ".join(format(v, "g") for v in cfg["weight_stds"])
        + f", learning rate {cfg['lr']}"
    )
    write_text(
        folder / "report.md",
        f"""# {"Learning-rate" if lr_sweep else "Initialization"} sweep, with and without BN

Command: `{_command(results)}`

The paper's MLP 784-100-100-100-10 on {results["dataset"]}, sigmoid and ReLU, with and
without BN; {what}; batch {cfg["batch_size"]}, plain SGD, {cfg["steps"]} steps, seed
{cfg["seed"]}. A run whose loss becomes NaN or inf stops and is marked diverged.

![sweep]({name})

```
{sweep_table(results)}
```
""",
    )
    return [name, "report.md"]


# --- small batches ---------------------------------------------------------------------------

VARIANT_LABELS = {"bn": "BN", "ghost": "ghost BN", "renorm": "batch renorm"}
VARIANT_COLORS = {"bn": "#ca0020", "ghost": "#f4a582", "renorm": "#0571b0"}


def small_batch_table(results) -> str:
    rows = sorted(results["summary"], key=lambda r: (r["batch_size"], r["variant"]))
    lines = [
        f"{'batch':>6s}  {'variant':14s}{'eval accuracy':>18s}{'batch-stats acc.':>20s}"
        f"{'gap (batch - eval)':>22s}"
    ]
    for r in rows:
        lines.append(
            f"{r['batch_size']:6d}  {VARIANT_LABELS[r['variant']]:14s}"
            f"{r['eval_accuracy']:11.4f} ± {r['eval_accuracy_std']:.4f}"
            f"{r['batch_stats_accuracy']:13.4f} ± {r['batch_stats_accuracy_std']:.4f}"
            f"{r['train_eval_gap']:+15.4f} ± {r['train_eval_gap_std']:.4f}"
        )
    lines.append(
        f"mean ± standard deviation over {rows[0]['seeds']} seeds; eval: running "
        "statistics; batch-stats: each test mini-batch normalized by its own statistics"
    )
    return "\n".join(lines)


def plot_small_batch(results, path) -> Path:
    plt = _pyplot()
    rows = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANT_LABELS:
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch_size"])
        if not rs:
            continue
        b = [r["batch_size"] for r in rs]
        for ax, key in zip(axes, ("eval_accuracy", "train_eval_gap")):
            ax.errorbar(
                b,
                [r[key] for r in rs],
                yerr=[r[key + "_std"] for r in rs],
                marker="o",
                capsize=3,
                label=VARIANT_LABELS[variant],
                color=VARIANT_COLORS[variant],
            )
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({r["batch_size"] for r in rows}),
            [str(b) for b in sorted({r["batch_size"] for r in rows})],
        )
        ax.set_xlabel("batch size (same samples seen)")
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="test accuracy, evaluation mode", title="Accuracy with running statistics")
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set(ylabel="accuracy gap (batch stats − eval)", title="Train/eval gap")
    fig.subplots_adjust(wspace=0.35)
    axes[0].legend()
    model = "Paper's MLP" if results["config"].get("model") == "mlp" else "Seed CNN"
    fig.suptitle(
        f"{model} on {results['dataset']}, {results['config']['samples']} samples per run"
    )
    return save_figure(fig, path)


def _report_small_batch(results, folder):
    plot_small_batch(results, folder / "small_batch.png")
    cfg = results["config"]
    write_text(
        folder / "report.md",
        f"""# Small batches: BN, ghost BN and batch renorm ({results["dataset"]})

Command: `{_command(results)}`

The {"paper's MLP" if cfg.get("model") == "mlp" else "seed CNN"} trained on {cfg["samples"]} samples at each batch size (plain SGD, learning
rate {cfg["lr32"]} × batch/32), seeds {list(cfg["seeds"])}. Ghost BN normalizes over
virtual batches of {cfg["virtual_batch_size"]}; batch renorm uses rmax {cfg["rmax"]}, dmax
{cfg["dmax"]}. Evaluation mode uses the running statistics; "batch-stats" normalizes each
test mini-batch of the training batch size by its own statistics.

```
{small_batch_table(results)}
```

![small batches](small_batch.png)
""",
    )
    return ["small_batch.png", "report.md"]


# --- regularization --------------------------------------------------------------------------


def _reg_label(r) -> str:
    return f"{'BN' if r['bn'] else 'no BN'}, {'dropout' if r['dropout'] else 'no dropout'}"


def regularization_table(results) -> str:
    rows = sorted(results["summary"], key=lambda r: (r["model"], r["bn"], r["dropout"]))
    lines = [
        f"{'model':6s}{'configuration':24s}{'train acc':>18s}{'test acc':>18s}"
        f"{'gap (train - test)':>22s}{'test loss':>16s}"
    ]
    for r in rows:
        lines.append(
            f"{r['model']:6s}{_reg_label(r):24s}"
            f"{r['final_train_accuracy']:11.4f} ± {r['final_train_accuracy_std']:.4f}"
            f"{r['final_test_accuracy']:11.4f} ± {r['final_test_accuracy_std']:.4f}"
            f"{r['gap']:15.4f} ± {r['gap_std']:.4f}"
            f"{r['final_test_loss']:9.3f} ± {r['final_test_loss_std']:.3f}"
        )
    lines.append(
        f"after {results['config']['epochs']} epochs; mean ± standard deviation over "
        f"{rows[0]['seeds']} seeds; accuracies in evaluation mode on the whole splits"
    )
    return "\n".join(lines)


def plot_regularization(results, path) -> Path:
    """Per model: mean test accuracy per epoch for each configuration (train dashed)."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(r["model"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    colors = {
        (False, False): "#999999",
        (False, True): "#f4a582",
        (True, False): "#0571b0",
        (True, True): "#92c5de",
    }
    for ax, kind in zip(axes[0], kinds):
        for (bn, dropout), color in colors.items():
            rs = [
                r
                for r in results["runs"]
                if (r["model"], r["bn"], r["dropout"]) == (kind, bn, dropout)
            ]
            if not rs:
                continue
            epochs = rs[0]["epoch"]
            label = _reg_label({"bn": bn, "dropout": dropout})
            ax.plot(
                epochs,
                np.mean([r["test_accuracy"] for r in rs], axis=0),
                color=color,
                label=f"{label}: test",
            )
            ax.plot(
                epochs,
                np.mean([r["train_accuracy"] for r in rs], axis=0),
                color=color,
                ls="--",
                lw=1,
            )
        ax.set(
            xlabel="epoch",
            ylabel="accuracy (dashed: training split)",
            title=f"{'seed CNN' if kind == 'cnn' else 'MLP (ReLU)'} on {results['dataset']}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def _report_regularization(results, folder):
    plot_regularization(results, folder / "regularization.png")
    cfg = results["config"]
    write_text(
        folder / "report.md",
        f"""# Does BN regularize? ({results["dataset"]})

Command: `{_command(results)}`

{", ".join(cfg["models"])}; BN on/off × dropout ({cfg["dropout"]}) on/off; seeds
{list(cfg["seeds"])}; {cfg["epochs"]} epochs of plain SGD (lr {cfg["lr"]}, batch
{cfg["batch_size"]}), trained with bnlab.torch. The gap is training minus test accuracy at
the end.

```
{regularization_table(results)}
```

![regularization](regularization.png)
""",
    )
    return ["regularization.png", "report.md"]


# --- internal covariate shift ------------------------------------------------------------------


def ics_table(results) -> str:
    lines = [
        f"{'':10s}{'final test acc':>16s}{'mean drift':>12s}{'var drift':>12s}"
        f"{'p15/p50/p85 drift':>22s}{'loss range':>13s}{'grad change':>13s}"
        f"{'|grad|':>10s}{'relative':>10s}"
    ]
    for run in results["runs"]:
        d = list(run["drift"].values())
        mean = np.mean([v["mean"] for v in d])
        var = np.mean([v["var"] for v in d])
        pct = np.mean([[v["p15"], v["p50"], v["p85"]] for v in d], axis=0)
        skip = 1  # the first probe is at step 1, before training moved anything
        lines.append(
            f"{run['config']:10s}{run['final_test_accuracy']:16.4f}{mean:12.4f}"
            f"{var:12.4f}{'/'.join(f'{p:.3f}' for p in pct):>22s}"
            f"{np.mean(run['loss_range'][skip:]):13.4f}"
            f"{np.mean(run['grad_change'][skip:]):13.4f}"
            f"{np.mean(run['grad_norm'][skip:]):10.4f}"
            f"{np.mean(run['relative_grad_change'][skip:]):10.4f}"
        )
    lines.append(
        "drift: mean over hidden layers and units of the change of each statistic of the "
        "next layer's input between probes; loss range and gradient change along the "
        "gradient (and the gradient change relative to |grad|), averaged over probes "
        "after the first"
    )
    return "\n".join(lines)


def plot_ics(results, path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    colors = {"standard": "#999999", "bn": "#0571b0", "noisy bn": "#ca0020"}
    for run in results["runs"]:
        c = colors.get(run["config"])
        unit = run.get("unit_percentiles")
        if unit:  # the next layer's input for one unit: 15/50/85th percentiles (Fig. 2)
            for q, ls in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                axes[3].plot(
                    run["step"],
                    unit[q],
                    color=c,
                    ls=ls,
                    label=run["config"] if q == "p50" else None,
                )
        axes[0].plot(run["step"], run["test_accuracy"], color=c, label=run["config"])
        axes[1].plot(run["step"][1:], run["loss_range"][1:], color=c, label=run["config"])
        axes[2].plot(run["step"][1:], run["grad_change"][1:], color=c, label=run["config"])
    axes[0].set(xlabel="step", ylabel="test accuracy", title="Training speed")
    axes[1].set(
        xlabel="step",
        ylabel="max − min loss along the gradient",
        yscale="log",
        title="Loss landscape (cf. Santurkar et al. Fig. 4a)",
    )
    axes[2].set(
        xlabel="step",
        ylabel="max ‖∇L(θ − ηg) − ∇L(θ)‖",
        yscale="log",
        title="Gradient predictiveness (Fig. 4b)",
    )
    axes[3].set(
        xlabel="step",
        ylabel="15/50/85th percentile",
        title="A unit's output, last hidden layer (cf. Fig. 2)",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.4)
    return save_figure(fig, path)


def _report_ics(results, folder):
    plot_ics(results, folder / "ics.png")
    cfg = results["config"]
    write_text(
        folder / "report.md",
        f"""# Internal covariate shift and the landscape ({results["dataset"]})

Command: `{_command(results)}`

The paper's MLP (sigmoid), {cfg["steps"]} steps of SGD (lr {cfg["lr"]}, batch
{cfg["batch_size"]}), in float64 with bnlab.torch: without BN, with BN, and with "noisy BN"
(after every BN layer, y·s + m with s = exp({cfg["noise"]}·N(0,1)) and m =
{cfg["noise"]}·N(0,1) per unit, redrawn every step). Every {cfg["probe_every"]} steps, on
{cfg["probe_size"]} training images: each hidden layer's output distribution (the next
layer's input); and along the gradient g at step sizes {list(cfg["step_sizes"])} × lr,
the range of the loss and the largest change of the gradient.

```
{ics_table(results)}
```

![ics](ics.png)
""",
    )
    return ["ics.png", "report.md"]


WRITERS = {
    "compare": _report_compare,
    "train": _report_train,
    "fig1": _report_fig1,
    "lr-sweep": _report_sweep,
    "init-sweep": _report_sweep,
    "small-batch": _report_small_batch,
    "regularization": _report_regularization,
    "ics": _report_ics,
}


def write_report(results: dict, folder) -> list[str]:
    """Draw the figures and write report.md for ``results`` into ``folder``; return names."""
    experiment = results.get("experiment")
    if experiment not in WRITERS:
        raise ValueError(
            f"results.json describes experiment {experiment!r}; expected one of {sorted(WRITERS)}"
        )
    return WRITERS[experiment](results, Path(folder))


def summary(results: dict) -> str:
    """The terminal table for an experiment."""
    experiment = results["experiment"]
    if experiment == "compare":
        return compare_table(results)
    if experiment == "fig1":
        return fig1_tables(results)
    if experiment in ("lr-sweep", "init-sweep"):
        return sweep_table(results)
    if experiment == "small-batch":
        return small_batch_table(results)
    if experiment == "regularization":
        return regularization_table(results)
    if experiment == "ics":
        return ics_table(results)
    ((name, run),) = results["runs"].items()
    return f"{name}: final test accuracy {run['test_accuracy'][-1]:.4f}"


def regenerate(run_folder) -> list[str]:
    """``bnlab report RUN_DIR``: rebuild figures and report.md from RUN_DIR/results.json."""
    import json

    folder = Path(run_folder)
    path = folder / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a bnlab run folder")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    return write_report(results, folder)
