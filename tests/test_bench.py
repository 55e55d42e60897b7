"""The benchmark harness: its timing and arithmetic on a fake clock, then a tiny real run."""

import json

import numpy as np
import pytest

from bnlab import bench, cli


def test_round_times_interleave_rounds_and_give_minimum_and_median(monkeypatch):
    """On a fake clock each call costs what it is told: the minimum and the median (not the
    mean) of the rounds come out, after the warm-up calls, with one call of every candidate
    per round."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls = []

    def candidate(name, costs):
        costs = iter(costs)

        def fn():
            calls.append(name)
            clock[0] += next(costs)
        return fn

    fns = {"a": candidate("a", [99, 99, 1, 2, 3, 100, 4]),    # 2 warm-ups, then 5 rounds
           "b": candidate("b", [99, 99, 10, 30, 20, 50, 40])}
    stats = bench._statistics(bench._round_times(fns, repeats=5, warmup=2))
    assert stats == {"median": {"a": 3, "b": 30}, "min": {"a": 1, "b": 10}}
    rounds = calls[4:]
    assert len(rounds) == 10 and all(set(rounds[i:i + 2]) == {"a", "b"} for i in range(0, 10, 2))


def test_bench_case_times_the_right_calls_and_reports_ratios(monkeypatch):
    """Each candidate runs its own backend; copy-times and ratios come from the medians."""
    backends = {}
    real = bench.F.batch_norm_forward

    def spy(*args, backend="auto", **kwargs):
        backends.setdefault(current[0], set()).add(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(bench.F, "batch_norm_forward", spy)
    acts = {}
    real_act = bench.F.batch_norm_inference

    def spy_act(*args, act="identity", **kwargs):
        acts.setdefault(current[0], set()).add(act)
        return real_act(*args, act=act, **kwargs)

    monkeypatch.setattr(bench.F, "batch_norm_inference", spy_act)
    current = [None]
    medians = {"copy": 2.0, "train/reference": 40.0, "infer/reference": 10.0,
               "train/fused": 6.0, "infer/fused": 2.0, "train/torch": 12.0, "infer/torch": 1.0,
               "train/fused_act": 6.6, "infer/fused_act": 2.2,
               "train/torch_channels_last": 8.0, "infer/torch_channels_last": 4.0,
               "train/bnlab_torch": 4.0, "infer/bnlab_torch": 1.0,
               "train/bnlab_torch_channels_last": 6.0, "infer/bnlab_torch_channels_last": 2.0}

    medians.update({"train/auto": 6.0, "infer/auto": 3.0, "train/auto_channels_last": 4.0,
                    "infer/auto_channels_last": 8.0})
    medians.update({"train/torch_again": 13.2, "infer/torch_again": 0.9,  # the control
                    "train/torch_again_channels_last": 8.0,
                    "infer/torch_again_channels_last": 5.0})

    def fake_rounds(fns, repeats):  # three rounds: the median as given, the minimum half
        for name, fn in fns.items():
            current[0] = name
            fn()
        assert set(fns) == set(medians)
        return {k: [v, v / 2, 2 * v] for k, v in medians.items()}

    monkeypatch.setattr(bench, "_round_times", fake_rounds)
    row = bench.bench_case(bench.Case("t", "NCHW", (4, 3, 4, 4), "float32"), repeats=1)
    assert backends == {"train/reference": {"numpy"}, "train/fused": {"numba"},
                        "train/fused_act": {"numba"}}
    assert acts["infer/fused_act"] == {"relu"} and acts["infer/fused"] == {"identity"}
    assert row["train_fused_act_vs_fused"] == pytest.approx(1.1)
    assert row["copy_times"]["train/fused"] == 3.0 and row["copy_times"]["train/reference"] == 20.0
    assert row["copy_times"]["infer/torch"] == 0.5
    assert row["train_fused_vs_torch"] == 0.5 and row["train_fused_vs_torch_channels_last"] == 0.75
    assert row["infer_fused_vs_torch"] == 2.0 and row["infer_fused_vs_torch_channels_last"] == 0.5
    assert row["train_bnlab_torch_vs_torch"] == 4 / 12
    assert row["train_bnlab_torch_vs_torch_channels_last"] == 0.75
    assert row["infer_bnlab_torch_vs_torch"] == 1.0
    assert row["infer_bnlab_torch_vs_torch_channels_last"] == 0.5
    assert row["train_auto_vs_torch"] == 0.5 and row["infer_auto_vs_torch_channels_last"] == 2.0
    assert row["train_torch_again_vs_torch"] == pytest.approx(1.1)
    assert row["infer_torch_again_vs_torch"] == pytest.approx(0.9)
    assert row["infer_torch_again_vs_torch_channels_last"] == 1.25
    # the minimum's own copy-times and ratios (here every minimum is half the median)
    assert row["copy_times_min"]["train/fused"] == 3.0 and row["seconds_min"]["copy"] == 1.0
    assert row["train_fused_vs_torch_min"] == 0.5
    assert set(row["auto_engine"]) == {"auto", "auto_channels_last"}
    assert all(set(ran) == {"train", "infer"} and set(ran.values()) <= {"numba", "native"}
               for ran in row["auto_engine"].values())
    result = {"rows": [row], "repeats": 3, "environment": bench.environment()}
    for stat, copy_ms in (("min", "1000.00"), ("median", "2000.00")):
        line = bench.format_table(result, stat).splitlines()[4]
        assert line.split()[:20] == [
            "t", "float32", "train", copy_ms, "20.00", "3.00", "3.30", "6.00", "4.00", "2.00",
            "3.00", "3.00", "2.00", "1.10", "0.50", "0.75", "0.33", "0.75", "0.50", "0.50"]
        assert line.split()[20:22] == ["1.10", "1.00"]  # the control, NCHW and channels-last
        assert line.split()[22:25] == ["auto", "ran", "auto:"]


def test_bench_run_and_table(tmp_path):
    result = bench.run(shapes={"NCHW tiny": ("NCHW", (4, 3, 8, 8)), "NHWC tiny": ("NHWC", (4, 8, 8, 3)),
                               "NC tiny": ("NC", (16, 32))},
                       dtypes=["float32"], repeats=3, cnn=True, progress=False)
    rows = result["rows"]
    assert [r["case"] for r in rows] == ["NCHW tiny", "NHWC tiny", "NC tiny"]
    for r in rows:
        for key in ("train/reference", "train/fused", "infer/fused", "train/torch", "infer/torch"):
            assert r["seconds"][key] > 0
    assert "train/torch_channels_last" in rows[0]["seconds"]  # 4-D rows time both layouts
    assert "train/torch_channels_last" in rows[1]["seconds"]
    assert "train/torch_channels_last" not in rows[2]["seconds"]
    assert "train/bnlab_torch_channels_last" in rows[0]["seconds"]  # bnlab.torch, both layouts
    assert "infer/bnlab_torch" in rows[2]["seconds"]
    assert result["seed_cnn_step"]["seconds"]["bnlab"] > 0
    step = result["torch_seed_cnn_step"]
    assert step["seconds"]["bnlab_convert"] > 0 and step["convert_vs_torch"] > 0
    assert step["torch_again_vs_torch_channels_last_min"] > 0  # the control
    assert step["bn_share_min"] == 1 - (step["seconds_min"]["torch_without_bn"]
                                        / step["seconds_min"]["torch"])
    assert "BN's share of torch's step" in bench.format_table(result)
    assert rows[0]["train_torch_again_vs_torch_min"] > 0
    assert "infer_torch_again_vs_torch" in rows[2] and "control" in bench.format_table(result)
    table = bench.format_table(result)
    assert "NCHW tiny" in table and "seed CNN training step" in table
    assert "bnlab.torch.convert" in table
    path = tmp_path / "b.json"
    bench.write_json(result, path)
    assert json.loads(path.read_text())["rows"][2]["case"] == "NC tiny"


def test_bench_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--shapes", "NC 256x4096", "--dtypes", "float32", "--repeats", "2",
                     "--no-cnn", "--no-progress", "--json", str(out)]) == 0
    assert "NC 256x4096" in capsys.readouterr().out
    assert json.loads(out.read_text())["repeats"] == 2
    assert cli.main(["bench", "--shapes", "NCHW 1x1x1x1", "--no-progress"]) == 2
    assert "unknown shape" in capsys.readouterr().err


def _ranges_tool():
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bench_ranges.py"))


def test_bench_ranges_judge_the_minimum_targets_on_the_minima(tmp_path, capsys):
    """tools/bench_ranges.py --min reads the *_min keys of the runs that have them (runs
    before minima existed are skipped), and counts a run as meeting a target only if every
    value in it does."""
    tool = _ranges_tool()

    def run(min_ratio, median_ratio, with_min=True):
        row = {"case": "NHWC 64x32x32x64", "shape": [64, 32, 32, 64], "dtype": "float32",
               "copy_times": {"train/fused": 9.0},
               "train_fused_vs_torch_channels_last": median_ratio}
        if with_min:
            row.update(copy_times_min={"train/fused": 2.5},
                       train_fused_vs_torch_channels_last_min=min_ratio,
                       infer_torch_again_vs_torch_min=2 * min_ratio)  # a control
        return {"rows": [row]}

    paths = []
    for i, r in enumerate((run(0.7, 1.5), run(0.9, 0.5), run(0.1, 0.1, with_min=False))):
        paths.append(str(tmp_path / f"run-{i}.json"))
        (tmp_path / f"run-{i}.json").write_text(json.dumps(r))
    assert tool["main"](["--min", *paths]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 runs:")  # the run without minima is left out
    assert "| NHWC f32 train <= 0.8 x torch channels_last | 0.70 - 0.90 | 1 of 2 runs |" in out
    assert "| NHWC f32 train <= 3.0 copy-times | 2.50 - 2.50 | 2 of 2 runs |" in out
    # a control has a range and no target
    assert "| control: torch.nn / torch.nn eval, NCHW, every case | 1.40 - 1.80 | (2 runs) |" in out
    assert tool["main"](paths) == 0  # the median targets: every run
    assert "3 runs:" in capsys.readouterr().out


def test_the_docs_show_the_minimum_targets_of_the_committed_runs(capsys):
    """docs/performance.md's table of the CPU targets is the tool's output on the committed
    runs that report minima."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    runs = sorted(str(p.relative_to(root)) for p in (root / "docs" / "bench").glob("run-*.json"))
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert _ranges_tool()["main"](["--min", *runs]) == 0
    finally:
        os.chdir(cwd)
    table = capsys.readouterr().out.split("\n", 1)[1].strip()
    assert table.count("\n") >= len(_ranges_tool()["TARGETS_MIN"]) + 1
    assert table in (root / "docs" / "performance.md").read_text()
