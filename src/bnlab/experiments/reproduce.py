"""The paper's evidence (Ioffe & Szegedy 2015, section 4.1) on real digits.

* ``fig1``: the MLP 784-100-100-100-10 with sigmoids, weights from a small Gaussian, batch
  60, plain SGD, with and without BN: (a) test accuracy against steps, (b, c) the 15th,
  50th and 85th percentiles of one sigmoid input of the last hidden layer during training.
* ``lr-sweep``: final test accuracy over learning rates, sigmoid and ReLU, with and without BN.
* ``init-sweep``: the same over initial weight scales.
* ``ics``: internal covariate shift, measured (per-layer input drift), against Santurkar et
  al.'s view: noisy BN, and the loss landscape along the gradient.
* ``regularization``: does BN regularize? The MLP and the seed CNN, BN on/off x dropout
  on/off, several seeds, until the training accuracy saturates: the generalization gap.
* ``small-batch``: why the BN variants exist: the seed CNN at batch sizes 2 to 32 (the same
  samples seen) with BN, ghost BN and batch renorm, several seeds; accuracy in evaluation
  mode, with batch statistics, and the gap.

Each writes ``results.json``, PNG figures and ``report.md`` into a run folder;
``bnlab report RUN_DIR`` rebuilds figures and report from ``results.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import data as datasets
from .. import models, nn
from ..extras import need
from ..train import fit
from .runs import environment, finish

PERCENTILES = (15, 50, 85)


# --- Figure 1 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fig1Config:
    dataset: str = "mnist-5k"
    steps: int = 20000  # the paper: 50000 on full MNIST
    batch_size: int = 60  # the paper's
    lr: float = 0.1
    weight_std: float = 0.05  # "small random Gaussian values"
    seed: int = 0
    eval_every: int = 200
    probe_every: int = 100
    probe_size: int = 1000  # test images pushed through the probe
    unit: int = 0  # which sigmoid of the last hidden layer is plotted


def last_sigmoid_input(model: nn.Sequential, x: np.ndarray) -> np.ndarray:
    """(N, units) input of the last hidden nonlinearity, in evaluation mode.

    For the BN network this is BN's output; without BN it is the affine output.
    """
    acts = [i for i, layer in enumerate(model) if isinstance(layer, (nn.Sigmoid, nn.ReLU))]
    was_training = model.training
    model.eval()
    try:
        h = x
        for layer in list(model)[: acts[-1]]:
            h = layer(h)
    finally:
        model.train(was_training)
    return h


def after_warmup(steps, skip_fraction: float = 0.1) -> np.ndarray:
    """Mask of the probe points after the first ``skip_fraction`` of training."""
    steps = np.asarray(steps)
    return steps >= steps[-1] * skip_fraction


def percentile_stability(steps, series: dict) -> dict:
    """How much each percentile moves after the first 10% of training: range (max - min)
    and standard deviation over the probe points."""
    keep = after_warmup(steps)
    out = {}
    for p, values in series.items():
        v = np.asarray(values)[keep]
        out[p] = {"range": float(v.max() - v.min()), "std": float(v.std())}
    return out


def run_fig1(config: Fig1Config, out=None, progress: bool = True, print_fn=print) -> dict:
    if not 0 <= config.unit < 100:
        raise ValueError(
            f"unit must be one of the 100 last-layer sigmoids (0..99), got {config.unit}"
        )
    data = datasets.load(config.dataset)
    C, S, _ = data.image_shape
    probe_x = data.test[0][: config.probe_size]
    runs = {}
    for name, bn in (("bn", True), ("plain", False)):
        model = models.paper_mlp(
            bn=bn,
            activation="sigmoid",
            in_features=C * S * S,
            num_classes=data.num_classes,
            weight_std=config.weight_std,
            seed=config.seed,
        )
        probe_steps: list[int] = []
        pct_unit: dict[str, list[float]] = {str(p): [] for p in PERCENTILES}
        drift: list[list[float]] = []

        def probe(step, model):
            if step % config.probe_every and step != 1:
                return
            z = last_sigmoid_input(model, probe_x)  # (probe_size, 100)
            q = np.percentile(z, PERCENTILES, axis=0)  # (3, 100)
            probe_steps.append(step)
            for p, row in zip(PERCENTILES, q):
                pct_unit[str(p)].append(float(row[config.unit]))
            drift.append(q[1].tolist())  # medians of all units

        hist = fit(
            model,
            data,
            steps=config.steps,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=config.seed,
            eval_every=config.eval_every,
            progress=progress,
            desc=f"fig1 MLP, {'with' if bn else 'without'} BN",
            callback=probe,
        )
        medians = np.asarray(drift)[after_warmup(probe_steps)]  # (probes, 100)
        runs[name] = {
            "steps": hist.eval_step,
            "test_accuracy": hist.test_accuracy,
            "test_loss": hist.test_loss,
            "diverged": hist.diverged,
            "seconds": hist.seconds,
            "train_loss_every_100": [
                float(np.mean(hist.loss[i : i + 100])) for i in range(0, len(hist.loss), 100)
            ],
            "probe_steps": probe_steps,
            "percentiles": pct_unit,
            "stability": percentile_stability(probe_steps, pct_unit),
            # over all 100 sigmoids: range of each one's median after 10% of training
            "median_range_all_units": float(np.median(np.ptp(medians, axis=0))),
        }
    results = {
        "experiment": "fig1",
        "dataset": data.name,
        "config": asdict(config),
        "runs": runs,
        "environment": environment(),
    }
    return finish(results, out, "fig1", print_fn)


# --- sweeps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LrSweepConfig:
    dataset: str = "mnist-5k"
    lrs: tuple = (0.01, 0.03, 0.1, 0.3, 1.0, 2.0)
    activations: tuple = ("sigmoid", "relu")
    weight_std: float | None = None  # None: Xavier (sigmoid) / He (ReLU)
    steps: int = 3000
    batch_size: int = 60
    seed: int = 0
    eval_every: int = 500


@dataclass(frozen=True)
class InitSweepConfig:
    dataset: str = "mnist-5k"
    weight_stds: tuple = (0.05, 0.5, 5.0)
    activations: tuple = ("sigmoid", "relu")
    lr: float = 0.1
    steps: int = 3000
    batch_size: int = 60
    seed: int = 0
    eval_every: int = 500


def _sweep(experiment: str, config, values, key: str, out, progress, print_fn) -> dict:
    """Train the MLP for every (activation, BN on/off, value of ``key``)."""
    data = datasets.load(config.dataset)
    C, S, _ = data.image_shape
    runs = []
    grid = [(a, bn, v) for a in config.activations for bn in (False, True) for v in values]
    for i, (act, bn, value) in enumerate(grid, 1):
        std = value if key == "weight_std" else config.weight_std
        lr = value if key == "lr" else config.lr
        model = models.paper_mlp(
            bn=bn,
            activation=act,
            in_features=C * S * S,
            num_classes=data.num_classes,
            weight_std=std,
            seed=config.seed,
        )
        hist = fit(
            model,
            data,
            steps=config.steps,
            lr=lr,
            batch_size=config.batch_size,
            seed=config.seed,
            eval_every=config.eval_every,
            progress=progress,
            desc=f"{experiment} {i}/{len(grid)}: {act}, {'BN' if bn else 'plain'}, {key}={value}",
        )
        runs.append(
            {
                "activation": act,
                "bn": bn,
                key: value,
                "lr": lr,
                "weight_std": std,
                "steps": hist.eval_step,
                "test_accuracy": hist.test_accuracy,
                "final_test_accuracy": hist.test_accuracy[-1],
                "final_test_loss": hist.test_loss[-1],
                "diverged": hist.diverged,
                "stopped_at": hist.step[-1],
                "seconds": hist.seconds,
            }
        )
    results = {
        "experiment": experiment,
        "dataset": data.name,
        "config": asdict(config),
        "runs": runs,
        "environment": environment(),
    }
    return finish(results, out, experiment, print_fn)


def run_lr_sweep(config: LrSweepConfig, out=None, progress=True, print_fn=print) -> dict:
    return _sweep("lr-sweep", config, config.lrs, "lr", out, progress, print_fn)


def run_init_sweep(config: InitSweepConfig, out=None, progress=True, print_fn=print) -> dict:
    return _sweep("init-sweep", config, config.weight_stds, "weight_std", out, progress, print_fn)


# --- small batches: why the BN variants exist ----------------------------------------------


@dataclass(frozen=True)
class SmallBatchConfig:
    dataset: str = "mnist-5k"
    model: str = "cnn"  # "cnn": the seed CNN; "mlp": the paper's MLP (BatchNorm1d)
    batch_sizes: tuple = (2, 4, 8, 32)
    variants: tuple = ("bn", "ghost", "renorm")
    seeds: tuple = (0, 1, 2)
    samples: int = 8000  # training samples seen per run, whatever the batch size
    lr32: float = 0.1  # SGD learning rate at batch 32, scaled linearly with the batch
    virtual_batch_size: int = 2  # ghost BN: statistics over 2 samples at every batch size
    rmax: float = 3.0  # batch renorm's limits (the paper's final values)
    dmax: float = 5.0


from ..report import VARIANT_LABELS  # noqa: E402


def with_variant(model: nn.Sequential, variant: str, config: SmallBatchConfig) -> nn.Sequential:
    """``model`` with every BatchNorm1d/2d replaced (in place) by the variant's layer, same
    parameters and state."""
    if variant == "bn":
        return model
    for name, layer in list(model._modules.items()):
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            two_d = isinstance(layer, nn.BatchNorm2d)
            new: nn.Module
            if variant == "ghost":
                ghost = nn.GhostBatchNorm2d if two_d else nn.GhostBatchNorm1d
                new = ghost(
                    layer.num_features, config.virtual_batch_size, layer.eps, layer.momentum
                )
            elif variant == "renorm":
                renorm = nn.BatchRenorm2d if two_d else nn.BatchRenorm1d
                new = renorm(
                    layer.num_features,
                    layer.eps,
                    layer.momentum,
                    rmax=config.rmax,
                    dmax=config.dmax,
                )
            else:
                raise ValueError(
                    f"variant must be one of {sorted(VARIANT_LABELS)}, got {variant!r}"
                )
            for mine, theirs in ((new.weight, layer.weight), (new.bias, layer.bias)):
                if mine is not None and theirs is not None:
                    mine.data[...] = theirs.data
            model._modules[name] = new
            object.__setattr__(model, name, new)
    return model


def batch_statistics_accuracy(model: nn.Sequential, data, batch_size: int) -> float:
    """Test accuracy with each test mini-batch of ``batch_size`` normalized by its own
    statistics (training-mode BN), on a copy: the running statistics are not touched."""
    import copy

    from ..data import iterate_batches

    net = copy.deepcopy(model).train()
    images, labels = data.test
    correct = total = 0
    with np.errstate(all="ignore"):
        for xb, yb in iterate_batches(
            images, labels, batch_size, shuffle=True, drop_last=True, rng=0
        ):
            correct += int((net(xb).argmax(axis=1) == yb).sum())
            total += len(yb)
    return correct / total


def run_small_batch(
    config: SmallBatchConfig, out=None, progress: bool = True, print_fn=print
) -> dict:
    """The seed CNN (or the paper's MLP) on the embedded digits at each batch size (the same
    number of samples seen), with BN, ghost BN and batch renorm, several seeds: test
    accuracy in evaluation mode (running statistics), with batch statistics, and their
    gap."""
    data = datasets.load(config.dataset)
    C, S, _ = data.image_shape
    runs = []
    grid = [(v, b, s) for b in config.batch_sizes for v in config.variants for s in config.seeds]
    for i, (variant, batch, seed) in enumerate(grid, 1):
        if variant == "ghost" and batch % config.virtual_batch_size:
            raise ValueError(
                f"batch size {batch} is not a multiple of the ghost batches' "
                f"virtual_batch_size={config.virtual_batch_size}"
            )
        if config.model == "cnn":
            net = models.seed_cnn(
                in_channels=C, image_size=S, num_classes=data.num_classes, seed=seed
            )
        elif config.model == "mlp":
            net = models.paper_mlp(in_features=C * S * S, num_classes=data.num_classes, seed=seed)
        else:
            raise ValueError(f'model must be "cnn" or "mlp", got {config.model!r}')
        model = with_variant(net, variant, config)
        steps = config.samples // batch
        lr = config.lr32 * batch / 32
        hist = fit(
            model,
            data,
            steps=steps,
            lr=lr,
            batch_size=batch,
            seed=seed,
            eval_every=steps,
            progress=progress,
            desc=f"small-batch {i}/{len(grid)}: {VARIANT_LABELS[variant]}, batch "
            f"{batch}, seed {seed}",
        )
        batch_acc = batch_statistics_accuracy(model, data, batch)
        runs.append(
            {
                "variant": variant,
                "batch_size": batch,
                "seed": seed,
                "lr": lr,
                "steps": steps,
                "eval_accuracy": hist.test_accuracy[-1],
                "eval_loss": hist.test_loss[-1],
                "batch_stats_accuracy": batch_acc,
                "train_eval_gap": batch_acc - hist.test_accuracy[-1],
                "diverged": hist.diverged,
                "seconds": hist.seconds,
            }
        )
    results = {
        "experiment": "small-batch",
        "dataset": data.name,
        "config": asdict(config),
        "runs": runs,
        "summary": summarize_small_batch(runs),
        "environment": environment(),
    }
    return finish(results, out, "small-batch", print_fn)


def summarize_over_seeds(runs, by: tuple, values: tuple) -> list[dict]:
    """One row per value of the ``by`` fields: the number of seeds, and the mean and
    standard deviation (``<key>_std``, ddof 1) of each of ``values`` over them."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(by, key), seeds=len(rs))
        for name in values:
            v = np.array([r[name] for r in rs])
            row[name] = float(v.mean())
            row[name + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    return rows


def summarize_small_batch(runs) -> list[dict]:
    """Mean and standard deviation over seeds per (variant, batch size)."""
    return summarize_over_seeds(
        runs,
        ("variant", "batch_size"),
        ("eval_accuracy", "batch_stats_accuracy", "train_eval_gap"),
    )


# --- regularization: does BN regularize? -----------------------------------------------------


@dataclass(frozen=True)
class RegularizationConfig:
    dataset: str = "mnist-5k"
    models: tuple = ("mlp", "cnn")
    seeds: tuple = (0, 1, 2)
    epochs: int = 30  # enough for the training accuracy to saturate
    batch_size: int = 64
    lr: float = 0.05  # plain SGD
    dropout: float = 0.5  # where dropout is on: after each hidden layer / before the head


def with_dropout(model: nn.Sequential, kind: str, p: float, seed: int) -> nn.Sequential:
    """``model`` with Dropout(p) after every hidden activation (MLP) or before the final
    Linear (CNN): a new Sequential holding the same layers."""
    layers = list(model)
    rng = np.random.default_rng(seed)
    out = []
    for i, layer in enumerate(layers):
        out.append(layer)
        last_hidden = kind == "cnn" and isinstance(layer, nn.Flatten)
        hidden_act = (
            kind == "mlp" and isinstance(layer, (nn.ReLU, nn.Sigmoid)) and i < len(layers) - 1
        )
        if last_hidden or hidden_act:
            out.append(nn.Dropout(p, rng=rng))
    return nn.Sequential(*out)


def _regularization_run(kind, bn, dropout, seed, data, config, progress, desc):
    """One network trained with the torch engine (bnlab's BN): per-epoch training and test
    loss and accuracy, both in evaluation mode, over the whole splits."""
    import torch

    from .. import torch as bt
    from ..data import iterate_batches
    from .torch_train import _evaluate

    C, S, _ = data.image_shape
    if kind == "cnn":
        ref = models.seed_cnn(
            bn=bn, in_channels=C, image_size=S, num_classes=data.num_classes, seed=seed
        )
    else:
        ref = models.paper_mlp(
            bn=bn,
            activation="relu",
            in_features=C * S * S,
            num_classes=data.num_classes,
            seed=seed,
        )
    if dropout:
        ref = with_dropout(ref, kind, config.dropout, seed)
    torch.manual_seed(seed)
    net = bt.convert(bt.models.twin(ref))
    opt = torch.optim.SGD(net.parameters(), lr=config.lr)
    rng = np.random.default_rng(seed)
    curves = {
        k: [] for k in ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
    }
    tqdm = need("tqdm.auto", "the progress bar").tqdm

    for epoch in tqdm(
        range(1, config.epochs + 1), desc=desc, disable=not progress, leave=False, unit="epoch"
    ):
        net.train()
        for xb, yb in iterate_batches(
            *data.train, config.batch_size, shuffle=True, drop_last=True, rng=rng
        ):
            loss = torch.nn.functional.cross_entropy(
                net(torch.from_numpy(xb)), torch.from_numpy(yb).long()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        train, test = _evaluate(net, *data.train, "cpu"), _evaluate(net, *data.test, "cpu")
        curves["epoch"].append(epoch)
        for split, ev in (("train", train), ("test", test)):
            curves[f"{split}_loss"].append(ev["loss"])
            curves[f"{split}_accuracy"].append(ev["accuracy"])
    return curves


def run_regularization(
    config: RegularizationConfig, out=None, progress: bool = True, print_fn=print
) -> dict:
    """The MLP (ReLU) and the seed CNN, BN on/off x dropout on/off, several seeds, on the
    embedded digits (4,000 training images: small enough to overfit): training and test
    accuracy and loss per epoch, and the generalization gap at the end."""
    for kind in config.models:
        if kind not in ("mlp", "cnn"):
            raise ValueError(f'models must be "mlp" or "cnn", got {kind!r}')
    data = datasets.load(config.dataset)
    grid = [
        (k, bn, d, s)
        for k in config.models
        for bn in (False, True)
        for d in (False, True)
        for s in config.seeds
    ]
    runs = []
    for i, (kind, bn, dropout, seed) in enumerate(grid, 1):
        desc = (
            f"regularization {i}/{len(grid)}: {kind}, {'BN' if bn else 'no BN'}, "
            f"{'dropout' if dropout else 'no dropout'}, seed {seed}"
        )
        curves = _regularization_run(kind, bn, dropout, seed, data, config, progress, desc)
        runs.append(
            {
                "model": kind,
                "bn": bn,
                "dropout": dropout,
                "seed": seed,
                **curves,
                "final_train_accuracy": curves["train_accuracy"][-1],
                "final_test_accuracy": curves["test_accuracy"][-1],
                "final_test_loss": curves["test_loss"][-1],
                "gap": curves["train_accuracy"][-1] - curves["test_accuracy"][-1],
            }
        )
    results = {
        "experiment": "regularization",
        "dataset": data.name,
        "config": asdict(config),
        "runs": runs,
        "summary": summarize_regularization(runs),
        "environment": environment(),
    }
    return finish(results, out, "regularization", print_fn)


def summarize_regularization(runs) -> list[dict]:
    """Mean and standard deviation over seeds per (model, BN, dropout)."""
    return summarize_over_seeds(
        runs,
        ("model", "bn", "dropout"),
        ("final_train_accuracy", "final_test_accuracy", "final_test_loss", "gap"),
    )


# --- internal covariate shift against a smoother landscape -----------------------------------


@dataclass(frozen=True)
class IcsConfig:
    dataset: str = "mnist-5k"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0
    probe_every: int = 100  # drift and landscape measured every this many steps
    probe_size: int = 500  # training images the layer inputs are measured on
    step_sizes: tuple = (0.05, 0.1, 0.2, 0.4)  # multiples of lr along the gradient
    noise: float = 1.0  # noisy BN: scale of the injected time-varying shift/scale


CONFIGS = ("standard", "bn", "noisy bn")


def drift(series) -> np.ndarray:
    """How far a per-unit statistic moves between successive probes: the mean over units of
    |s(t) - s(t-1)|, for each probe after the first. ``series``: (probes, units)."""
    s = np.asarray(series, np.float64)
    return np.abs(np.diff(s, axis=0)).mean(axis=1)


def landscape(loss_and_grad, params: np.ndarray, step_sizes) -> dict:
    """Santurkar et al.'s measurements at ``params`` along the gradient g: for each step
    size eta, the loss at params - eta * g and the change of the gradient there,
    ||grad(params - eta * g) - g||. Returns the loss range (max - min over the step sizes,
    including 0) and the largest gradient change.

    ``loss_and_grad(p) -> (loss, grad)`` on flat parameter vectors.
    """
    loss0, g = loss_and_grad(params)
    losses, changes = [loss0], []
    for eta in step_sizes:
        loss, grad = loss_and_grad(params - eta * g)
        losses.append(loss)
        changes.append(float(np.linalg.norm(grad - g)))
    norm = float(np.linalg.norm(g))
    return {
        "loss_range": float(max(losses) - min(losses)),
        "grad_change": float(max(changes)),
        "grad_norm": norm,
        "relative_grad_change": float(max(changes)) / max(norm, 1e-300),
        "losses": [float(v) for v in losses],
        "grad_changes": changes,
    }


def _ics_run(name: str, config: IcsConfig, data, progress: bool, desc: str) -> dict:
    """Train the paper's MLP (sigmoid) as ``name`` ("standard", "bn", "noisy bn") with
    bnlab.torch, probing every ``probe_every`` steps: per hidden layer's output (the next
    layer's input) on a fixed probe batch, per unit mean, variance and 15/50/85th
    percentiles; the landscape along the gradient (:func:`landscape`); test accuracy."""
    import copy

    import torch

    from .. import torch as bt
    from ..data import iterate_batches
    from .torch_train import _evaluate

    C, S, _ = data.image_shape
    ref = models.paper_mlp(
        bn=name != "standard",
        in_features=C * S * S,
        num_classes=data.num_classes,
        seed=config.seed,
    )
    net = bt.convert(bt.models.twin(ref)).double()
    torch.manual_seed(config.seed)
    noise_rng = torch.Generator().manual_seed(config.seed + 1)
    noise: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def inject(module, inputs, output):  # noisy BN: y * s + m, s and m redrawn every step
        if module.training and module in noise:
            s, m = noise[module]
            return output * s + m
        return output

    bns = [m for m in net.children() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if name == "noisy bn":
        for bn in bns:
            bn.register_forward_hook(inject)

    def redraw():
        for bn in bns:
            n = bn.num_features
            f64 = torch.float64
            scale = torch.exp(config.noise * torch.randn(n, generator=noise_rng, dtype=f64))
            noise[bn] = (scale, config.noise * torch.randn(n, generator=noise_rng, dtype=f64))

    hidden = [i for i, m in enumerate(net.children()) if isinstance(m, torch.nn.Sigmoid)][:-1]
    probe_x = torch.from_numpy(data.train[0][: config.probe_size]).double()
    opt = torch.optim.SGD(net.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    stats: dict[int, dict[str, list[np.ndarray]]] = {
        i: {k: [] for k in ("mean", "var", "p15", "p50", "p85")} for i in hidden
    }
    record: dict[str, list] = {
        "step": [],
        "test_accuracy": [],
        "loss_range": [],
        "grad_change": [],
        "grad_norm": [],
        "relative_grad_change": [],
    }

    def loss_and_grad(model, x, y):
        def f(p):
            trial = copy.deepcopy(model)
            torch.nn.utils.vector_to_parameters(torch.from_numpy(p), trial.parameters())
            loss = torch.nn.functional.cross_entropy(trial(x), y)
            grads = torch.autograd.grad(loss, list(trial.parameters()))
            return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).numpy()

        return f

    def batches():
        while True:
            yield from iterate_batches(
                *data.train, config.batch_size, shuffle=True, drop_last=True, rng=rng
            )

    tqdm = need("tqdm.auto", "the progress bar").tqdm

    bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False, unit="step")
    for step, (xb, yb) in zip(range(1, config.steps + 1), batches()):
        x, y = torch.from_numpy(xb).double(), torch.from_numpy(yb).long()
        redraw()
        if step == 1 or step % config.probe_every == 0:
            probe = copy.deepcopy(net)  # train mode, this step's noise, buffers untouched
            with torch.no_grad():
                h = probe_x
                for i, layer in enumerate(probe.children()):
                    h = layer(h)
                    if i in hidden:
                        a = h.numpy()
                        st = stats[i]
                        st["mean"].append(a.mean(0))
                        st["var"].append(a.var(0))
                        for q in (15, 50, 85):
                            st[f"p{q}"].append(np.percentile(a, q, axis=0))
            params = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
            land = landscape(
                loss_and_grad(net, x, y), params, [config.lr * k for k in config.step_sizes]
            )
            record["step"].append(step)
            for key in ("loss_range", "grad_change", "grad_norm", "relative_grad_change"):
                record[key].append(land[key])
            record["test_accuracy"].append(
                _evaluate(net, data.test[0].astype(np.float64), data.test[1], "cpu")["accuracy"]
            )
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    layers = {}
    for n_layer, i in enumerate(hidden, 1):
        layers[f"layer {n_layer + 1} input"] = {
            k: float(drift(v).mean()) for k, v in stats[i].items()
        }
    first = stats[hidden[-1]]  # one unit of the last hidden layer, as in the paper's Fig. 1
    unit = {f"p{q}": [float(v[0]) for v in first[f"p{q}"]] for q in (15, 50, 85)}
    return {
        "config": name,
        **record,
        "drift": layers,
        "unit_percentiles": unit,
        "final_test_accuracy": record["test_accuracy"][-1],
    }


def run_ics(config: IcsConfig, out=None, progress: bool = True, print_fn=print) -> dict:
    """Internal covariate shift, measured, against Santurkar et al.'s landscape view: the
    paper's MLP without BN, with BN and with noisy BN (time-varying random shift and scale
    injected after every BN layer). Per hidden layer, how far the next layer's input
    distribution moves between probes; test accuracy; the loss range and the gradient
    change along the gradient direction."""
    data = datasets.load(config.dataset)
    runs = [
        _ics_run(name, config, data, progress, f"ics {i}/{len(CONFIGS)}: {name}")
        for i, name in enumerate(CONFIGS, 1)
    ]
    results = {
        "experiment": "ics",
        "dataset": data.name,
        "config": asdict(config),
        "runs": runs,
        "environment": environment(),
    }
    return finish(results, out, "ics", print_fn)
