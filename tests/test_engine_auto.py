"""``backend="auto"`` on CUDA: Triton only where a committed GPU bench run measured it faster
than torch's kernel (bnlab.torch.measured, generated from docs/bench-gpu.json), torch's
kernel (with bnlab's guard) everywhere else. No GPU here: the decision is checked on meta
tensors of the measured shapes, and select() with the Triton rule pointed at them."""

import dataclasses
import json
import runpy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bnlab.torch import engine, measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = json.loads((ROOT / "docs" / "bench-gpu.json").read_text())


def meta(shape, dtype, fmt="contiguous"):
    x = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


def test_the_table_is_generated_from_the_committed_bench_run():
    tool = runpy.run_path(str(ROOT / "tools" / "measured_table.py"))
    want = tool["render"](BENCH, "docs/bench-gpu.json")
    assert (ROOT / "src" / "bnlab" / "torch" / "measured.py").read_text() == want
    assert len(measured.MEASURED) == 2 * len(BENCH["rows"])


@pytest.mark.parametrize("row", BENCH["rows"], ids=[r["case"] for r in BENCH["rows"]])
def test_auto_takes_the_faster_one_on_every_measured_case(row):
    x = meta(row["shape"], row["dtype"], row["memory_format"])
    for training, key in ((True, "train_bnlab_vs_torch"), (False, "infer_bnlab_vs_torch")):
        assert engine.faster_on_cuda(training, x) == (row[key] < 1.0), (row["case"], key)


def test_between_measurements_and_outside_them_torch():
    # float32 NCHW training: bnlab loses at 4M elements, wins at 51M
    assert engine.faster_on_cuda(True, meta((256, 64, 56, 56), "float32"))
    assert engine.faster_on_cuda(True, meta((512, 64, 56, 56), "float32"))  # larger: a win
    assert not engine.faster_on_cuda(True, meta((64, 64, 32, 32), "float32"))
    assert not engine.faster_on_cuda(True, meta((128, 64, 32, 32), "float32"))  # between
    assert not engine.faster_on_cuda(True, meta((8, 64, 32, 32), "float32"))  # smaller
    assert not engine.faster_on_cuda(True, meta((256, 64, 56, 56), "bfloat16"))  # not measured
    assert not engine.faster_on_cuda(True, meta((256, 64, 56, 56), "float32", "channels_last"))
    # (N, C) is measured as channels-last (the kernels' view): inference wins
    assert engine.faster_on_cuda(False, meta((8192, 4096), "float32"))
    assert not engine.faster_on_cuda(False, meta((8192, 4096), "float16"))


def test_the_nearest_measurements_decide(monkeypatch):
    """A made-up table: win at 100, loss at 1000, win at 10000 elements (training,
    float32, channels-first)."""
    monkeypatch.setattr(measured, "MEASURED", tuple(
        ("train", "channels_first", "float32", n, r) for n, r in
        ((100, 0.5), (1000, 1.2), (10000, 0.8))))
    want = {50: False, 100: True, 400: False, 1000: False, 4000: False, 10000: True,
            10**6: True}
    for n, faster in want.items():
        x = meta((n // 2, 1, 2), "float32")  # channels-first, n elements
        assert engine.faster_on_cuda(True, x) is faster, n


def test_select_weighs_triton_against_torch_by_the_measurements(monkeypatch):
    """select("auto") with the Triton rule taking meta tensors (standing in for CUDA)."""
    rules = tuple(dataclasses.replace(r, devices=("meta",)) if r.engine == "triton" else r
                  for r in engine.RULES)
    monkeypatch.setattr(engine, "RULES", rules)
    monkeypatch.setattr(engine, "available", lambda name: True)
    big, small = meta((256, 64, 56, 56), "float32"), meta((64, 64, 32, 32), "float32")
    assert engine.select("auto", big, training=True) == "triton"
    assert engine.select("auto", small, training=True) == "native"
    assert engine.select("auto", meta((256, 64, 56, 56), "float16", "channels_last"),
                         training=True) == "native"
    assert engine.select("auto", meta((256, 64, 56, 56), "float16", "channels_last"),
                         training=False) == "triton"
    # SyncBatchNorm's collectives exist only in bnlab's kernels: no weighing there
    assert engine.select("auto", small, training=True, measured=False) == "triton"
    # a forced backend is never weighed
    monkeypatch.setattr(engine, "_refusal", lambda *a: None)
    monkeypatch.setattr(engine, "_require", lambda name: None)
    assert engine.select("triton", small, training=True) == "triton"


def test_the_docs_say_where_auto_takes_triton():
    text = (ROOT / "docs" / "performance.md").read_text()
    assert "where measured faster than torch's kernel" in engine.table()
    assert engine.table() in text
