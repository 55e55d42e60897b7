"""The benchmark harness at a tiny size: structure, ratios, JSON and the CLI."""

import json

import pytest

from bnlab import bench, cli


def test_bench_run_and_table(tmp_path):
    result = bench.run(shapes={"NCHW tiny": ("NCHW", (4, 3, 8, 8)), "NHWC tiny": ("NHWC", (4, 8, 8, 3)),
                               "NC tiny": ("NC", (16, 32))},
                       dtypes=["float32"], repeats=3, cnn=True, progress=False)
    rows = result["rows"]
    assert [r["case"] for r in rows] == ["NCHW tiny", "NHWC tiny", "NC tiny"]
    for r in rows:
        assert r["copy_times"]["copy"] == 1.0
        for key in ("train/reference", "train/fused", "infer/fused", "train/torch", "infer/torch"):
            assert r["seconds"][key] > 0
        assert r["train_fused_vs_torch"] == pytest.approx(
            r["seconds"]["train/fused"] / r["seconds"]["train/torch"])
    assert "train/torch_channels_last" in rows[0]["seconds"]  # 4-D rows time both layouts
    assert "train/torch_channels_last" in rows[1]["seconds"]
    assert "train/torch_channels_last" not in rows[2]["seconds"]
    assert result["seed_cnn_step"]["seconds"]["bnlab"] > 0
    table = bench.format_table(result)
    assert "NCHW tiny" in table and "seed CNN training step" in table
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
