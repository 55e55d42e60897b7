"""The fused numba kernels against the NumPy reference (the oracle).

Both are also bounded against an extended-precision truth at m >= 1e5 in test_accuracy.py.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import functional as F
from bnlab import kernels, nn

# Agreement within the rounding of each dtype (outputs are O(1) by construction).
TOL = {np.float64: dict(rtol=1e-10, atol=1e-11), np.float32: dict(rtol=2e-5, atol=2e-5),
       np.float16: dict(rtol=4e-3, atol=4e-3)}
CASES = [((6, 5, 7, 9), 1), ((6, 7, 9, 5), -1), ((33, 5), 1), ((4, 5, 11), 1),
         ((3, 1100), 1), ((2, 1, 3, 3), 1), ((2, 3, 3, 1), -1), ((7, 1), 1)]


def data(shape, axis, dtype, seed=0, loc=1.0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    pdt = np.float32 if dtype == np.float16 else dtype
    x = (loc + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = (1 + 0.3 * rng.standard_normal(C)).astype(pdt), rng.standard_normal(C).astype(pdt)
    return x, dy, gamma, beta


def both(fn):
    return fn("numpy"), fn("numba")


def close(a, b, dtype):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **TOL[dtype])


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_train_forward_backward_agree_with_reference(shape, axis, dtype):
    x, dy, gamma, beta = data(shape, axis, dtype)
    (y0, c0), (y1, c1) = both(lambda b: F.batch_norm_forward(x, gamma, beta, axis=axis, backend=b))
    assert y1.dtype == x.dtype and y1.shape == x.shape
    assert c1.mean.dtype == c0.mean.dtype  # statistics in compute precision on both paths
    close(y1, y0, dtype)
    close(c1.mean, c0.mean, dtype)
    close(c1.var, c0.var, dtype)
    g0, g1 = F.batch_norm_backward(dy, c0, backend="numpy"), F.batch_norm_backward(dy, c1, backend="numba")
    m = x.size // x.shape[axis]
    for a, b, scale in zip(g1, g0, (1.0, np.sqrt(m), np.sqrt(m))):  # sums grow like sqrt(m)
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, float) / scale, np.asarray(b, float) / scale,
                                   **TOL[dtype])


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_inference_and_eval_backward_agree_with_reference(shape, axis, dtype):
    x, dy, gamma, beta = data(shape, axis, dtype, seed=1)
    C = shape[axis]
    mean, var = gamma * 0.5, 0.5 + np.abs(beta)
    (y0, c0), (y1, c1) = both(lambda b: F.batch_norm_inference(x, mean, var, gamma, beta,
                                                               axis=axis, backend=b))
    close(y1, y0, dtype)
    for a, b in zip(F.batch_norm_backward(dy, c1, backend="numba"),
                    F.batch_norm_backward(dy, c0, backend="numpy")):
        close(np.asarray(a) / np.sqrt(x.size // C), np.asarray(b) / np.sqrt(x.size // C), dtype)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(2, 9), C=st.integers(1, 9), H=st.integers(1, 7), W=st.integers(1, 7),
       layout=st.sampled_from(["NCHW", "NHWC", "NC"]), f64=st.booleans(),
       seed=st.integers(0, 2**31))
def test_random_shapes_agree_with_reference(N, C, H, W, layout, f64, seed):
    dtype = np.float64 if f64 else np.float32
    shape, axis = {"NCHW": ((N, C, H, W), 1), "NHWC": ((N, H, W, C), -1), "NC": ((N * H, C), 1)}[layout]
    x, dy, gamma, beta = data(shape, axis, dtype, seed=seed)
    (y0, c0), (y1, c1) = both(lambda b: F.batch_norm_forward(x, gamma, beta, axis=axis, backend=b))
    close(y1, y0, dtype)
    dx0, _, _ = F.batch_norm_backward(dy, c0, backend="numpy")
    dx1, _, _ = F.batch_norm_backward(dy, c1, backend="numba")
    close(dx1, dx0, dtype)


def test_backend_selection(monkeypatch):
    assert kernels.resolve("numpy") is None
    assert kernels.resolve("numba") is not None and kernels.resolve("auto") is not None
    monkeypatch.setenv("BNLAB_BACKEND", "numpy")
    assert kernels.resolve("auto") is None
    assert kernels.resolve("numba") is not None  # explicit beats the environment
    monkeypatch.setenv("BNLAB_BACKEND", "cuda")
    with pytest.raises(ValueError, match="BNLAB_BACKEND must be one of"):
        kernels.resolve("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        F.batch_norm_forward(np.ones((4, 2)), None, None, backend="fast")


def test_layers_use_the_fused_path_by_default():
    x, dy, gamma, beta = data((8, 3, 5, 5), 1, np.float32, seed=4)
    bn = nn.BatchNorm2d(3)
    bn.weight.data[...] = gamma
    bn.bias.data[...] = beta
    y = bn(x)
    expected, _ = F.batch_norm_forward(x, gamma, beta, backend="numba")
    np.testing.assert_array_equal(y, expected)


def test_non_contiguous_input_is_handled():
    x, dy, gamma, beta = data((6, 5, 4, 3), 1, np.float64)
    xt = np.transpose(x, (0, 1, 3, 2))  # a strided view
    (y0, _), (y1, _) = both(lambda b: F.batch_norm_forward(xt, gamma, beta, backend=b))
    close(y1, y0, np.float64)


def test_thread_cap_changes_speed_not_results(monkeypatch):
    from bnlab.kernels import numba_bn

    monkeypatch.setattr(numba_bn, "PARALLEL_MIN_SIZE", 16)  # make this small case "large"
    x, dy, gamma, beta = data((8, 6, 9, 9), 1, np.float64, seed=7)
    y_all, c_all = F.batch_norm_forward(x, gamma, beta, backend="numba")
    with kernels.num_threads(1):
        assert numba_bn.max_threads == 1
        y_one, c_one = F.batch_norm_forward(x, gamma, beta, backend="numba")
        g_one = F.batch_norm_backward(dy, c_one, backend="numba")
    assert numba_bn.max_threads is None
    g_all = F.batch_norm_backward(dy, c_all, backend="numba")
    close(y_one, y_all, np.float64)
    for a, b in zip(g_one, g_all):
        close(a, b, np.float64)
    with pytest.raises(ValueError, match="positive integer or None"):
        with kernels.num_threads(0):
            pass


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_without_numba_everything_takes_the_reference():
    r = run_python("""
        import sys
        sys.modules["numba"] = None                 # as if numba were not installed
        import numpy as np
        from bnlab import functional as F, kernels, nn
        assert kernels.resolve("auto") is None
        x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
        y, cache = F.batch_norm_forward(x, None, None)
        y0, _ = F.batch_norm_forward(x, None, None, backend="numpy")
        assert np.array_equal(y, y0)
        F.batch_norm_backward(np.ones_like(x), cache)
        with kernels.num_threads(1):
            nn.BatchNorm2d(3)(x)
        try:
            F.batch_norm_forward(x, None, None, backend="numba")
        except ImportError as e:
            print(e)
        # bnlab.torch: torch's kernel in its place, with bnlab's guard
        import torch
        import bnlab.torch as bt
        bn = bt.BatchNorm2d(3)
        bad = torch.from_numpy(x).clone()
        bad[0, 0, 0, 0] = float("nan")
        bn(bad)
        assert int(bn.num_batches_tracked) == 0 and torch.isfinite(bn.running_mean).all()
        bn(torch.from_numpy(x))
    """)
    assert r.returncode == 0, r.stderr
    assert 'backend="numba" needs numba, which failed to import' in r.stdout
    # said once, with what it costs, however many calls
    assert r.stderr.count("numba failed to import") == 1, r.stderr
    assert "about 9x slower" in r.stderr and "pip install numba" in r.stderr


def test_bnlab_num_threads_caps_every_kernel_call():
    r = run_python("""
        import numpy as np
        from bnlab import functional as F
        from bnlab.kernels import numba_bn
        used = []
        real = numba_bn.set_num_threads
        numba_bn.set_num_threads = lambda n: (used.append(n), real(n))
        x = np.random.default_rng(0).standard_normal((64, 16, 32, 32)).astype(np.float32)
        assert x.size >= numba_bn.PARALLEL_MIN_SIZE
        F.batch_norm_forward(x, None, None, backend="numba")
        print(numba_bn.max_threads, used)
    """, BNLAB_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "1 [1, 2]"   # one thread for the call, then restored
    r = run_python("import bnlab.kernels.numba_bn", BNLAB_NUM_THREADS="two")
    assert r.returncode != 0
    assert "BNLAB_NUM_THREADS must be a positive integer, got 'two'" in r.stderr


def test_large_numpy_outputs_reuse_memory_only_once_nothing_holds_it():
    """bnlab.kernels.memory.OUTPUTS: a large output (>= 4 MiB) of the NumPy kernels is a view
    of a kept buffer on a 2 MiB boundary; while the output or any view of it lives (or a
    torch tensor made from it), the buffer is never handed out again; once nothing holds it,
    the next output of that size reuses it (no fresh, kernel-zeroed pages)."""
    from bnlab.kernels import memory

    torch = pytest.importorskip("torch")
    memory.OUTPUTS.clear()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64, 32, 32)).astype(np.float32)  # 4 MiB
    g, b = np.ones(64, np.float32), np.zeros(64, np.float32)

    def forward(scale=1.0):
        return F.batch_norm_forward(x * scale, g, b, backend="numba")[0]

    y = forward()
    ptr = y.ctypes.data
    assert ptr % memory.HUGE == 0 and not y.flags.owndata
    del y
    assert forward().ctypes.data == ptr  # dropped at once: reused
    for hold in (lambda y: y, lambda y: y[1:], lambda y: y.reshape(-1)[::2],
                 lambda y: torch.from_numpy(y)):
        y = forward()
        want, ptr = y.copy(), y.ctypes.data
        kept = hold(y)
        del y
        others = [forward(k + 2.0) for k in range(3)]
        assert all(o.ctypes.data != ptr for o in others)
        kept = kept.numpy() if isinstance(kept, torch.Tensor) else kept
        assert np.array_equal(kept, want[1:] if kept.shape[0] == 15 else
                              want.reshape(-1)[::2] if kept.ndim == 1 else want)
        del kept, others
    small = F.batch_norm_forward(x[:2], g, b, backend="numba")[0]
    assert all(small.base is not buf for buf, _ in memory.OUTPUTS._kept)  # small: plain arrays
