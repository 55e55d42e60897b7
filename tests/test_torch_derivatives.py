"""Derivatives like torch's on every engine: second derivatives (gradgradcheck in float64,
and a gradient penalty against torch's values), torch.func's vmap, jacrev and jvp,
forward-mode AD and gradcheck's batched gradients on bnlab modules, in train and eval mode;
and the other ways a user treats torch tensors and modules (storage methods, TorchScript)."""

import sys

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from torch.func import jacrev, jvp, vmap  # noqa: E402

D = torch.float64


def module(cls, C, training, backend="auto", track=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = getattr(bt, cls)(C, dtype=D, track_running_stats=track)
    theirs = getattr(torch.nn, cls)(C, dtype=D, track_running_stats=track)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=g)
        ours.bias.normal_(generator=g)
        if track:
            ours.running_mean.normal_(generator=g)
            ours.running_var.uniform_(0.5, 2.0, generator=g)
    theirs.load_state_dict(ours.state_dict())
    ours.backend = backend
    return ours.train(training), theirs.train(training)


SHAPES = {"BatchNorm1d": (6, 3, 2), "BatchNorm2d": (4, 3, 2, 2), "BatchNorm3d": (2, 3, 2, 2, 2)}


@pytest.mark.parametrize("backend", ["numba", "reference", "native", "auto"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", list(SHAPES))
def test_gradgradcheck_float64(cls, training, backend):
    ours, _ = module(cls, 3, training, backend, track=False)
    x = torch.randn(SHAPES[cls], dtype=D, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    w = ours.weight.detach().clone().requires_grad_()
    b = ours.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return bt.batch_norm(x, None, None, w, b, training=training, backend=backend) \
            if training else bt.batch_norm(x, ours_rm, ours_rv, w, b, backend=backend)

    ours_rm, ours_rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D) + 0.5
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", ["numba", "triton", "reference", "native"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_torch(backend, training):
    """R1/WGAN-GP style: the gradient of ||dL/dx||^2, through bnlab's BN, is torch's (in
    float64; Triton computes in float32: there, against torch's float64 values, within a
    few times torch's own float32 error)."""
    dtype = torch.float32 if backend == "triton" else D
    ours, theirs = module("BatchNorm2d", 3, training, backend, seed=2)
    x = torch.randn(4, 3, 3, 3, dtype=D, generator=torch.Generator().manual_seed(3))

    def penalty_grads(m, dtype):
        m = m.to(dtype)
        xi = x.to(dtype).requires_grad_()
        (gx,) = torch.autograd.grad(m(xi).pow(3).sum(), xi, create_graph=True)
        assert gx.requires_grad
        return [t.double() for t in torch.autograd.grad(gx.square().sum(),
                                                        (xi, m.weight, m.bias))]

    import copy
    truth = penalty_grads(copy.deepcopy(theirs), D)
    got = penalty_grads(ours, dtype)
    if dtype == D:
        for a, b in zip(got, truth):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        return
    torch32 = penalty_grads(theirs, dtype)
    for a, t32, b in zip(got, torch32, truth):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 4 * (t32 - b).abs().max() + 1e-5 * scale


def _outcome(fn, m):
    try:
        return fn(m)
    except Exception as e:  # noqa: BLE001 - compared with what torch raises
        return e


@pytest.mark.parametrize("transform", ["vmap", "jacrev", "jvp", "forward_ad"])
@pytest.mark.parametrize("training,track", [(False, True), (True, False), (True, True)],
                         ids=["eval", "train", "train with running stats"])
@pytest.mark.parametrize("cls", list(SHAPES))
def test_torch_func_transforms_match_torch(cls, training, track, transform):
    """Values where torch gives values, torch's own error where torch raises one (vmap or a
    grad transform over a training step that updates unbatched running statistics)."""
    ours, theirs = module(cls, 3, training, track=track, seed=4)
    g = torch.Generator().manual_seed(5)
    xb = torch.randn((3, *SHAPES[cls]), dtype=D, generator=g)
    t = torch.randn(SHAPES[cls], dtype=D, generator=g)
    fns = {"vmap": lambda m: vmap(m)(xb),
           "jacrev": lambda m: jacrev(m)(xb[0]),
           "jvp": lambda m: jvp(m, (xb[0],), (t,))[1]}

    def forward_ad(m):
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(xb[0], t))).tangent

    fns["forward_ad"] = forward_ad
    a, b = _outcome(fns[transform], ours), _outcome(fns[transform], theirs)
    if isinstance(b, Exception):
        assert type(a) is type(b) and str(a).splitlines()[0] == str(b).splitlines()[0]
    else:
        assert not isinstance(a, Exception), a
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for k, v in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_with_batched_gradients_and_forward_ad(training):
    ours, _ = module("BatchNorm2d", 3, training, track=False)
    x = torch.randn(4, 3, 2, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x,), check_batched_grad=True, check_forward_ad=True)


def test_forced_kernels_refuse_transforms():
    ours, _ = module("BatchNorm2d", 3, False, backend="numba")
    with pytest.raises(ValueError, match='backend="numba" cannot run torch.func'):
        vmap(ours)(torch.randn(2, 4, 3, 2, 2, dtype=D))


def test_outputs_are_ordinary_torch_tensors():
    """Allocated by torch, so every storage method works (resize_, share_memory_); and the
    tensors bnlab read (input, parameters) keep theirs (FSDP frees a parameter's storage
    with resize_(0))."""
    for backend in ("numba", "triton", "reference", "native"):
        for fmt in (torch.contiguous_format, torch.channels_last):
            bn = bt.BatchNorm2d(3)
            bn.backend = backend
            x = torch.randn(4, 3, 5, 5).contiguous(memory_format=fmt).requires_grad_()
            y = bn(x)
            y.backward(torch.ones_like(y))
            for t in (y.detach(), x.grad):
                n = t.numel() + 1
                t.resize_(n)  # grows its storage (NumPy-owned storage is not resizable)
                assert t.shape == (n,)
                t.share_memory_()
                assert t.is_shared()
            x.detach().resize_(x.numel() + 1)
            for p in (bn.weight, bn.bias):
                p.untyped_storage().resize_(0)


def test_large_outputs_are_huge_page_aligned_ordinary_tensors():
    """Outputs of 4 MiB and more start on a 2 MiB boundary of their storage: not views (so an
    in-place op after BN works as after torch's), right values, resizable."""
    x = torch.randn(16, 64, 32, 32, requires_grad=True)  # 4 MiB of float32
    ours, theirs = bt.BatchNorm2d(64), torch.nn.BatchNorm2d(64)
    y = ours(x)
    assert y._base is None and y.is_contiguous()
    if sys.platform.startswith("linux"):
        assert y.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
    torch.relu_(y).sum().backward()  # in place after BN, as ReLU(inplace=True) does
    y.detach().resize_(y.numel() + 1)


def test_large_output_memory_is_reused_only_once_nothing_holds_it():
    """bnlab.torch._ops._Outputs: while an output, a view of it, its storage object or an
    autograd graph that saved it is alive, its memory is never handed out again; once
    nothing holds it, the next output reuses it (no fresh, kernel-zeroed pages)."""
    from bnlab.torch import _ops

    _ops.OUTPUTS.clear()
    bn = bt.BatchNorm2d(64).eval()
    x = torch.randn(16, 64, 32, 32)  # 4 MiB of float32
    with torch.no_grad():
        ptr = bn(x).data_ptr()  # dropped at once
        assert bn(x).data_ptr() == ptr  # reused
        for hold in (lambda y: y, lambda y: y[1:], lambda y: y.untyped_storage()):
            y = bn(x)
            want, ptr = y.clone(), y.data_ptr()
            kept = hold(y)
            del y
            others = [bn(x * (k + 2)) for k in range(3)]
            assert all(o.data_ptr() != ptr for o in others)
            if isinstance(kept, torch.Tensor):
                assert torch.equal(kept, want[-kept.shape[0]:])
            del kept, others
    bn.train()
    ref = torch.nn.BatchNorm2d(64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y = bn(xs[0])
    ptr = y.data_ptr()
    loss = (y * y).sum()  # the product saves y
    del y
    others = [bn(xs[0]) for _ in range(3)]
    assert all(o.data_ptr() != ptr for o in others)
    loss.backward()
    (ref(xs[1]) ** 2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)


def test_torch_jit_script_models_holding_bnlab_bn():
    """TorchScript compiles the modules' torch-kernel branch (it cannot call numba or
    Triton): the same values and the same NaN guard; the variants that have no TorchScript
    form raise when called, rather than run plain BN in their place."""
    for cls, shape in ((bt.BatchNorm1d, (5, 3)), (bt.BatchNorm2d, (4, 3, 2, 2)),
                       (bt.BatchNormAct2d, (4, 3, 2, 2)), (bt.FrozenBatchNorm2d, (4, 3, 2, 2))):
        m, m2 = cls(3), cls(3)
        scripted = torch.jit.script(torch.nn.Sequential(m))
        x = torch.randn(shape)
        torch.testing.assert_close(scripted(x), m2(x))
        for k, v in m2.state_dict().items():
            torch.testing.assert_close(scripted.state_dict()["0." + k], v)
        bad = x.clone()
        bad[0, 0] = float("nan")
        before = {k: v.clone() for k, v in scripted.state_dict().items()}
        scripted(bad)
        for k, v in scripted.state_dict().items():
            assert torch.equal(v, before[k]), k
    scripted = torch.jit.script(torch.nn.Sequential(bt.GhostBatchNorm2d(3, 2)))
    with pytest.raises(Exception, match="runs in Python only"):
        scripted(torch.randn(4, 3, 2, 2))
