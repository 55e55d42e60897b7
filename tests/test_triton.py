"""The Triton kernels (bnlab.kernels.triton_bn) in Triton's interpreter on CPU tensors:
against bnlab's float64 reference (bnlab.torch.checks, the cases tools/gpu_check.py runs on
a GPU) and against torch.nn through bnlab.torch with backend="triton"."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import bnlab.torch as bt  # noqa: E402
from bnlab import kernels  # noqa: E402
from bnlab.torch import _ops, engine  # noqa: E402
import gpu_cases as checks  # noqa: E402  (tools/: the GPU script's cases)
from test_torch import LAYOUTS, TOL, pair, train_and_eval  # noqa: E402

tb = engine.resolve_triton()
SMALL = [c for c in checks.CASES if c.small]


def test_tests_run_in_the_interpreter():
    assert kernels.triton_interpreted()


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_against_float64_reference(case):
    """Train step (forward with the running-statistics update, backward) and eval step;
    every layout and dtype, odd sizes, C=1, large offsets, within the dtype's rounding."""
    result = checks.run_case(case, "cpu", backend="triton")
    bad = {k: (v, result["tolerances"][k]) for k, v in result["errors"].items()
           if v > result["tolerances"][k]}
    assert not bad, bad
    assert result["torch_running_stats"] <= 128 * checks.EPS32
    assert result["deterministic"] and result["memory_format_kept"]


@pytest.fixture
def fresh_geometry():
    """Tests that change the tile constants: geometries are cached by shape, so start and
    end with empty caches."""
    tb.clear_caches()
    yield
    tb.clear_caches()


def test_geometry_is_cached_by_shape_and_plans_only_on_cuda():
    tb.clear_caches()
    x = torch.empty(8, 3, 5, 5)
    run = tb._geometry(x, torch.contiguous_format)
    assert tb._geometry(torch.empty(8, 3, 5, 5), torch.contiguous_format) is run
    assert tb._geometry(torch.empty(8, 3, 5, 6), torch.contiguous_format) is not run
    assert tb._plan("train", x, None, True) is None  # CPU tensors: Triton's JIT every time
    tb.clear_caches()
    assert tb._geometry(x, torch.contiguous_format) is not run


@pytest.mark.usefixtures("fresh_geometry")
@pytest.mark.parametrize("programs_per_sm,fused_partials,finalize_partials", [
    (1, 1024, 4096), (3, 1024, 4096), (1000, 1024, 4096), (1000, 1, 4096), (1000, 1, 4)],
    ids=["few parts", "uneven", "one tile each", "added once", "added once in chunks"])
def test_split_reductions_agree(monkeypatch, programs_per_sm, fused_partials,
                                finalize_partials):
    """However the tiles are cut into parts (one part per channel block, uneven parts, one
    tile per part) and wherever the parts are added up (in every program, or once by their
    own kernel, at once or in chunks), the results agree with the reference."""
    monkeypatch.setattr(tb, "PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(tb, "FUSED_PARTIALS", fused_partials)
    monkeypatch.setattr(tb, "FINALIZE_PARTIALS", finalize_partials)
    run = tb._geometry(torch.empty(40, 1, 3, 70), torch.contiguous_format)
    assert run.fused == (run.P <= fused_partials)  # the geometry these constants give
    for case in (checks.Case((40, 1, 3, 70)), checks.Case((300, 3), dtype="float16"),
                 checks.Case((40, 2, 3, 70), "channels_last")):
        result = checks.run_case(case, "cpu", backend="triton")
        assert result["ok"], result


def test_launch_splits_small_channel_counts():
    x = torch.empty(40, 1, 3, 70)
    run = tb._Launch(x, torch.contiguous_format)
    assert (run.BC, run.BL) == (1, 256) and run.P > 1  # C=1: many parts of one channel
    run = tb._Launch(x.contiguous(memory_format=torch.channels_last), torch.channels_last)
    assert (run.N, run.L, run.BL, run.strides) == (40 * 3 * 70, 1, 1, (1, 1, 1))


@pytest.mark.parametrize("layout", ["NC", "NCL", "NCHW", "NCHW channels_last",
                                    "NCDHW channels_last_3d", "NCHW strided slice"])
def test_modules_match_torch_over_training_then_eval(layout):
    shape, fmt = LAYOUTS[layout]
    ours, theirs = pair(len(shape), shape[1], torch.float32)
    ours.backend = "triton"
    train_and_eval(ours, theirs, shape, fmt, torch.float32)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False)],
                         ids=["momentum None", "affine off", "no running stats"])
def test_module_options_match_torch(kwargs):
    ours, theirs = pair(4, 3, torch.float32, **kwargs)
    ours.backend = "triton"
    train_and_eval(ours, theirs, (6, 3, 4, 5), None, torch.float32, steps=3)


def test_half_activations_with_float32_parameters():
    """What autocast produces: float16 x into a float32 module; y and dx in float16,
    running statistics and parameter gradients in float32, as torch's."""
    ours, theirs = pair(4, 3, torch.float32)
    ours.backend = "triton"
    x = torch.randn(6, 3, 5, 5).half().requires_grad_()
    dy = torch.randn(6, 3, 5, 5).half()
    y = ours(x)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == torch.float16
    assert ours.weight.grad.dtype == ours.running_mean.dtype == torch.float32
    xr = x.detach().float().requires_grad_()
    yr = theirs(xr)  # torch in float32 on the same (float16-valued) input
    yr.backward(dy.float())
    torch.testing.assert_close(y.float(), yr, rtol=1e-3, atol=2e-3)  # y rounded to float16
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    # dx rounded to float16: a few float16 ulps of dx's scale
    scale = float(xr.grad.abs().max())
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=0, atol=8e-3 * scale)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.usefixtures("fresh_geometry")
@pytest.mark.parametrize("fused_partials", [1024, 1], ids=["added in place", "added once"])
def test_nonfinite_batch_leaves_running_stats_unchanged(monkeypatch, fused_partials):
    monkeypatch.setattr(tb, "FUSED_PARTIALS", fused_partials)
    ours, _ = pair(4, 3, torch.float32)
    ours.backend = "triton"
    x = torch.randn(8, 3, 4, 4)
    ours(x)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = x.clone()
    bad[3, 2, 1, 1] = float("inf")
    y = ours(bad)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the separate update (the traced path) keeps the same guard
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    mean = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64)
    _ops.TRITON_OPS.update(rm, rv, nbt, mean, torch.ones(3), 10, 0.1)
    assert torch.equal(rm, torch.zeros(3)) and int(nbt) == 0
    _ops.TRITON_OPS.update(rm, rv, nbt, mean.nan_to_num(), torch.ones(3), 10, 0.1)
    assert int(nbt) == 1 and rm[2] == pytest.approx(0.1)


def test_triton_ops_pass_torch_opcheck():
    """Schema, fake implementations and autograd of the Triton custom ops (the traced path)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 2, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3, generator=g), torch.randn(3, generator=g)
    rm, rv = torch.zeros(3), torch.ones(3)
    ops = _ops.TRITON_OPS
    y, mean, var, inv_std = ops.train(x, w, b, 1e-5)
    assert mean.dtype == torch.float64 and var.dtype == inv_std.dtype == torch.float32
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.train, (x, w, b, 1e-5), test_utils=tests)
    torch.library.opcheck(ops.eval, (x, rm, rv, w, b, 1e-5), test_utils=tests)
    torch.library.opcheck(ops.backward, (torch.randn_like(x), x, mean, inv_std, w, True),
                          test_utils=tests)
    nbt = torch.zeros((), dtype=torch.long)
    torch.library.opcheck(ops.update, (rm, rv, nbt, mean, var, 40, 0.1), test_utils=tests)


def test_backend_errors(monkeypatch):
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        bt.batch_norm(x.double(), None, None, training=True, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        bt.batch_norm(x, None, None, training=True, backend="triton")


def test_auto_keeps_numba_on_cpu(monkeypatch):
    """Under "auto", CPU tensors go to numba even where the interpreter could run Triton."""
    calls = []
    monkeypatch.setattr(tb, "train_forward", lambda *a, **k: calls.append(a))
    bt.batch_norm(torch.randn(4, 3), None, None, training=True)
    assert not calls


def test_gpu_machine_imports(tmp_path):
    """The GPU machine has torch, Triton and numba but not mlxtend, matplotlib, pooch (nor
    tqdm, scikit-learn): bnlab.torch, the GPU bench and its JSON writer import without them."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('mlxtend', 'matplotlib', 'pooch', 'tqdm', 'sklearn'):\n"
            "    sys.modules[m] = None\n"
            "import bnlab.torch, bnlab.bench_gpu, bnlab.cli\n"
            "from bnlab.torch import engine\n"
            "engine.resolve_triton()\n"
            f"bnlab.bench_gpu.write_json({{'ok': 1}}, {str(tmp_path / 'a.json')!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a.json").read_text().strip().startswith("{")


def test_gpu_bench_and_check_script_dry_run(tmp_path, monkeypatch, capsys):
    """tools/gpu_check.py and bnlab.bench_gpu end to end on CPU (the interpreter), with two
    correctness cases and one bench case: the files the GPU run will write."""
    import json
    import runpy

    from bnlab import bench_gpu, cli

    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(checks, "CASES", [SMALL[0], checks.Case((3, 2, 4, 4), small=False)])
    monkeypatch.setattr(bench_gpu, "SMALL_CASES", [bench_gpu.GpuCase((6, 5, 7, 9), "float16",
                                                                     "channels_last")])
    gpu_check = runpy.run_path("tools/gpu_check.py")
    assert gpu_check["main"](["--device", "cpu", "--out", str(tmp_path), "--rep-ms", "1",
                              "--skip-distributed"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["all_ok"] and len(report["checks"]) == 1
    assert report["skipped"] == ["distributed", "3x2x4x4 float32 contiguous"]
    assert report["over_budget"] == []
    # a case not run for lack of time is not a pass
    assert gpu_check["main"](["--device", "cpu", "--out", str(tmp_path / "b"), "--rep-ms", "1",
                              "--skip-distributed", "--budget", "0"]) == 1
    report = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert not report["all_ok"] and report["over_budget"] == [SMALL[0].name]
    bench = json.loads((tmp_path / "bench-gpu.json").read_text())
    (row,) = bench["rows"]
    assert row["case"] == "6x5x7x9 float16 NHWC"
    assert set(row["copy_times"]) == {"train/torch", "train/bnlab", "train/auto", "infer/torch",
                                      "infer/bnlab", "infer/auto"}
    # float16 on CPU: torch's kernel (on CUDA auto weighs Triton against it by measurement)
    assert row["auto_engine"] == {"train": "native", "infer": "native"}  # float16 on CPU
    assert "train torch" in (tmp_path / "bench-gpu.txt").read_text()


def test_kernels_compile_for_an_h100_with_vector_loads():
    """tools/triton_compile_check.py: the launches of two cases compiled for sm_90 (no GPU
    needed; a subprocess, since this one interprets the kernels), the elementwise passes
    with 128-bit loads and stores."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, runpy\n"
            "from bnlab.bench_gpu import GpuCase\n"
            "tool = runpy.run_path('tools/triton_compile_check.py')\n"
            "rows = tool['compile_all']([GpuCase((64, 64, 32, 32), 'float32'),\n"
            "                            GpuCase((256, 64, 56, 56), 'bfloat16', 'channels_last')],\n"
            "                           progress=False)\n"
            "print(json.dumps(rows))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.splitlines()[-1])
    kernels = {r["kernel"] for r in rows}
    assert {"_stats_kernel", "_normalize_kernel", "_grad_sums_kernel", "_dx_kernel",
            "_finalize_stats_kernel", "_finalize_grads_kernel", "_add_act_kernel"} <= kernels
    for r in rows:
        if r["kernel"] in ("_normalize_kernel", "_dx_kernel", "_add_act_kernel"):
            assert r["ld_v4"] > 0 and r["st_v4"] > 0, r
        if r["kernel"] in ("_stats_kernel", "_grad_sums_kernel"):
            assert r["ld_v4"] > 0, r


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_act_fused_in_the_triton_kernels(fmt):
    """BatchNormAct2d with backend="triton": ReLU in the normalize pass, dy gated in both
    backward passes; equal to torch's BatchNorm2d then ReLU (train and eval)."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours = bt.BatchNormAct2d(3)
    ours.load_state_dict(ref.state_dict())
    ours.backend = "triton"
    calls = []
    real = tb.train_forward
    tb_train = lambda *a, **k: calls.append(a[-1] if len(a) > 8 else k.get("act")) or real(*a, **k)  # noqa: E731
    import unittest.mock
    with unittest.mock.patch.object(tb, "train_forward", tb_train):
        for _ in range(2):
            x = (0.3 + torch.randn(5, 3, 4, 6)).contiguous(memory_format=fmt)
            dy = torch.randn(5, 3, 4, 6)
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_ref = torch.relu(ref(xr))
            y_ref.backward(dy)
            y = ours(xo)
            y.backward(dy)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.running_var, ref.running_var)
            ours.weight.grad = ours.bias.grad = ref.weight.grad = ref.bias.grad = None
    assert calls == ["relu", "relu"]  # the fused Triton path ran
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = ours(x)
    y.sum().backward()
    torch.relu(ref(xr)).sum().backward()
    torch.testing.assert_close(y, torch.relu(ref(xr.detach())), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
