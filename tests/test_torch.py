"""bnlab.torch against torch.nn: same state in, same outputs, gradients and buffers out."""

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab import models  # noqa: E402
from bnlab.kernels import numba_bn  # noqa: E402
from bnlab.torch import _ops  # noqa: E402

# float64: differences are rounding only; float32: the kernels accumulate in float64 and
# torch in float32/float64 by turns, so a few float32 ulps of the values' scale.
TOL = {torch.float64: dict(fwd=(1e-12, 1e-12), grad=(1e-10, 1e-10)),
       torch.float32: dict(fwd=(1e-5, 1e-5), grad=(1e-4, 1e-4))}

CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
LAYOUTS = {  # name: (shape, memory format or "strided")
    "NC": ((16, 5), None),
    "NCL": ((6, 5, 7), None),
    "NCHW": ((6, 5, 4, 3), None),
    "NCHW channels_last": ((6, 5, 4, 3), torch.channels_last),
    "NCDHW": ((3, 5, 2, 3, 4), None),
    "NCDHW channels_last_3d": ((3, 5, 2, 3, 4), torch.channels_last_3d),
    "NCHW strided slice": ((6, 5, 4, 6), "strided"),
}


def pair(rank, C, dtype, seed=0, **kwargs):
    """(bnlab module, torch module) of the same class with the same random state."""
    ours = getattr(bt, CLASSES[rank])(C, dtype=dtype, **kwargs)
    theirs = getattr(torch.nn, CLASSES[rank])(C, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ours.affine:
            ours.weight.copy_(0.5 + torch.rand(C, generator=g, dtype=dtype))
            ours.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def batch(shape, fmt, dtype, g):
    x = 3.0 + 2.0 * torch.randn(shape, generator=g, dtype=dtype)
    if fmt == "strided":
        return x[..., ::2]  # not contiguous in any format
    return x if fmt is None else x.contiguous(memory_format=fmt)


def assert_close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])


def assert_same_state(ours, theirs, tol):
    for (k, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k == k2
        if a.is_floating_point():
            assert_close(a, b, tol)
        else:
            assert torch.equal(a, b), k


def train_and_eval(ours, theirs, shape, fmt, dtype, steps=3, lr=0.1):
    """Several training steps (forward, backward, an SGD update of gamma and beta), then
    evaluation; every output, gradient and buffer compared on the way."""
    tol = TOL[dtype]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = batch(shape, fmt, dtype, g)
        # ours gets x itself (strided stays strided: clone() would make it contiguous)
        x1, x2 = x.detach().requires_grad_(), x.detach().clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        assert_close(y1, y2, tol["fwd"])
        assert y1.stride() == y2.stride()  # memory format follows torch's
        dy = torch.randn(y1.shape, generator=g, dtype=dtype)
        y1.backward(dy)
        y2.backward(dy)
        assert_close(x1.grad, x2.grad, tol["grad"])
        if ours.affine:
            assert_close(ours.weight.grad, theirs.weight.grad, tol["grad"])
            assert_close(ours.bias.grad, theirs.bias.grad, tol["grad"])
            with torch.no_grad():
                for m in (ours, theirs):
                    for p in m.parameters():
                        p -= lr * p.grad
                        p.grad = None
        assert_same_state(ours, theirs, tol["fwd"])
    ours.eval()
    theirs.eval()
    x = batch(shape, fmt, dtype, g)
    assert_close(ours(x), theirs(x), tol["fwd"])
    with torch.no_grad():
        assert_close(ours(x), theirs(x), tol["fwd"])
    assert_same_state(ours, theirs, tol["fwd"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_torch_over_training_then_eval(layout, dtype):
    shape, fmt = LAYOUTS[layout]
    ours, theirs = pair(len(shape), shape[1], dtype)
    train_and_eval(ours, theirs, shape, fmt, dtype)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(momentum=0.37), dict(affine=False),
                                    dict(track_running_stats=False), dict(eps=1e-3)],
                         ids=["momentum None", "momentum 0.37", "affine off", "no running stats",
                              "eps"])
@pytest.mark.parametrize("layout", ["NCHW", "NCHW channels_last", "NC"])
def test_options_match_torch(layout, kwargs):
    shape, fmt = LAYOUTS[layout]
    ours, theirs = pair(len(shape), shape[1], torch.float64, **kwargs)
    train_and_eval(ours, theirs, shape, fmt, torch.float64, steps=4)


def test_eval_without_running_stats_uses_batch_statistics():
    ours, theirs = pair(4, 3, torch.float64, track_running_stats=False)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert_close(ours(x), theirs(x), TOL[torch.float64]["fwd"])
    assert ours.running_mean is None


def test_inputs_without_grad_and_under_no_grad():
    ours, theirs = pair(4, 3, torch.float32)
    x = torch.randn(8, 3, 5, 5)
    y = ours(x)  # parameters require grad: y does too, x gets none
    assert y.requires_grad and x.grad is None
    y.sum().backward()
    assert ours.weight.grad is not None
    with torch.no_grad():
        y = ours(x)
    assert not y.requires_grad
    theirs(x)
    with torch.no_grad():
        theirs(x)
    assert_same_state(ours, theirs, TOL[torch.float32]["fwd"])
    frozen = bt.BatchNorm2d(3, affine=False)
    assert not frozen(x).requires_grad


@pytest.mark.parametrize("layout", ["NCHW", "NCHW channels_last", "NCL", "NC"])
def test_gradcheck_float64(layout):
    shape, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    x = batch(shape, fmt, torch.float64, g).requires_grad_()
    w = (0.5 + torch.rand(shape[1], generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(shape[1], generator=g, dtype=torch.float64)
    rv = 0.5 + torch.rand(shape[1], generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: bt.batch_norm(x, None, None, w, b, training=True, backend="numba"),
        (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: bt.batch_norm(x, rm, rv, w, b, training=False, backend="numba"),
        (x, w, b))
    assert torch.autograd.gradcheck(  # no affine parameters: gradient for x alone
        lambda x: bt.batch_norm(x, None, None, training=True, backend="numba"), (x,))


def test_kernels_read_torch_memory_in_place(monkeypatch):
    """Contiguous and channels-last tensors reach the kernels as views of their own memory,
    and the kernels write straight into the output tensor."""
    seen = []
    real = numba_bn.train_forward

    def spy(x, *args, out=None, **kwargs):
        seen.append((x.ctypes.data, out.ctypes.data, x.shape))
        return real(x, *args, out=out, **kwargs)

    monkeypatch.setattr(numba_bn, "train_forward", spy)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 5, 6).contiguous(memory_format=fmt)
        y = bt.batch_norm(x, None, None, training=True)
        x_ptr, y_ptr, shape = seen[-1]
        assert (x_ptr, y_ptr) == (x.data_ptr(), y.data_ptr())
        assert shape == ((4, 3, 5, 6) if fmt == torch.contiguous_format else (4, 5, 6, 3))
        assert y.is_contiguous(memory_format=fmt)


def test_torch_threads_cap_the_kernels(monkeypatch):
    """The kernels take at most torch.get_num_threads() threads inside torch."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    policy = _ops._threads()
    assert policy.cap == 1 and policy.parallel_min_size == _ops.PARALLEL_MIN_SIZE
    used = []
    real_set = numba_bn.set_num_threads
    monkeypatch.setattr(numba_bn, "set_num_threads", lambda n: (used.append(n), real_set(n)))
    monkeypatch.setattr(_ops, "PARALLEL_MIN_SIZE", 16)  # make this small case "large"
    bt.batch_norm(torch.randn(4, 3, 8, 8), None, None, training=True)
    if numba_bn.get_num_threads() > 1:
        assert used and used[0] == 1


def test_compiled_model_matches_eager():
    """torch.compile(fullgraph=True) traces the custom ops (no graph break) and gives the
    eager model's outputs, gradients and buffers, in training and in evaluation."""
    torch._dynamo.reset()
    eager = bt.convert(bt.models.seed_cnn(channels=(4, 6)))
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.rand(8, 1, 28, 28, generator=g)
        y1, y2 = eager(x), compiled(x)
        assert_close(y1, y2, (1e-5, 1e-5))
        y1.square().sum().backward()
        y2.square().sum().backward()
        for (name, p1), p2 in zip(eager.named_parameters(), twin.parameters()):
            assert_close(p1.grad, p2.grad, (1e-4, 1e-5))
    assert_same_state(eager, twin, (1e-6, 1e-6))
    assert int(twin[1].num_batches_tracked) == 2
    eager.eval()
    twin.eval()
    x = torch.rand(8, 1, 28, 28, generator=g)
    assert_close(eager(x), compiled(x), (1e-5, 1e-5))


# --- NaN/inf batches ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "auto"), (torch.float64, "auto"),
                                           (torch.float32, "native"), (torch.bfloat16, "auto")],
                         ids=["numba f32", "numba f64", "native", "bf16 torch path"])
def test_nonfinite_batch_leaves_running_stats_unchanged(dtype, backend):
    """Output NaN as torch's (so a GradScaler skips the step); running statistics and
    num_batches_tracked keep their values, where torch's become NaN."""
    ours, theirs = pair(4, 3, dtype)
    ours.backend = backend
    x = torch.randn(8, 3, 4, 4, dtype=dtype)
    ours(x)
    theirs(x)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = x.clone()
    bad[2, 1, 0, 0] = float("nan")
    bad[3, 2, 1, 1] = float("inf")
    bad.requires_grad_()
    y, y_torch = ours(bad), theirs(bad.detach())
    assert torch.equal(torch.isnan(y), torch.isnan(y_torch))
    assert torch.isnan(y[:, 1:]).all() and not torch.isnan(y[:, 0]).any()
    y.sum().backward()  # the step's gradients are NaN too: a scaler would skip it
    assert torch.isnan(bad.grad[:, 1:]).all()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.isfinite(theirs.running_mean[1:]).any()  # what torch does
    ours(x)  # the next finite batch updates as usual
    assert int(ours.num_batches_tracked) == 2


def test_functional_nonfinite_batch_guard():
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(8, 3)
    x[0, 0] = float("inf")
    for backend in ("auto", "numba", "reference", "native"):  # torch's kernel guarded too
        y = bt.batch_norm(x, rm, rv, training=True, backend=backend)
        assert torch.isnan(y[:, 0]).all()
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    torch.nn.functional.batch_norm(x, rm, rv, training=True)  # torch's own: poisoned
    assert not torch.isfinite(rm[0])


def test_held_views_follow_the_tensor_and_do_not_keep_it():
    """The NumPy views of parameters and buffers kept between steps: the same view while
    the tensor keeps its memory, a new one when ``.data`` moves it (dtype included), none
    for what NumPy cannot update in place, and the entry goes with the tensor."""
    import gc
    import weakref

    from bnlab.torch import engine

    p = torch.nn.Parameter(torch.zeros(4))
    v = engine.held_view(p)
    assert engine.held_view(p) is v
    v[1] = 5.0  # a view: writes reach the tensor
    assert p[1].item() == 5.0
    p.data = torch.ones(4)
    v2 = engine.held_view(p)
    assert v2 is not v and (v2 == 1).all()
    p.data = torch.full((4,), 2.0, dtype=torch.float64)
    v3 = engine.held_view(p)
    assert v3.dtype == np.float64 and (v3 == 2).all()
    p.data = torch.zeros(4, dtype=torch.float16)
    assert engine.held_view(p) is None
    assert engine.held_view(torch.zeros(8)[::2]) is None  # not contiguous
    assert engine.held_views((torch.zeros(3), None, torch.zeros(8)[::2])) is None
    assert [a.size for a in engine.held_views((torch.zeros(3), None, torch.ones(2)))] == [3, 2]
    b = torch.zeros(3)
    engine.held_view(b)
    gone, key = weakref.ref(b), id(b)
    del b, p, v, v2, v3
    gc.collect()
    assert gone() is None and key not in engine._HELD


def test_all_finite_is_exact_at_the_extremes():
    """The guard's check: finite values of any size pass (no overflow), one NaN or infinity
    of either sign fails, and NumPy says nothing about it."""
    import warnings

    from bnlab.torch import engine

    big32 = np.full(7, np.finfo(np.float32).max, np.float32)
    big64 = np.full(5, np.finfo(np.float64).max)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.all_finite([big32, -big64, np.zeros(1)])
        for bad in (np.nan, np.inf, -np.inf):
            a = big32.copy()
            a[3] = bad
            assert not engine.all_finite([np.zeros(2), a])
        assert not engine.all_finite([np.array([np.inf, -np.inf])])
        assert not engine.all_finite([np.array([[1.0, np.nan]])])  # any shape


# --- errors are torch's -------------------------------------------------------------------


def error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)
    return None


@pytest.mark.parametrize("cls,shape", [
    ("BatchNorm2d", (2, 3, 4)),          # wrong rank
    ("BatchNorm1d", (2, 3, 4, 5)),
    ("BatchNorm3d", (2, 3, 4, 5)),
    ("BatchNorm2d", (1, 3, 1, 1)),       # one value per channel in training
    ("BatchNorm1d", (1, 3)),
    ("BatchNorm2d", (2, 4, 3, 3)),       # wrong channel count
    ("BatchNorm1d", (5, 2)),
])
def test_bad_input_gets_torch_errors(cls, shape):
    ours, theirs = getattr(bt, cls)(3), getattr(torch.nn, cls)(3)
    x = torch.randn(shape)
    expected = error_of(lambda: theirs(x))
    assert expected is not None
    assert error_of(lambda: ours(x)) == expected
    ours.eval()
    theirs.eval()
    assert error_of(lambda: ours(x)) == error_of(lambda: theirs(x))


def test_functional_backend_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        bt.batch_norm(x, None, None, training=True, backend="cuda")
    with pytest.raises(TypeError, match="float32 or float64"):
        bt.batch_norm(x.half(), None, None, training=True, backend="numba")
    with pytest.raises(TypeError, match="num_batches_tracked"):
        bt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)
    # mismatched dtypes are torch's business, and torch's error
    w = torch.ones(3, dtype=torch.float64)
    assert error_of(lambda: bt.batch_norm(x, None, None, w, training=True)) == error_of(
        lambda: torch.nn.functional.batch_norm(x, None, None, w, training=True))


@pytest.mark.parametrize("backend", ["auto", "numba", "native"])
def test_functional_matches_torch(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    w, b = torch.rand(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g,
                                                                        dtype=torch.float64)
    rm1, rv1 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = bt.batch_norm(x, rm1, rv1, w, b, training=True, momentum=0.2, eps=1e-3, backend=backend)
    y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, True, 0.2, 1e-3)
    tol = TOL[torch.float64]["fwd"]
    for a, c in ((y1, y2), (rm1, rm2), (rv1, rv2)):
        assert_close(a, c, tol)
    assert_close(bt.batch_norm(x, rm1, rv1, w, b, eps=1e-3, backend=backend),
                 torch.nn.functional.batch_norm(x, rm2, rv2, w, b, False, eps=1e-3), tol)


def test_other_dtypes_take_torch_path():
    """float16 on CPU is not a kernel dtype: torch's path, torch's result."""
    ours, theirs = pair(4, 3, torch.float32)
    x = torch.randn(8, 3, 4, 4).half()
    assert torch.equal(ours(x), theirs(x))
    assert_same_state(ours, theirs, (0, 0))


# --- state dicts, convert/revert, models --------------------------------------------------


def test_state_dicts_load_both_ways_old_ones_too():
    ours, theirs = pair(4, 3, torch.float32)
    ours(torch.randn(4, 3, 2, 2))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert_same_state(ours, theirs, (0, 0))
    theirs(torch.randn(4, 3, 2, 2))
    ours.load_state_dict(theirs.state_dict())
    assert_same_state(ours, theirs, (0, 0))
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    fresh = bt.BatchNorm2d(3)
    fresh.load_state_dict(old)  # a state dict from before num_batches_tracked existed
    assert int(fresh.num_batches_tracked) == 0
    assert torch.equal(fresh.running_var, theirs.running_var)


class Block(torch.nn.Module):
    """A torchvision-style residual block."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.downsample = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1, bias=False),
                                              torch.nn.BatchNorm2d(c))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def resnetish():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(Block(4), Block(4)), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))


def test_convert_keeps_tensors_optimizer_and_mode():
    model = resnetish()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    params = {k: p for k, p in model.named_parameters()}
    buffers = {k: b for k, b in model.named_buffers()}
    model[3][1].eval()  # a mixed-mode model keeps its flags
    reference[3][1].eval()
    converted = bt.convert(model)
    assert converted is model
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d not in kinds and bt.BatchNorm2d in kinds and bt.BatchNorm1d in kinds
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(b is buffers[k] for k, b in model.named_buffers())
    assert not model[3][1].bn1.training and model[1].training
    x = torch.randn(4, 3, 9, 9)
    for _ in range(2):  # the optimizer built before convert still trains the model
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert_same_state(model, reference, (1e-5, 1e-6))


def test_convert_then_revert_is_bit_identical():
    model = resnetish()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    y = model(x)
    back = bt.revert(bt.convert(model))
    assert [type(m) for m in back.modules()] == kinds
    assert all(torch.equal(v, before[k]) for k, v in back.state_dict().items())
    assert torch.equal(back(x), y)


def test_convert_root_bn_and_subclasses():
    root = torch.nn.BatchNorm1d(5)
    new = bt.convert(root)
    assert type(new) is bt.BatchNorm1d and new.weight is root.weight
    assert type(bt.revert(new)) is torch.nn.BatchNorm1d

    class Mine(torch.nn.BatchNorm2d):  # a user's subclass keeps its own forward
        pass

    assert type(bt.convert(torch.nn.Sequential(Mine(3)))[0]) is Mine


def test_isinstance_checks_still_hold():
    bn = bt.BatchNorm2d(3)
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)


def test_seed_cnn_moves_weights_between_bnlab_and_torch():
    ref = models.seed_cnn(bn=True, channels=(4, 6), seed=3)
    net = bt.models.seed_cnn(bn=True, channels=(4, 6), seed=3)
    assert list(net.state_dict()) == list(ref.state_dict())
    for k, v in net.state_dict().items():
        assert np.array_equal(v.numpy(), ref.state_dict()[k]), k
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    ref.eval()
    net.eval()
    np.testing.assert_allclose(bt.convert(net)(torch.from_numpy(x)).detach().numpy(), ref(x),
                               rtol=1e-5, atol=1e-5)
    ref.train()
    net.train()
    net(torch.from_numpy(x))  # torch moves the running statistics; bnlab loads them
    ref.load_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
    np.testing.assert_array_equal(ref[1].running_var, net[1].running_var.numpy())
    assert list(bt.models.seed_cnn(bn=False).state_dict()) == list(
        models.seed_cnn(bn=False).state_dict())


def test_import_bnlab_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import bnlab, numpy as np\n"
            "bnlab.batch_norm(np.ones((2, 3)), None, None, training=True)\n"
            "try:\n    import bnlab.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'bnlab[torch]'" in out.stdout


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_custom_ops_pass_torch_opcheck(fmt):
    """torch.library.opcheck: schema, fake (meta) implementations, autograd registration
    and torch.compile's view of each op agree with the real implementations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 2, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_()
    w = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y, mean, var, inv_std = _ops.batch_norm_train(x, w, b, 1e-5)
    torch.library.opcheck(_ops.batch_norm_train, (x, w, b, 1e-5))
    torch.library.opcheck(_ops.batch_norm_train, (x, None, None, 1e-5))
    torch.library.opcheck(_ops.batch_norm_eval, (x, rm, rv, w, b, 1e-5))
    torch.library.opcheck(_ops.batch_norm_backward,
                          (torch.randn_like(x), x.detach(), mean, inv_std, w.detach(), True))
    nbt = torch.zeros((), dtype=torch.long)
    torch.library.opcheck(_ops.update_running_stats, (rm, rv, nbt, mean, var, 40, 0.1))
    # the ops' own autograd formulas (the compiled path), float64 finite differences
    assert torch.autograd.gradcheck(lambda x, w, b: _ops.batch_norm_train(x, w, b, 1e-5)[0],
                                    (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: _ops.batch_norm_eval(x, rm, rv, w, b, 1e-5)[0], (x, w, b))


def test_double_backward_matches_torch():
    """A gradient penalty through bnlab's BN trains on torch's second derivatives (it used to
    get zero: the first gradient was detached)."""
    for training in (True, False):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
        ours, theirs = bt.BatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(
            3, dtype=torch.float64)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5, generator=g)
            ours.bias.normal_(generator=g)
            ours.running_mean.normal_(generator=g)
            ours.running_var.uniform_(0.5, 2.0, generator=g)
        theirs.load_state_dict(ours.state_dict())
        ours.train(training)
        theirs.train(training)
        results = []
        for m in (ours, theirs):
            xi = x.clone().requires_grad_()
            (gx,) = torch.autograd.grad(m(xi).pow(3).sum(), xi, create_graph=True)
            assert gx.requires_grad
            penalty = gx.square().sum()
            results.append(torch.autograd.grad(penalty, (xi, m.weight, m.bias)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
