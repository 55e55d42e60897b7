"""The ``bnlab`` command: ``steps``, ``train``, ``compare``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import __version__
from .extras import MissingExtra


def _checked(convert, accept, expected: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive finite number")
_fraction = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _add_training_options(p, defaults) -> None:
    from .data import DATASETS

    p.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default=defaults.dataset,
        help=f"dataset (default {defaults.dataset}, embedded; full MNIST, "
        "Fashion-MNIST and CIFAR-10 are read from $BNLAB_DATA or downloaded)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=defaults.epochs,
        help=f"passes over the training split (default {defaults.epochs})",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="total training steps; overrides --epochs",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=defaults.lr,
        help=f"learning rate (default {defaults.lr})",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help=f"mini-batch size (default {defaults.batch_size})",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=defaults.optimizer,
        help=f"optimizer (default {defaults.optimizer})",
    )
    p.add_argument(
        "--momentum",
        type=_fraction,
        default=defaults.momentum,
        help=f"SGD momentum (default {defaults.momentum})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"initial weights, shuffling, dropout (default {defaults.seed})",
    )
    p.add_argument(
        "--eval-every",
        type=_positive_int,
        default=defaults.eval_every,
        help="evaluate on the test split every N steps (default: "
        f"{defaults.eval_every or 'once per epoch'})",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder for results.json, PNGs and the report (default runs/<command>-<time>)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _cmd_steps(args) -> int:
    from .experiments import four_steps

    try:
        result = four_steps.run(batch_size=args.batch_size, seed=args.seed)
    except ValueError as e:
        print(f"bnlab steps: {e}", file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1


def _cmd_train(args) -> int:
    from .experiments import single

    if args.engine == "numpy" and (
        args.device != "cpu" or args.nproc != 1 or args.accumulate != 1
    ):
        raise ValueError(
            "--device, --nproc and --accumulate need --engine torch (the NumPy engine runs "
            "in one process on the CPU, one batch per step)"
        )
    config = single.TrainConfig(
        model=args.model,
        bn=not args.no_bn,
        activation=args.activation,
        weight_std=args.weight_std,
        dataset=args.dataset,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_every=args.eval_every,
        accumulate=args.accumulate,
    )
    if args.engine == "torch":
        from .experiments import torch_train

        if args.resume is not None and args.init_from is not None:
            raise ValueError("--resume continues a run; --init-from starts a new one: not both")
        torch_train.run(
            config,
            out=args.out,
            device=args.device,
            nproc=args.nproc,
            init_from=args.init_from,
            progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
        return 0
    if args.resume is not None and args.init_from is not None:
        raise ValueError("--resume continues a run; --init-from starts a new one: not both")
    single.run(
        config,
        out=args.out,
        init_from=args.init_from,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    return 0


def _cmd_compare(args) -> int:
    from .experiments import compare

    config = compare.CompareConfig(
        dataset=args.dataset,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        momentum=args.momentum,
        seed=args.seed,
        eval_every=args.eval_every,
        target=args.target,
    )
    compare.run(config, out=args.out, progress=not args.no_progress)
    return 0


def _cmd_reproduce(args) -> int:
    from .experiments import reproduce as R

    progress = not args.no_progress
    if args.experiment == "small-batch":
        small_batch_config = R.SmallBatchConfig(
            dataset=args.dataset,
            model=args.model,
            batch_sizes=tuple(args.batch_sizes),
            variants=tuple(args.variants),
            seeds=tuple(args.seeds),
            samples=args.samples,
            lr32=args.lr32,
        )
        R.run_small_batch(small_batch_config, out=args.out, progress=progress)
        return 0
    if args.experiment == "ics":
        ics_config = R.IcsConfig(
            dataset=args.dataset,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            probe_every=args.probe_every,
            noise=args.noise,
        )
        R.run_ics(ics_config, out=args.out, progress=progress)
        return 0
    if args.experiment == "regularization":
        regularization_config = R.RegularizationConfig(
            dataset=args.dataset,
            models=tuple(args.models),
            seeds=tuple(args.seeds),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            dropout=args.dropout,
        )
        R.run_regularization(regularization_config, out=args.out, progress=progress)
        return 0
    common = dict(
        dataset=args.dataset,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
    )
    if args.experiment == "fig1":
        fig1_config = R.Fig1Config(
            steps=args.steps,
            lr=args.lr,
            weight_std=args.weight_std,
            probe_every=args.probe_every,
            unit=args.unit,
            **common,
        )
        R.run_fig1(fig1_config, out=args.out, progress=progress)
    elif args.experiment == "lr-sweep":
        lr_sweep_config = R.LrSweepConfig(
            steps=args.steps,
            lrs=tuple(args.lrs),
            activations=tuple(args.activations),
            weight_std=args.weight_std,
            **common,
        )
        R.run_lr_sweep(lr_sweep_config, out=args.out, progress=progress)
    else:
        init_sweep_config = R.InitSweepConfig(
            steps=args.steps,
            lr=args.lr,
            weight_stds=tuple(args.weight_stds),
            activations=tuple(args.activations),
            **common,
        )
        R.run_init_sweep(init_sweep_config, out=args.out, progress=progress)
    return 0


def _cmd_report(args) -> int:
    from . import report

    written = report.regenerate(args.run_dir)
    print("rewrote " + ", ".join(written) + f" in {args.run_dir}")
    return 0


def _cmd_doctor(args) -> int:
    from .experiments import checkup
    from .train import atomic_write

    report = checkup.check(
        args.file,
        model=args.model,
        data=args.data,
        batches=args.batches,
        batch_size=args.batch_size,
    )
    print(checkup.format_table(report))
    if args.json:
        import json

        text = json.dumps(checkup.to_json(report), indent=1)
        atomic_write(args.json, lambda f: f.write(text.encode()))
        print(f"wrote {args.json}")
    return 1 if any(f.severity == "error" for f in report["findings"]) else 0


def _cmd_explain(args) -> int:
    from . import explain

    print(explain.build(args.out, run=args.run))
    return 0


def _cmd_lesson(args) -> int:
    """Copy the lesson's notebooks (package data) into --out, never over a learner's work."""
    import shutil
    from pathlib import Path

    source = Path(__file__).parent / "lesson"
    notebooks = sorted(source.glob("*.ipynb"))
    out = Path(args.out)
    taken = [out / nb.name for nb in notebooks if (out / nb.name).exists()]
    if taken and not args.force:
        raise FileExistsError(
            f"{taken[0]} exists (your work?): choose another --out, or --force to overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        tmp = out / (nb.name + ".tmp")
        shutil.copyfile(nb, tmp)
        tmp.replace(out / nb.name)  # atomically
    print(f"{len(notebooks)} notebooks in {out}/: " + ", ".join(nb.name for nb in notebooks))
    print("Open them with Jupyter (pip install jupyterlab if you have none):")
    print(f"    jupyter lab {out}")
    print("Each exercise is graded in the notebook (bnlab.exercises): run its check cell.")
    return 0


def _cmd_bench_gpu(args) -> int:
    from . import bench_gpu

    # the GPU bench times each candidate for a fixed time (triton.testing.do_bench) and has
    # no seed-CNN step: CPU-only options are refused rather than ignored
    for flag, given in (("--repeats", args.repeats is not None), ("--no-cnn", args.no_cnn)):
        if given:
            raise ValueError(
                f"{flag} applies to the CPU bench only; --device cuda times each "
                "candidate for 100 ms of device time and has no seed-CNN step"
            )
    cases = bench_gpu.CASES
    if args.dtypes:
        cases = [c for c in cases if c.dtype in args.dtypes]
        if not cases:
            raise ValueError(
                f"no GPU case in {' '.join(args.dtypes)}; the GPU cases are "
                f"float32, float16 and bfloat16"
            )
    if args.shapes:
        names = {c.name: c for c in cases}
        unknown = sorted(set(args.shapes) - set(names))
        if unknown:
            raise ValueError(f"unknown GPU case(s) {unknown}; choose from {list(names)}")
        cases = [names[n] for n in args.shapes]
    result = bench_gpu.run("cuda", cases, progress=not args.no_progress)
    print(bench_gpu.format_table(result))
    if args.json:
        bench_gpu.write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_bench(args) -> int:
    if args.device == "cuda":
        return _cmd_bench_gpu(args)
    from . import bench

    shapes = None
    if args.shapes:
        unknown = sorted(set(args.shapes) - set(bench.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; choose from {list(bench.SHAPES)}")
        shapes = args.shapes
    if args.dtypes and "bfloat16" in args.dtypes:
        raise ValueError(
            "bfloat16 is a GPU case only (--device cuda); the CPU bench takes "
            "float16, float32 and float64"
        )
    result = bench.run(
        shapes=shapes,
        dtypes=args.dtypes or ["float32", "float64"],
        repeats=args.repeats or 41,
        cnn=not args.no_cnn,
        progress=not args.no_progress,
    )
    print(bench.format_table(result, "min"))
    print()
    print(bench.format_table(result, "median"))
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab", description="Batch normalization done properly (Ioffe & Szegedy 2015)."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also BNLAB_DEBUG=1)"
    )
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "steps",
        help="BN's four steps worked on a real mini-batch of digits",
        description="Print BN's four steps (mean, variance, normalize, "
        "scale and shift) on a mini-batch of MNIST digits.",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=60,
        help="mini-batch size m (default 60, as in the paper)",
    )
    p.add_argument("--seed", type=int, default=0, help="which digits are drawn (default 0)")
    p.set_defaults(func=_cmd_steps)

    from .experiments.compare import CompareConfig
    from .experiments.single import TrainConfig

    p = sub.add_parser(
        "compare",
        help="the main job: the seed CNN with and without BN",
        description="Train the seed CNN ([conv -> BN -> ReLU -> max-pool] x 2 -> "
        "linear) with and without BN on the same data, seed and "
        "schedule; print a side-by-side table and write "
        "results.json, learning_curves.png and report.md.",
    )
    _add_training_options(p, CompareConfig())
    p.add_argument(
        "--target",
        type=_fraction,
        default=CompareConfig.target,
        help=f"report steps to reach this test accuracy (default {CompareConfig.target})",
    )
    p.set_defaults(func=_cmd_compare)

    from .data import DATASETS
    from .experiments import reproduce as R

    p = sub.add_parser(
        "reproduce",
        help="the paper's experiments: fig1, lr-sweep, init-sweep, "
        "regularization, ics, small-batch",
        description="Reproduce the evidence of Ioffe & Szegedy (2015) with the "
        "paper's MLP on real digits; each writes results.json, PNG "
        "figures and report.md into a run folder.",
    )
    rsub = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    def run_options(q, d, name, dataset_help=""):
        """--dataset, --out and --no-progress of one experiment with defaults ``d``."""
        q.add_argument(
            "--dataset",
            choices=sorted(DATASETS),
            default=d.dataset,
            help=f"default {d.dataset}{dataset_help}",
        )
        q.add_argument("--out", default=None, help=f"run folder (default runs/{name}-<time>)")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    specs: dict[str, tuple[Any, str]] = {
        "fig1": (
            R.Fig1Config(),
            "Figure 1: test accuracy, and the 15/50/85th percentiles of a "
            "sigmoid's input over training, with and without BN",
        ),
        "lr-sweep": (
            R.LrSweepConfig(),
            "final test accuracy over learning rates, sigmoid and ReLU, with and without BN",
        ),
        "init-sweep": (
            R.InitSweepConfig(),
            "final test accuracy over initial weight scales, "
            "sigmoid and ReLU, with and without BN",
        ),
    }
    for name, (d, text) in specs.items():
        q = rsub.add_parser(name, help=text, description=text + ".")
        run_options(q, d, name, "; the paper's scale: --dataset mnist --steps 50000")
        q.add_argument(
            "--steps",
            type=_positive_int,
            default=d.steps,
            help=f"training steps per network (default {d.steps})",
        )
        q.add_argument(
            "--batch-size",
            type=_positive_int,
            default=d.batch_size,
            help=f"default {d.batch_size}",
        )
        q.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
        q.add_argument(
            "--eval-every",
            type=_positive_int,
            default=d.eval_every,
            help=f"test evaluation interval in steps (default {d.eval_every})",
        )
        if name != "init-sweep":
            q.add_argument(
                "--weight-std",
                type=_positive_float,
                default=d.weight_std,
                help="weights from N(0, std^2) (default "
                f"{d.weight_std if d.weight_std else 'Xavier/He'})",
            )
        else:
            q.add_argument(
                "--weight-stds",
                type=_positive_float,
                nargs="+",
                default=list(d.weight_stds),
                help=f"default {list(d.weight_stds)}",
            )
        if name != "lr-sweep":
            q.add_argument(
                "--lr",
                type=_positive_float,
                default=d.lr,
                help=f"SGD learning rate (default {d.lr})",
            )
        else:
            q.add_argument(
                "--lrs",
                type=_positive_float,
                nargs="+",
                default=list(d.lrs),
                help=f"learning rates (default {list(d.lrs)})",
            )
        if name == "fig1":
            q.add_argument(
                "--probe-every",
                type=_positive_int,
                default=d.probe_every,
                help=f"percentile probe interval in steps (default {d.probe_every})",
            )
            q.add_argument(
                "--unit",
                type=int,
                default=d.unit,
                help=f"which of the 100 last-layer sigmoids to plot (default {d.unit})",
            )
        else:
            q.add_argument(
                "--activations",
                nargs="+",
                choices=["sigmoid", "relu"],
                default=list(d.activations),
                help="default sigmoid relu",
            )
    d = R.IcsConfig()
    text = (
        "internal covariate shift, measured (per-layer input drift), against Santurkar et "
        "al. (2018): noisy BN and the loss landscape along the gradient (needs bnlab[torch])"
    )
    q = rsub.add_parser("ics", help=text, description=text + ".")
    run_options(q, d, "ics")
    q.add_argument("--steps", type=_positive_int, default=d.steps, help=f"default {d.steps}")
    q.add_argument("--lr", type=_positive_float, default=d.lr, help=f"default {d.lr}")
    q.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    q.add_argument(
        "--probe-every",
        type=_positive_int,
        default=d.probe_every,
        help=f"steps between measurements (default {d.probe_every})",
    )
    q.add_argument(
        "--noise",
        type=_positive_float,
        default=d.noise,
        help=f"noisy BN's shift/scale noise (default {d.noise})",
    )

    d = R.RegularizationConfig()
    text = (
        "does BN regularize? the MLP and the seed CNN, BN on/off x dropout on/off, several "
        "seeds, until the training accuracy saturates: the generalization gap (needs "
        "bnlab[torch])"
    )
    q = rsub.add_parser("regularization", help=text, description=text + ".")
    run_options(q, d, "regularization")
    q.add_argument(
        "--models",
        nargs="+",
        choices=["mlp", "cnn"],
        default=list(d.models),
        help=f"default {list(d.models)}",
    )
    q.add_argument(
        "--seeds", type=int, nargs="+", default=list(d.seeds), help=f"default {list(d.seeds)}"
    )
    q.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"default {d.epochs}")
    q.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help=f"default {d.batch_size}"
    )
    q.add_argument("--lr", type=_positive_float, default=d.lr, help=f"default {d.lr}")
    q.add_argument(
        "--dropout",
        type=_fraction,
        default=d.dropout,
        help=f"dropout probability where it is on (default {d.dropout})",
    )

    d = R.SmallBatchConfig()
    text = (
        "why the BN variants exist: the seed CNN at batch sizes 2-32 (same samples seen) "
        "with BN, ghost BN and batch renorm, several seeds: eval accuracy and train/eval gap"
    )
    q = rsub.add_parser("small-batch", help=text, description=text + ".")
    run_options(q, d, "small-batch")
    q.add_argument(
        "--model",
        choices=["cnn", "mlp"],
        default=d.model,
        help="cnn: the seed CNN (BN over N*H*W values per channel); mlp: the "
        "paper's MLP (BN over N values per unit) (default cnn)",
    )
    q.add_argument(
        "--batch-sizes",
        type=_positive_int,
        nargs="+",
        default=list(d.batch_sizes),
        help=f"default {list(d.batch_sizes)}",
    )
    q.add_argument(
        "--variants",
        nargs="+",
        choices=["bn", "ghost", "renorm"],
        default=list(d.variants),
        help=f"default {list(d.variants)}",
    )
    q.add_argument(
        "--seeds", type=int, nargs="+", default=list(d.seeds), help=f"default {list(d.seeds)}"
    )
    q.add_argument(
        "--samples",
        type=_positive_int,
        default=d.samples,
        help=f"training samples seen per run (default {d.samples})",
    )
    q.add_argument(
        "--lr32",
        type=_positive_float,
        default=d.lr32,
        help=f"learning rate at batch 32, scaled linearly (default {d.lr32})",
    )
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser(
        "report",
        help="rebuild a run folder's figures and report.md",
        description="Redraw the figures and rewrite report.md of a run folder "
        "from its results.json (any bnlab experiment).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by a bnlab command")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "bench",
        help="speed of BN against the reference, PyTorch and a copy",
        description="Time batch-norm training (forward+backward) and inference "
        "for the NumPy reference, the fused kernels and PyTorch, with "
        "a same-size np.copyto as the bandwidth yardstick; candidates "
        "interleaved in random order per round; the minimum (targets are judged on it) "
        "and the median of the rounds. Also one training step of the seed CNN in bnlab "
        "and PyTorch, and of the torch seed CNN with and without bnlab.torch.convert.",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (default): NumPy, numba and torch on this machine; cuda: bnlab's "
        "Triton kernels against torch's own on a GPU, with a device copy as "
        "the yardstick (see bnlab.bench_gpu)",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help='which cases, e.g. "NC 256x4096" (default: all four; with --device '
        'cuda e.g. "256x64x56x56 float32 NCHW", default all seven)',
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float16", "bfloat16", "float32", "float64"],
        help="default float32 float64 (CPU), every GPU case's dtype (cuda)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        help="interleaved rounds per case; minimum and median are reported (default 41; CPU only)",
    )
    p.add_argument("--no-cnn", action="store_true", help="skip the seed CNN training step")
    p.add_argument("--json", metavar="FILE", help="also write every minimum and median to FILE")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "doctor",
        help="find batch-norm mistakes in a checkpoint",
        description="The BN doctor on a checkpoint: bnlab's .npz or a PyTorch "
        "state dict (.pt/.pth, read with weights_only=True: a file "
        "that would run code is refused). Prints a table of "
        "findings (severity, layer, code, message, evidence, fix); "
        "exit status 1 if any is an error. Findings are explained "
        "in docs/doctor.md.",
    )
    p.add_argument("file", help="checkpoint.npz, model.pt or model.pth")
    p.add_argument(
        "--model",
        choices=["seed-cnn", "paper-mlp"],
        default=None,
        help="the network the state dict belongs to: adds bias-before-bn and, "
        "with batches of --data, small-batch and stale-stats",
    )
    p.add_argument(
        "--data",
        choices=sorted(DATASETS),
        default=None,
        help="with --model: the dataset whose test split is run through the model "
        "(default: the checkpoint's, else mnist-5k)",
    )
    p.add_argument(
        "--batches",
        type=_positive_int,
        default=4,
        help="test batches for the dynamic checks (default 4)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=250, help="their size (default 250)"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the findings here")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser(
        "lesson",
        help="the lesson's notebooks, with graded exercises, into a folder",
        description="Copy the lesson's five notebooks (why normalize, the four steps, the "
        "backward, where BN goes, BN in PyTorch) into a folder, and say how to open them.",
    )
    p.add_argument("--out", default="bnlab-lesson", help="folder (default ./bnlab-lesson)")
    p.add_argument("--force", action="store_true", help="overwrite notebooks already there")
    p.set_defaults(func=_cmd_lesson)

    p = sub.add_parser(
        "explain",
        help="BN's four steps as an interactive page",
        description="Write explain.html: BN's four steps on a real mini-batch "
        "of digits through the seed CNN's first convolution, with "
        "sliders for gamma, beta and eps, the batch size and "
        "train/eval. One self-contained file: it works offline, "
        "from file://. Prints its path.",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/explain)")
    p.add_argument(
        "--run",
        default=None,
        metavar="RUN_DIR",
        help="also chart this run folder's learning curves (its results.json)",
    )
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "train",
        help="train one model in one configuration",
        description="Train the seed CNN or the paper's MLP; write results.json, "
        "learning_curves.png and checkpoint.npz.",
    )
    p.add_argument(
        "--model",
        choices=["cnn", "mlp"],
        default="cnn",
        help="cnn: the seed CNN; mlp: the paper's 784-100-100-100-10 (default cnn)",
    )
    p.add_argument("--no-bn", action="store_true", help="leave batch normalization out")
    p.add_argument(
        "--activation",
        choices=["sigmoid", "relu"],
        default="sigmoid",
        help="MLP nonlinearity (default sigmoid, as in the paper)",
    )
    p.add_argument(
        "--weight-std",
        type=_positive_float,
        default=None,
        help="MLP: initialize weights from N(0, std^2) (default Xavier/He)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty (default 0)")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CHECKPOINT",
        help="start from the weights of a checkpoint.npz of the same model",
    )
    p.add_argument(
        "--engine",
        choices=["numpy", "torch"],
        default="numpy",
        help="numpy: bnlab's own stack (default); torch: the same model in PyTorch "
        "with bnlab's BN (needs bnlab[torch])",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="--engine torch: where to train (default cpu)",
    )
    p.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help="--engine torch: data-parallel processes on this machine, with "
        "synchronized BN (default 1; under torchrun, torchrun's count)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="write a resumable checkpoint (RUN_DIR/resume.npz, or resume.pt with --engine "
        "torch; atomically) every N steps (default: about once a minute of training)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with its configuration "
        "(the training options given here are ignored); it ends as the uninterrupted run "
        "would. Under torchrun a restarted job (--max-restarts) with --out resumes by itself",
    )
    p.add_argument(
        "--accumulate",
        type=_positive_int,
        default=1,
        metavar="K",
        help="--engine torch: gradient accumulation, each optimizer step over K "
        "micro-batches of batch-size/K; BN's running statistics are updated once per step "
        "from the pooled micro-batches (bnlab.torch.accumulating). Default 1",
    )
    _add_training_options(p, TrainConfig())
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # bnlab's own errors say what was expected and what came: one line, unless the
        # traceback is asked for (--debug or BNLAB_DEBUG=1)
        if args.debug or os.environ.get("BNLAB_DEBUG", "") not in ("", "0"):
            raise
        print(
            f"bnlab {args.command}: error: {e} (--debug or BNLAB_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2
    except MissingExtra as e:  # an optional dependency: one line naming the extra
        print(f"bnlab {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: workers (if any) were stopped on the way out
        print(f"bnlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
