"""The BN family (ghost batches, frozen BN, folding, recalibration) in bnlab.nn and
bnlab.torch, against torch's and torchvision's definitions in float64."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab import functional as F  # noqa: E402
from bnlab import models, nn  # noqa: E402
from test_torch import resnetish  # noqa: E402

D = torch.float64


def _t(a):
    return a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def close(a, b, tol=1e-10):
    torch.testing.assert_close(_t(a), _t(b), rtol=tol, atol=tol)


def reference_ghost(x, dy, v, weight, bias, rm, rv, momentum=0.1, eps=1e-5):
    """torch's BatchNorm on each virtual batch (float64 autograd), running statistics
    updated once with the average of the chunks' means and unbiased variances."""
    x = torch.as_tensor(x).clone().requires_grad_()
    w = torch.as_tensor(weight).clone().requires_grad_()
    b = torch.as_tensor(bias).clone().requires_grad_()
    ys = [torch.nn.functional.batch_norm(c, None, None, w, b, True, 0.0, eps) for c in x.split(v)]
    y = torch.cat(ys)
    y.backward(torch.as_tensor(dy))
    dims = [0, *range(2, x.dim())]
    means = torch.stack([c.detach().mean(dims) for c in x.split(v)]).mean(0)
    uvars = torch.stack([c.detach().var(dims, correction=1) for c in x.split(v)]).mean(0)
    rm = (1 - momentum) * torch.as_tensor(rm) + momentum * means
    rv = (1 - momentum) * torch.as_tensor(rv) + momentum * uvars
    return y.detach(), x.grad, w.grad, b.grad, rm, rv


@pytest.mark.parametrize("shape", [(12, 3, 4, 5), (12, 5)], ids=["2d", "1d"])
def test_ghost_bn_nn_and_torch_match_the_definition(shape):
    g = np.random.default_rng(0)
    x = 3 + 2 * g.standard_normal(shape)
    dy = g.standard_normal(shape)
    C = shape[1]
    want = reference_ghost(x, dy, 4, np.full(C, 1.5), np.full(C, 0.2), np.zeros(C), np.ones(C))
    cls = "GhostBatchNorm2d" if len(shape) == 4 else "GhostBatchNorm1d"
    ours = getattr(nn, cls)(C, virtual_batch_size=4, dtype=np.float64)
    ours.weight.data[:] = 1.5
    ours.bias.data[:] = 0.2
    y = ours(x)
    dx = ours.backward(dy)
    for got, ref in zip((y, dx, ours.weight.grad, ours.bias.grad, ours.running_mean,
                         ours.running_var), want):
        close(got, ref)
    theirs = getattr(bt, cls)(C, virtual_batch_size=4, dtype=D)
    with torch.no_grad():
        theirs.weight.fill_(1.5)
        theirs.bias.fill_(0.2)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(torch.tensor(dy))
    for got, ref in zip((yt, xt.grad, theirs.weight.grad, theirs.bias.grad,
                         theirs.running_mean, theirs.running_var), want):
        close(got, ref)
    assert int(theirs.num_batches_tracked) == 1 and ours.num_batches_tracked == 1
    # evaluation: the running statistics, any batch size
    ours.eval()
    theirs.eval()
    close(ours(x[:3]), theirs(torch.tensor(x[:3])).detach())


def test_ghost_bn_batch_size_not_a_multiple_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of virtual_batch_size=4, got a batch of 10"):
        nn.GhostBatchNorm1d(3, virtual_batch_size=4)(np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of virtual_batch_size=4, got a batch of 10"):
        bt.GhostBatchNorm1d(3, virtual_batch_size=4)(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
        bt.GhostBatchNorm2d(3, virtual_batch_size=0)


def torchvision_frozen(x, w, b, rm, rv, eps=1e-5):
    """torchvision.ops.FrozenBatchNorm2d.forward, written out."""
    scale = w * (rv + eps).rsqrt()
    shift = b - rm * scale
    return x * scale.reshape(1, -1, *[1] * (x.dim() - 2)) + shift.reshape(1, -1, *[1] * (x.dim() - 2))


def test_frozen_bn_is_torchvisions_and_loads_a_bn_state_dict():
    bn = torch.nn.BatchNorm2d(3, dtype=D)
    bn(torch.randn(8, 3, 4, 4, dtype=D))  # running statistics away from 0 and 1
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd
    frozen = bt.FrozenBatchNorm2d(3, dtype=D)
    frozen.load_state_dict(sd)
    assert not list(frozen.parameters())
    x = torch.randn(5, 3, 4, 4, dtype=D, requires_grad=True)
    want = torchvision_frozen(x, bn.weight.detach(), bn.bias.detach(), bn.running_mean,
                              bn.running_var)
    frozen.train()  # frozen in training too
    y = frozen(x)
    close(y.detach(), want.detach())
    y.sum().backward()
    close(x.grad, (bn.weight / (bn.running_var + 1e-5).sqrt()).detach().reshape(1, 3, 1, 1)
          .expand_as(x))
    ours = nn.FrozenBatchNorm2d(3, dtype=np.float64)
    ours.load_state_dict({k: v.numpy() for k, v in sd.items()})
    close(ours(x.detach().numpy()), want.detach())
    close(ours.backward(np.ones(x.shape)), x.grad)
    assert not ours.parameters()


def test_freeze_keeps_places_and_values():
    model = resnetish().double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=D)
    want = model(x)
    frozen = bt.freeze(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert isinstance(frozen[1], bt.FrozenBatchNorm2d) and isinstance(frozen[3][0].bn1,
                                                                       bt.FrozenBatchNorm2d)
    close(frozen.train()(x).detach(), want.detach())  # frozen: the same in training
    net = models.seed_cnn(bn=True, channels=(4, 6), image_size=12).double()
    net.eval()
    xn = np.random.default_rng(0).random((3, 1, 12, 12))
    want = net(xn)
    net = nn.freeze(net)
    assert [type(m).__name__ for m in net][:3] == ["Conv2d", "FrozenBatchNorm2d", "ReLU"]
    close(net.train()(xn), want)


def batches(n=4, shape=(6, 3, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [3 + 2 * torch.randn(shape, generator=g, dtype=D) for _ in range(n)]


def test_recalibrate_is_update_bn_and_the_exact_average():
    model = resnetish().double()
    ref = copy.deepcopy(model)
    data = [(b, None) for b in batches()]
    model.eval()
    momenta = [m.momentum for m in model.modules() if hasattr(m, "momentum")]
    bt.recalibrate(model, data)
    torch.optim.swa_utils.update_bn([b for b, _ in data], ref)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        close(a, b, 1e-12) if a.is_floating_point() else None
    assert not model.training
    assert [m.momentum for m in model.modules() if hasattr(m, "momentum")] == momenta
    # bnlab.nn: the exact average of the batch means and unbiased variances
    bn = nn.BatchNorm2d(3, dtype=np.float64, momentum=0.3)
    net = nn.Sequential(bn)
    data = [b.numpy() for b in batches()]
    nn.recalibrate(net, data)
    close(bn.running_mean, np.mean([d.mean(axis=(0, 2, 3)) for d in data], axis=0))
    close(bn.running_var, np.mean([d.var(axis=(0, 2, 3), ddof=1) for d in data], axis=0))
    assert bn.momentum == 0.3 and net.training


def trained(model, data):
    """A few training steps, so that the running statistics are not trivial."""
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)
    return model.eval()


def test_fold_batchnorm_torch_with_residual_blocks():
    model = trained(resnetish().double(), batches(3, (4, 3, 9, 9)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    before = copy.deepcopy(model.state_dict())
    folded = bt.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in folded.modules())  # every BN followed a conv or linear
    x = torch.randn(3, 3, 9, 9, dtype=D)
    close(folded(x).detach(), model(x).detach(), 1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    want = torch.nn.utils.fusion.fuse_conv_bn_eval(model[3][0].conv1, model[3][0].bn1)
    close(folded.get_submodule("3.0.conv1").weight.detach(), want.weight.detach(), 1e-12)
    close(folded.get_submodule("3.0.conv1").bias.detach(), want.bias.detach(), 1e-12)


def test_fold_batchnorm_leaves_a_layer_called_twice():
    """A convolution applied twice feeds two BNs: folding either into its shared weights
    would change the other use (it used to be folded twice)."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)
            self.bn1, self.bn2 = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))

    model = trained(Twice().double(), batches(3, (4, 2, 5, 5)))
    folded = bt.fold_batchnorm(model)
    x = torch.randn(3, 2, 5, 5, dtype=D)
    close(folded(x).detach(), model(x).detach(), 1e-12)
    with pytest.raises(ValueError, match="bn1"):
        bt.fold_batchnorm(model, strict=True)


def test_fold_batchnorm_leaves_or_names_a_bn_after_anything_else():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(),
                                torch.nn.BatchNorm2d(3)).double()
    trained(model, [torch.randn(4, 2, 6, 6, dtype=D)])
    folded = bt.fold_batchnorm(model)
    assert not any(m.training for m in folded.modules())  # an evaluation-mode copy
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 1
    x = torch.randn(2, 2, 6, 6, dtype=D)
    close(folded(x).detach(), model(x).detach(), 1e-12)
    with pytest.raises(ValueError, match="the BN layer '2' does not directly follow"):
        bt.fold_batchnorm(model, strict=True)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="the BN layer '2' does not directly follow"):
        nn.fold_batchnorm(net, strict=True)


def test_fold_batchnorm_nn_seed_cnn_and_paper_mlp():
    for net, shape in ((models.seed_cnn(channels=(4, 6), image_size=12), (5, 1, 12, 12)),
                       (models.paper_mlp(in_features=20, hidden=(7, 7)), (5, 20))):
        net = net.double()
        g = np.random.default_rng(1)
        for _ in range(3):
            net(3 + g.standard_normal(shape))
        net.eval()
        before = net.state_dict()
        folded = nn.fold_batchnorm(net)
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded)
        x = g.standard_normal(shape)
        close(folded(x), net(x), 1e-12)
        assert all(np.array_equal(v, before[k]) for k, v in net.state_dict().items())


def test_fold_params_formula():
    g = np.random.default_rng(0)
    w, b = g.standard_normal((3, 2, 3, 3)), g.standard_normal(3)
    rm, rv, gamma, beta = g.standard_normal(3), g.random(3) + 0.5, g.random(3), g.random(3)
    conv = torch.nn.Conv2d(2, 3, 3).double().eval()
    bn = torch.nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w))
        conv.bias.copy_(torch.tensor(b))
        for name, v in (("running_mean", rm), ("running_var", rv), ("weight", gamma),
                        ("bias", beta)):
            getattr(bn, name).copy_(torch.tensor(v))
    want = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    w2, b2 = F.fold_batchnorm_params(w, b, rm, rv, gamma, beta, 1e-5)
    close(w2, want.weight.detach(), 1e-12)
    close(b2, want.bias.detach(), 1e-12)


# --- masks ------------------------------------------------------------------------------------


def masked_reference(x, mask, gamma, beta, dy, eps=1e-5):
    """The definition in float64 autograd: statistics over the True positions only."""
    x = torch.tensor(x, requires_grad=True)
    w = torch.tensor(gamma, requires_grad=True)
    b = torch.tensor(beta, requires_grad=True)
    m = torch.tensor(mask).unsqueeze(1).double()
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    n = m.sum()
    mean = (x * m).sum(dims) / n
    var = ((x - mean.reshape(shape)) ** 2 * m).sum(dims) / n
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * w.reshape(shape) \
        + b.reshape(shape)
    y.backward(torch.tensor(dy))
    return y.detach(), x.grad, w.grad, b.grad, mean.detach(), var.detach() * n / (n - 1)


@pytest.mark.parametrize("shape", [(4, 3, 7), (5, 2, 3, 4), (9, 3)], ids=["NCL", "NCHW", "NC"])
def test_mask_statistics_and_gradients_match_the_definition(shape):
    g = np.random.default_rng(0)
    x = 3 + 2 * g.standard_normal(shape)
    mask = g.random((shape[0],) + shape[2:]) < 0.6
    dy = g.standard_normal(shape)
    C = shape[1]
    gamma, beta = 0.5 + g.random(C), g.standard_normal(C)
    y, dx, dg, db, mean, uvar = masked_reference(x, mask, gamma, beta, dy)
    cls = {3: "BatchNorm1d", 4: "BatchNorm2d", 2: "BatchNorm1d"}[len(shape)]
    ours = getattr(nn, cls)(C, dtype=np.float64, momentum=0.5)
    ours.weight.data[:], ours.bias.data[:] = gamma, beta
    close(ours(x, mask=mask), y, 1e-12)
    close(ours.backward(dy), dx, 1e-12)
    close(ours.weight.grad, dg, 1e-12)
    close(ours.bias.grad, db, 1e-12)
    close(ours.running_mean, 0.5 * mean, 1e-12)  # the update with the masked count
    close(ours.running_var, 0.5 + 0.5 * uvar, 1e-12)
    theirs = getattr(bt, cls)(C, dtype=D, momentum=0.5)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(gamma))
        theirs.bias.copy_(torch.tensor(beta))
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt, mask=torch.tensor(mask))
    yt.backward(torch.tensor(dy))
    close(yt, y, 1e-12)
    close(xt.grad, dx, 1e-12)
    close(theirs.weight.grad, dg, 1e-12)
    close(theirs.running_var, 0.5 + 0.5 * uvar, 1e-12)
    # positions outside the mask get gamma * dy / sigma only
    sigma = np.sqrt(np.asarray(uvar) * (mask.sum() - 1) / mask.sum() + 1e-5)
    outside = ~np.expand_dims(mask, 1).repeat(C, 1)
    scale = (gamma / sigma).reshape([1, -1] + [1] * (len(shape) - 2))
    close(np.asarray(dx)[outside], (scale * dy)[outside], 1e-12)


def test_mask_errors():
    bn = nn.BatchNorm1d(3)
    x = np.zeros((4, 3, 5), np.float32)
    with pytest.raises(ValueError, match=r"mask must have x's shape without the channel axis "
                                         r"\(4, 5\), got \(4, 3, 5\)"):
        bn(x, mask=np.ones((4, 3, 5), bool))
    with pytest.raises(ValueError, match="no True entry"):
        bn(x, mask=np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="no True entry"):
        bt.BatchNorm1d(3)(torch.zeros(4, 3, 5), mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        bt.BatchNorm1d(3)(torch.zeros(4, 3, 5), mask=torch.ones(4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_mask_ignores_nan_in_padding_and_keeps_the_dtype(dtype):
    """Padding may hold anything (NaN included): only True positions reach the statistics,
    on the reference engine, in the input's dtype; a NaN at a counted position gives NaN
    output and leaves the buffers as they were, as on the other paths."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, 3:] = False
    padded = x.clone()
    padded[:, :, 3:] = float("nan")
    bn = bt.BatchNorm1d(3, momentum=1.0, dtype=dtype if dtype != torch.bfloat16 else None)
    y = bn(padded.to(dtype), mask=mask)
    assert y.dtype == dtype
    kept = x[:, :, :3]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    want = (kept - kept.mean((0, 2), keepdim=True)) / torch.sqrt(
        kept.var((0, 2), correction=0, keepdim=True) + 1e-5)
    close(y[:, :, :3].double(), want, tol)
    close(bn.running_var.double(), kept.var((0, 2), correction=1), tol)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    padded[0, 0, 0] = float("nan")  # now at a counted position
    assert torch.isnan(bn(padded.to(dtype), mask=mask)[:, 0]).all()
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())

def test_batch_renorm_evaluates_with_the_running_statistics_and_checks_limits():
    """The renorm averages against their definition (a running average of the batch mean and
    sigma_B = sqrt(var_B + eps), Keras 2's, momentum 0.01 here) computed in the test, and
    evaluation against torch's batch norm with the same running statistics."""
    g = np.random.default_rng(2)
    ours = nn.BatchRenorm2d(3, dtype=np.float64, rmax=1.5, dmax=0.5)
    theirs = bt.BatchRenorm2d(3, dtype=D, rmax=1.5, dmax=0.5)
    mu, sigma = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = 2 + 3 * g.standard_normal((6, 3, 2, 2))
        ours(x)
        theirs(torch.tensor(x))
        mu = 0.99 * mu + 0.01 * x.mean((0, 2, 3))
        sigma = 0.99 * sigma + 0.01 * np.sqrt(x.var((0, 2, 3)) + 1e-5)
    for m in (ours, theirs):
        close(m.renorm_mean, mu, 1e-12)
        close(m.renorm_std, sigma, 1e-12)
    ours.eval()
    theirs.eval()
    x = g.standard_normal((2, 3, 2, 2))
    for m in (ours, theirs):
        want = torch.nn.functional.batch_norm(torch.tensor(x), _t(m.running_mean),
                                              _t(m.running_var), None, None, False, eps=1e-5)
        close(m(x) if m is ours else m(torch.tensor(x)), want, 1e-12)
    ours.rmax = 2.0  # a schedule may raise the limits
    with pytest.raises(ValueError, match="rmax must be >= 1 and dmax >= 0"):
        bt.BatchRenorm1d(3, rmax=0.5)


# --- BN + activation --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_batch_norm_act_equals_bn_then_relu(fmt, dtype):
    """Fused BN+ReLU against torch's BatchNorm2d then ReLU: training (outputs, gradients,
    running statistics) and evaluation, in bnlab.nn and bnlab.torch."""
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tol = 1e-10 if dtype == np.float64 else 2e-5
    g = np.random.default_rng(3)
    ref = torch.nn.BatchNorm2d(4, dtype=tdt)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(0.5 + g.random(4)))
        ref.bias.copy_(torch.tensor(g.standard_normal(4)))
    ours_t = bt.BatchNormAct2d(4, dtype=tdt)
    ours_t.load_state_dict(ref.state_dict())
    ours_n = nn.BatchNormAct2d(4, dtype=dtype)
    ours_n.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    for step in range(2):
        x = (0.3 + g.standard_normal((5, 4, 6, 7))).astype(dtype)
        dy = g.standard_normal(x.shape).astype(dtype)
        xr = torch.tensor(x, requires_grad=True)
        y_ref = torch.relu(ref(xr))
        y_ref.backward(torch.tensor(dy))
        xt = torch.tensor(x)
        if fmt == "channels_last":
            xt = xt.contiguous(memory_format=torch.channels_last)
        xt.requires_grad_()
        yt = ours_t(xt)
        yt.backward(torch.tensor(dy))
        close(yt, y_ref, tol)
        close(xt.grad, xr.grad, tol)
        close(ours_t.weight.grad, ref.weight.grad, tol)
        close(ours_t.running_var, ref.running_var, tol)
        ours_n.weight.grad[:] = 0
        close(ours_n(x), y_ref, tol)
        close(ours_n.backward(dy), xr.grad, tol)
        close(ours_n.weight.grad, ref.weight.grad, tol)
        ours_t.weight.grad = ours_t.bias.grad = ref.weight.grad = ref.bias.grad = None
    for m in (ref, ours_t, ours_n):
        m.eval()
    x = g.standard_normal((3, 4, 6, 7)).astype(dtype)
    want = torch.relu(ref(torch.tensor(x))).detach()
    close(ours_t(torch.tensor(x)), want, tol)
    close(ours_n(x), want, tol)
    assert (ours_n(x) >= 0).all() and not np.signbit(ours_n(x)).any()
