"""``backend="auto"``: bnlab's kernels only where committed measurements found them faster
than torch's kernel (bnlab.torch.measured, generated from docs/bench-gpu.json for Triton on
CUDA and docs/bench-cpu-engines.json for numba on CPU), torch's kernel (with bnlab's guard)
everywhere else. No GPU here: the CUDA decision is checked on meta tensors of the measured
shapes, and select() with the Triton rule pointed at them; the CPU decision on real CPU
tensors, with the engine that actually ran spied."""

import dataclasses
import json
import runpy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bnlab.torch import engine, measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = json.loads((ROOT / "docs" / "bench-gpu.json").read_text())
CPU = json.loads((ROOT / "docs" / "bench-cpu-engines.json").read_text())


@pytest.fixture(autouse=True)
def weighed(monkeypatch):
    """The default weighing (the suite runs with BNLAB_AUTO=kernels, see conftest)."""
    monkeypatch.delenv("BNLAB_AUTO")


def meta(shape, dtype, fmt="contiguous"):
    x = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x


def test_the_table_is_generated_from_the_committed_bench_run():
    tool = runpy.run_path(str(ROOT / "tools" / "measured_table.py"))
    want = tool["render"](BENCH, CPU)
    assert (ROOT / "src" / "bnlab" / "torch" / "measured.py").read_text() == want
    assert len(measured.MEASURED["triton"]) == 2 * len(BENCH["rows"])
    assert len(measured.MEASURED["numba"]) == 2 * len(CPU["rows"])


@pytest.mark.parametrize("row", BENCH["rows"], ids=[r["case"] for r in BENCH["rows"]])
def test_auto_takes_the_faster_one_on_every_measured_case(row):
    x = meta(row["shape"], row["dtype"], row["memory_format"])
    for training, key in ((True, "train_bnlab_vs_torch"), (False, "infer_bnlab_vs_torch")):
        win = row[key] < engine.WIN_BELOW["triton"]
        assert engine.faster_than_torch("triton", training, x) == win, (
            row["case"], key)


def test_between_measurements_and_outside_them_torch():
    # float32 NCHW training: bnlab loses at 4M elements, wins at 51M
    assert engine.faster_than_torch("triton", True, meta((256, 64, 56, 56), "float32"))
    assert engine.faster_than_torch("triton", True, meta((512, 64, 56, 56), "float32"))  # larger: a win
    assert not engine.faster_than_torch("triton", True, meta((64, 64, 32, 32), "float32"))
    assert not engine.faster_than_torch("triton", True, meta((128, 64, 32, 32), "float32"))  # between
    assert not engine.faster_than_torch("triton", True, meta((8, 64, 32, 32), "float32"))  # smaller
    assert not engine.faster_than_torch("triton", True, meta((256, 64, 56, 56), "bfloat16"))  # not measured
    assert not engine.faster_than_torch("triton", True, meta((256, 64, 56, 56), "float32", "channels_last"))
    # (N, C) is its own layout ("features"): inference wins
    assert engine.faster_than_torch("triton", False, meta((8192, 4096), "float32"))
    assert not engine.faster_than_torch("triton", False, meta((8192, 4096), "float16"))


def test_the_nearest_measurements_decide(monkeypatch):
    """A made-up table: win at 100, loss at 1000, win at 10000 elements (training,
    float32, channels-first)."""
    monkeypatch.setattr(measured, "MEASURED", {"triton": tuple(
        ("train", "channels_first", "float32", n, r) for n, r in
        ((100, 0.5), (1000, 1.2), (10000, 0.8)))})
    want = {50: False, 100: True, 400: False, 1000: False, 4000: False, 10000: True,
            10**6: True}
    for n, faster in want.items():
        x = meta((n // 2, 1, 2), "float32")  # channels-first, n elements
        assert engine.faster_than_torch("triton", True, x) is faster, n


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


# --- CPU: numba against torch's kernel -------------------------------------------------------


def cpu_input(row, shape=None):
    x = torch.zeros(shape or row["shape"], dtype=getattr(torch, row["dtype"]))
    return x.contiguous(memory_format=torch.channels_last) if row["layout"] == "NHWC" else x


@pytest.mark.parametrize("row", CPU["rows"], ids=[f"{r['case']} {r['dtype']}" for r in CPU["rows"]])
def test_auto_on_cpu_takes_the_faster_one_on_every_measured_case(row):
    """Judged on the minima of the interleaved rounds; meta tensors of the measured shapes
    stand in for the largest (the decision reads only shape, layout and dtype)."""
    x = torch.empty(row["shape"], dtype=getattr(torch, row["dtype"]), device="meta")
    if row["layout"] == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        key = f"{'train' if training else 'infer'}_bnlab_vs_torch_min"
        win = row[key] < engine.WIN_BELOW["numba"]
        assert engine.faster_than_torch("numba", training, x) == win, key


def test_a_cpu_win_must_beat_the_noise(monkeypatch):
    """On CPU a measured ratio counts as numba's win only under 0.9 (a single run's ratio
    moves by about 10%); on the GPU under 1.0."""
    x = torch.empty((4, 16, 8, 8), device="meta")
    for ratio, win in ((0.95, False), (0.9, False), (0.89, True)):
        table = {"triton": [("train", "channels_first", "float32", 4096, ratio)],
                 "numba": [("train", "channels_first", "float32", 4096, ratio)]}
        monkeypatch.setattr(measured, "MEASURED", table)
        assert engine.faster_than_torch("numba", True, x) is win, ratio
        assert engine.faster_than_torch("triton", True, x) is True, ratio


def _ran(monkeypatch, fn):
    """The engines whose entry points ran during fn()."""
    from bnlab.kernels import numba_bn

    ran = []
    for name in ("train_forward", "inference", "backward"):
        real = getattr(numba_bn, name)
        monkeypatch.setattr(numba_bn, name, lambda *a, real=real, **k: ran.append("numba")
                            or real(*a, **k))
    native = torch.nn.functional.batch_norm
    monkeypatch.setattr(torch.nn.functional, "batch_norm",
                        lambda *a, **k: ran.append("native") or native(*a, **k))
    fn()
    return set(ran)


def test_auto_on_cpu_runs_what_the_table_says_and_kernels_mode_runs_bnlab(monkeypatch):
    """Real CPU tensors through bnlab.torch.BatchNorm2d: a measured training win runs numba, a
    measured loss torch's kernel (with bnlab's guard: a NaN batch leaves the running
    statistics); evaluation by its own measurement; BNLAB_AUTO=kernels runs numba for both;
    a bad value is an error."""
    import bnlab.torch as bt

    win = loss = None
    WIN = engine.WIN_BELOW["numba"]
    for row in CPU["rows"]:
        if row["layout"] == "NCHW" and row["dtype"] == "float32" and len(row["shape"]) == 4:
            n = 1
            for d in row["shape"]:
                n *= d
            if n <= 1 << 20:
                if row["train_bnlab_vs_torch_min"] < WIN and win is None:
                    win = row
                if row["train_bnlab_vs_torch_min"] >= WIN:
                    loss = row
    assert win is not None and loss is not None, "the table has a win and a loss to test"
    for row, want in ((win, {"numba"}), (loss, {"native"})):
        x = torch.randn(row["shape"])
        bn = bt.BatchNorm2d(row["shape"][1])
        ref = torch.nn.BatchNorm2d(row["shape"][1])
        assert _ran(monkeypatch, lambda: bn(x).sum().backward()) == want, row["case"]
        ref(x)
        torch.testing.assert_close(bn.running_var, ref.running_var)
        nan = x.clone()
        nan[0, 0, 0, 0] = float("nan")
        before = bn.running_mean.clone()
        bn(nan)
        assert torch.equal(bn.running_mean, before)  # the guard, on whichever engine ran
        bn.eval()
        want = {"numba" if row["infer_bnlab_vs_torch_min"] < WIN else "native"}  # its own
        assert _ran(monkeypatch, lambda: bn(x)) == want
        monkeypatch.undo()
        monkeypatch.delenv("BNLAB_AUTO", raising=False)
    x = torch.randn(loss["shape"])
    bn = bt.BatchNorm2d(loss["shape"][1])
    monkeypatch.setenv("BNLAB_AUTO", "kernels")
    assert _ran(monkeypatch, lambda: bn(x).sum().backward()) == {"numba"}
    monkeypatch.setenv("BNLAB_AUTO", "fastest")
    with pytest.raises(ValueError, match="BNLAB_AUTO must be one of"):
        bn(x)


def test_the_docs_show_where_auto_takes_numba_on_cpu():
    """docs/performance.md's table of the CPU measurements is the tool's summary of the
    committed JSON."""
    tool = runpy.run_path(str(ROOT / "tools" / "measured_table.py"))
    assert tool["summary"](CPU) in (ROOT / "docs" / "performance.md").read_text()
