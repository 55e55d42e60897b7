"""BN + add + ReLU in one pass (BatchNormAddAct2d) and bnlab.torch.fuse, against torch's
unfused modules (torch.nn.BatchNorm2d, +, torch.relu). Values, gradients and running
statistics on every engine, dtype and layout are in tests/test_engine_matrix.py; here the
1-bit mask, ties at zero, second derivatives, TorchScript, the unfused fallback, and fuse()
on real models."""

import copy
import operator

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab.kernels import numba_bn, triton_bn  # noqa: E402
from bnlab.torch import _ops, models  # noqa: E402

KERNELS = ("numba", "triton")


def layer(backend, C=3, dtype=torch.float32, act="relu"):
    m = bt.BatchNormAddAct2d(C, act=act, eps=1e-3, momentum=0.3, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    m.backend = backend
    return m


def torchs(m):
    """torch's unfused equivalent, with the same parameter values."""
    t = torch.nn.BatchNorm2d(m.num_features, m.eps, m.momentum, dtype=m.weight.dtype)
    t.load_state_dict(m.state_dict())
    return lambda x, r: torch.relu(t(x) + r) if m.act == "relu" else t(x) + r, t


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3, 7, 3), (5, 3, 1, 1)])
def test_the_mask_is_one_bit_per_element_and_y_is_not_saved(backend, cl, shape):
    x = torch.randn(shape, dtype=torch.float32)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape).requires_grad_()
    x.requires_grad_()
    y = layer(backend)(x, r)
    fn = y.grad_fn
    assert type(fn).__name__ == "AddActFunctionBackward"
    bits = fn.bits
    assert bits.dtype == torch.uint8 and bits.numel() == (x.numel() + 7) // 8
    torch.testing.assert_close(_ops.unpack_mask(bits, x), ~(y <= 0), rtol=0, atol=0)
    saved = fn.saved_tensors
    assert not any(t.shape == y.shape and t.data_ptr() == y.data_ptr() for t in saved)
    assert sum(t.numel() for t in saved if t.dim() == 4) == x.numel()  # x only


@pytest.mark.parametrize("backend", KERNELS)
def test_ties_at_zero_get_torchs_zero_gradient(backend):
    """weight = bias = 0 makes BN(x) exactly 0, so y = relu(r): where r == 0, torch's ReLU
    passes no gradient; neither does the mask."""
    m = layer(backend)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    r = torch.randn(4, 3, 4, 4)
    r[r.abs() < 0.5] = 0.0
    r.requires_grad_()
    ref, t = torchs(m)
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    dy = torch.randn(4, 3, 4, 4)
    m(x, r).backward(dy)
    ref(x2, r2).backward(dy)
    assert (r == 0).any()
    torch.testing.assert_close(r.grad, r2.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_against_torch_with_nan_and_mixed_signs(backend, act, training):
    m = layer(backend, act=act)
    ref, t = torchs(m)
    m.train(training)
    t.train(training)
    x = torch.randn(6, 3, 3, 3) * 2 + 1
    r = torch.randn(6, 3, 3, 3)
    r[0, 1, 1, 1] = float("nan")  # NaN in the residual: NaN out, dy passes (torch's ReLU)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, yr = m(xa, ra), ref(xb, rb)
    torch.testing.assert_close(y, yr, equal_nan=True, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    for a, b in ((xa.grad, xb.grad), (ra.grad, rb.grad), (m.weight.grad, t.weight.grad),
                 (m.bias.grad, t.bias.grad), (m.running_mean, t.running_mean),
                 (m.running_var, t.running_var)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_second_derivatives(training):
    m = layer("numba", dtype=torch.float64).train(training)
    m.track_running_stats = False  # gradgradcheck calls it many times
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    if not training:
        m.track_running_stats = True
        m.eval()
    assert torch.autograd.gradcheck(lambda a, b: m(a, b), (x, r))
    assert torch.autograd.gradgradcheck(lambda a, b: m(a, b), (x, r))
    # and the fused Function ran (not a fallback)
    assert type(m(x, r).grad_fn).__name__ == "AddActFunctionBackward"


def test_torchscript_and_the_unfused_fallback(monkeypatch):
    m = layer("numba")
    x, r = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    scripted = torch.jit.script(copy.deepcopy(m))
    ref, _ = torchs(m)
    torch.testing.assert_close(scripted(x, r), ref(x, r))
    # a residual of another dtype or shape: torch's promotion and broadcasting, BN on numba
    ran = []
    real = numba_bn.train_forward
    monkeypatch.setattr(numba_bn, "train_forward", lambda *a, **k: ran.append(1) or real(*a, **k))
    y = m(x, r.double())
    assert y.dtype == torch.float64 and ran
    y2 = m(x, r[:1])
    assert y2.shape == x.shape
    with pytest.raises(RuntimeError):
        m(x, r[:, :2])  # torch's own error for shapes that do not broadcast


def test_triton_add_act_kernel_at_odd_sizes():
    """Sizes that are not multiples of 8 or of the block: the last byte of the mask and the
    last program's elements."""
    for n in (2, 7, 9, triton_bn.ADD_BLOCK + 3):
        x = torch.randn(n, 3)
        r = torch.randn(n, 3)
        y, mean, inv_std, bits = triton_bn.add_act_forward(x, r, None, None, 1e-5, True)
        want = torch.relu((x - x.mean(0)) / torch.sqrt(x.var(0, correction=0) + 1e-5) + r)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_ops.unpack_mask(bits, x), ~(y <= 0), rtol=0, atol=0)


# --- fuse ------------------------------------------------------------------------------------


class Patterns(torch.nn.Module):
    """Every spelling of BN -> ReLU and BN -> add -> ReLU fuse() rewrites, and three it must
    leave alone."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1, self.bn2, self.bn3 = (torch.nn.BatchNorm2d(4) for _ in range(3))
        self.bn4, self.bn5, self.bn6 = (torch.nn.BatchNorm2d(4) for _ in range(3))
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.conv(x)
        a = self.relu(self.bn1(h))                          # module ReLU
        b = torch.nn.functional.relu(self.bn2(a) + h)       # functional ReLU, operator.add
        c = self.bn3(b)
        c += a                                              # operator.iadd
        c = c.relu()                                        # method ReLU
        d = self.bn4(c)
        e = torch.relu(d) + d                               # BN output used twice: left alone
        f = torch.relu(torch.add(self.bn5(e), c, alpha=2))  # alpha: left alone
        g = self.bn6(f)
        return torch.relu(g * 2.0)                          # not an add: left alone


def kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_fuse_rewrites_each_pattern_and_nothing_else():
    model = Patterns()
    fused = bt.fuse(model)
    assert kinds(fused) == {"bn1": "BatchNormAct2d", "bn2": "BatchNormAddAct2d",
                            "bn3": "BatchNormAddAct2d", "bn4": "BatchNorm2d",
                            "bn5": "BatchNorm2d", "bn6": "BatchNorm2d"}
    assert set(kinds(model).values()) == {"BatchNorm2d"}  # the model itself is unchanged
    x = torch.randn(2, 3, 5, 5)
    for training in (True, False):
        a, b = copy.deepcopy(model).train(training), bt.fuse(copy.deepcopy(model)).train(
            training)
        torch.testing.assert_close(b(x), a(x))
    assert operator.iadd not in [n.target for n in fused.graph.nodes]


@pytest.mark.parametrize("arch,steps,size", [("resnet18", 2, 32), ("resnet50", 1, 64)])
def test_fuse_resnet_equals_unfused_train_step_and_eval(arch, steps, size):
    """torchvision's architecture (bnlab.torch.models): fused and converted, SGD steps and
    evaluation equal torch's unfused model in float64; the same Parameters and keys.
    (ResNet-50 at 64x64: at 32x32 its last stage normalizes 4 values per channel, where
    float64 rounding alone, bnlab's or torch's, moves conv1's gradient by 1e-9.)"""
    torch.manual_seed(0)
    theirs = getattr(models, arch)(num_classes=5).double()
    ours = bt.fuse(bt.convert(copy.deepcopy(theirs)))
    n_add = sum(type(m).__name__ == "BatchNormAddAct2d" for m in ours.modules())
    n_act = sum(type(m).__name__ == "BatchNormAct2d" for m in ours.modules())
    # one BN + add + ReLU per residual block; BN -> ReLU: the stem's and all but the last of
    # each block's
    assert (n_add, n_act) == ((8, 9) if arch == "resnet18" else (16, 33))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, theirs)]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, size, size, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=g)
        for m, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=k)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)


def test_fuse_shares_parameters_with_the_model():
    model = bt.convert(models.resnet18(num_classes=3))
    fused = bt.fuse(model)
    assert all(a is b for a, b in zip(model.parameters(), fused.parameters()))
    bn = fused.get_submodule("layer1.0.bn2")
    assert type(bn).__name__ == "BatchNormAddAct2d"
    assert bn.weight is model.layer1[0].bn2.weight
    assert bn.running_mean is model.layer1[0].bn2.running_mean
    model.eval()
    assert bt.fuse(model).training is False


def test_the_end_to_end_gpu_script_dry_run(tmp_path):
    """tools/gpu_e2e.py on CPU with tiny batches: every model, precision and variant runs,
    and the first step's loss agrees with torch's (the GPU run measures the real sizes)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": "src"}
    out = subprocess.run([sys.executable, "tools/gpu_e2e.py", "--device", "cpu", "--tiny",
                          "--steps", "1", "--warmup", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_e2e.json").read_text())
    assert result["failed"] == [] and result["skipped"] == []
    seen = {(r["model"], r["precision"], r["variant"]) for r in result["rows"]}
    assert len(seen) == 2 * 2 * 3
    assert all(r["losses_agree"] and r["images_per_s"] > 0 for r in result["rows"])
