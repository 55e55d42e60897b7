"""The targets tables of docs/performance.md, computed from committed `bnlab bench` runs.

Every figure in those tables is the range (min - max) of one ratio over the JSON files
given, each written by ``bnlab bench --json FILE``, with how many runs met the target.
Two tables: the earlier targets on the medians (every run), and the targets of the CPU
work that judges on the minimum of the interleaved rounds (``--min``: runs that report
minima, run 8 on), with the controls' ranges below them (torch against itself, run 11
on; no target). Usage:

    .venv/bin/python tools/bench_ranges.py docs/bench/run-*.json
    .venv/bin/python tools/bench_ranges.py --min docs/bench/run-*.json
"""

from __future__ import annotations

import json
import sys

# (label, case name or layout, dtype, key: a copy_times entry or a ratio field, limit)
TARGETS = [
    ("NCHW f32 train <= 5 copy-times", "NCHW 64x64x32x32", "float32", "train/fused", 5.0),
    ("NCHW f32 train <= 0.6 x PyTorch NCHW", "NCHW 64x64x32x32", "float32",
     "train_fused_vs_torch", 0.6),
    ("NCHW f32 train <= PyTorch channels-last", "NCHW 64x64x32x32", "float32",
     "train_fused_vs_torch_channels_last", 1.0),
    ("NHWC f32 train <= 5 copy-times", "NHWC 64x32x32x64", "float32", "train/fused", 5.0),
    ("NHWC f32 train <= 0.6 x PyTorch NCHW", "NHWC 64x32x32x64", "float32",
     "train_fused_vs_torch", 0.6),
    ("NHWC f32 train <= PyTorch channels-last", "NHWC 64x32x32x64", "float32",
     "train_fused_vs_torch_channels_last", 1.0),
    ("inference <= 1.3 copy-times, float32, 4-D", "4-D", "float32", "infer/fused", 1.3),
    ("inference <= 1.3 copy-times, float64, 4-D", "4-D", "float64", "infer/fused", 1.3),
    ("inference <= 1.3 copy-times, (256, 4096)", "NC 256x4096", None, "infer/fused", 1.3),
    ("(256, 4096) f32 train <= PyTorch", "NC 256x4096", "float32", "train_fused_vs_torch", 1.0),
    # bnlab.torch modules against torch.nn's, same tensors (runs 6 and later)
    ("bnlab.torch f32 train <= 0.7 x torch.nn, NCHW", "NCHW 64x64x32x32", "float32",
     "train_bnlab_torch_vs_torch", 0.7),
    ("bnlab.torch f32 train <= 0.9 x torch.nn, channels_last", "NCHW 64x64x32x32", "float32",
     "train_bnlab_torch_vs_torch_channels_last", 0.9),
    ("bnlab.torch f32 eval <= 1.0 x torch.nn, NCHW", "NCHW 64x64x32x32", "float32",
     "infer_bnlab_torch_vs_torch", 1.0),
    ("bnlab.torch f32 eval <= 1.0 x torch.nn, channels_last", "NCHW 64x64x32x32", "float32",
     "infer_bnlab_torch_vs_torch_channels_last", 1.0),
    ("torch seed CNN step with convert() <= 0.9 x without", "torch step", None,
     "convert_vs_torch", 0.9),
]


# judged on the minimum of the interleaved rounds (keys of the minima: copy_times_min, *_min)
TARGETS_MIN = [
    ("NCHW f32 train <= 3.0 copy-times", "NCHW 64x64x32x32", "float32", "train/fused", 3.0),
    ("NHWC f32 train <= 3.0 copy-times", "NHWC 64x32x32x64", "float32", "train/fused", 3.0),
    ("NCHW f32 train <= 0.8 x torch NCHW", "NCHW 64x64x32x32", "float32",
     "train_fused_vs_torch", 0.8),
    ("NHWC f32 train <= 0.8 x torch channels_last", "NHWC 64x32x32x64", "float32",
     "train_fused_vs_torch_channels_last", 0.8),
    ("bnlab.torch f32 train <= 0.8 x torch.nn, NCHW", "NCHW 64x64x32x32", "float32",
     "train_bnlab_torch_vs_torch", 0.8),
    ("bnlab.torch f32 train <= 0.8 x torch.nn, channels_last", "NCHW 64x64x32x32", "float32",
     "train_bnlab_torch_vs_torch_channels_last", 0.8),
    ("eval <= 1.0 copy-times, f32 4-D (fused)", "4-D", "float32", "infer/fused", 1.0),
    ("eval <= 1.0 copy-times, f32 4-D (bnlab.torch NCHW)", "4-D", "float32",
     "infer/bnlab_torch", 1.0),
    ("eval <= 1.0 copy-times, f32 4-D (bnlab.torch channels_last)", "4-D", "float32",
     "infer/bnlab_torch_channels_last", 1.0),
    ("auto train <= 1.0 x torch.nn, NCHW, every case", "all", None, "train_auto_vs_torch", 1.0),
    ("auto train <= 1.0 x torch.nn, channels_last, every 4-D case", "4-D", None,
     "train_auto_vs_torch_channels_last", 1.0),
    ("auto eval <= 1.0 x torch.nn, NCHW, every case", "all", None, "infer_auto_vs_torch", 1.0),
    ("auto eval <= 1.0 x torch.nn, channels_last, every 4-D case", "4-D", None,
     "infer_auto_vs_torch_channels_last", 1.0),
    ("torch seed CNN step, convert() <= 0.9 x native, NCHW", "torch step", None,
     "convert_vs_torch", 0.9),
    ("torch seed CNN step, convert() <= 0.9 x native, channels_last", "torch step", None,
     "convert_vs_torch_channels_last", 0.9),
    ("torch seed CNN step, on bnlab's kernels, NCHW", "torch step", None,
     "numba_vs_torch", 0.9),
    ("torch seed CNN step, on bnlab's kernels, channels_last", "torch step", None,
     "numba_vs_torch_channels_last", 0.9),
    # controls (no target): a second torch.nn module or model against the first, same code
    # both sides, so how far these stray from 1 is how far noise moves a ratio (run 11 on)
    ("control: torch.nn / torch.nn train, NCHW, every case", "all", None,
     "train_torch_again_vs_torch", None),
    ("control: torch.nn / torch.nn train, channels_last, every 4-D case", "4-D", None,
     "train_torch_again_vs_torch_channels_last", None),
    ("control: torch.nn / torch.nn eval, NCHW, every case", "all", None,
     "infer_torch_again_vs_torch", None),
    ("control: torch.nn / torch.nn eval, channels_last, every 4-D case", "4-D", None,
     "infer_torch_again_vs_torch_channels_last", None),
    ("control: torch seed CNN step / itself, NCHW", "torch step", None,
     "torch_again_vs_torch", None),
    ("control: torch seed CNN step / itself, channels_last", "torch step", None,
     "torch_again_vs_torch_channels_last", None),
]


def values(run, case, dtype, key, suffix=""):
    """Every value of ``key`` in one run's rows that match ``case`` and ``dtype``."""
    if case == "torch step":  # not a row: the torch seed CNN training step
        step = run.get("torch_seed_cnn_step") or {}
        return [step[key + suffix]] if key + suffix in step else []
    out = []
    for row in run["rows"]:
        if case == "4-D" and len(row["shape"]) != 4:
            continue
        if case not in ("4-D", "all") and row["case"] != case:
            continue
        if dtype is not None and row["dtype"] != dtype:
            continue
        v = row["copy_times" + suffix].get(key) if "/" in key else row.get(key + suffix)
        if v is not None:
            out.append(v)
    return out


def table(runs, targets=TARGETS, suffix="") -> str:
    lines = ["| target | measured range | met in |", "| --- | --- | --- |"]
    for label, case, dtype, key, limit in targets:
        per_run = [values(run, case, dtype, key, suffix) for run in runs]
        vs = [v for found in per_run for v in found]
        if not vs:
            lines.append(f"| {label} | not measured | - |")
            continue
        measured = [found for found in per_run if found]  # runs that have this ratio
        if limit is None:  # a control: no target to meet
            lines.append(f"| {label} | {min(vs):.2f} - {max(vs):.2f} | ({len(measured)} runs) |")
            continue
        met = sum(max(found) <= limit for found in measured)
        lines.append(f"| {label} | {min(vs):.2f} - {max(vs):.2f} | {met} of {len(measured)} runs |")
    return "\n".join(lines)


def main(paths) -> int:
    minimum = "--min" in paths
    paths = [p for p in paths if p != "--min"]
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [(p, json.loads(open(p).read())) for p in paths]
    if minimum:
        runs = [(p, r) for p, r in runs if "copy_times_min" in r["rows"][0]]
    print(f"{len(runs)} runs: {', '.join(p for p, _ in runs)}")
    if minimum:
        print(table([r for _, r in runs], TARGETS_MIN, "_min"))
    else:
        print(table([r for _, r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
