"""Every layer around BN against PyTorch (weights copied, outputs and all gradients
compared in float64) and against finite differences."""

import numpy as np
import pytest
import torch

from bnlab import nn
from test_gradcheck import fd_check

FWD = dict(rtol=1e-12, atol=1e-12)
BWD = dict(rtol=1e-10, atol=1e-11)


def copy_params(ours, theirs):
    with torch.no_grad():
        for name, p in ours.named_parameters():
            dict(theirs.named_parameters())[name].copy_(torch.from_numpy(p.data))


def compare_with_torch(ours, theirs, x, rng):
    """Forward both; backward a random dy; compare y, dx and every parameter gradient."""
    copy_params(ours, theirs)
    y = ours(x)
    dy = rng.standard_normal(y.shape)
    dx = ours.backward(dy)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = theirs(xt)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), **FWD)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **BWD)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, dict(theirs.named_parameters())[name].grad.numpy(), **BWD)


F64 = dict(dtype=np.float64)
CASES = {
    "linear": (lambda: nn.Linear(5, 3, **F64), lambda: torch.nn.Linear(5, 3).double(), (4, 5)),
    "linear_nobias": (lambda: nn.Linear(5, 3, bias=False, **F64),
                      lambda: torch.nn.Linear(5, 3, bias=False).double(), (4, 5)),
    "conv": (lambda: nn.Conv2d(2, 3, 3, **F64), lambda: torch.nn.Conv2d(2, 3, 3).double(),
             (2, 2, 6, 5)),
    "conv_pad_stride": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False, **F64),
                        lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double(),
                        (2, 3, 7, 6)),
    "conv_1x1": (lambda: nn.Conv2d(3, 2, 1, **F64), lambda: torch.nn.Conv2d(3, 2, 1).double(),
                 (2, 3, 4, 4)),
    "conv_5x5_pad2": (lambda: nn.Conv2d(1, 2, 5, padding=2, **F64),
                      lambda: torch.nn.Conv2d(1, 2, 5, padding=2).double(), (2, 1, 6, 6)),
    "maxpool": (lambda: nn.MaxPool2d(2), lambda: torch.nn.MaxPool2d(2), (2, 3, 6, 7)),
    "maxpool_overlap": (lambda: nn.MaxPool2d(3, stride=2), lambda: torch.nn.MaxPool2d(3, 2),
                        (2, 2, 7, 8)),
    "relu": (lambda: nn.ReLU(), lambda: torch.nn.ReLU(), (3, 4, 2)),
    "sigmoid": (lambda: nn.Sigmoid(), lambda: torch.nn.Sigmoid(), (3, 4)),
    "flatten": (lambda: nn.Flatten(), lambda: torch.nn.Flatten(), (2, 3, 2, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_torch(case, rng):
    ours, theirs, shape = CASES[case]
    compare_with_torch(ours(), theirs(), rng.standard_normal(shape), rng)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("relu", "maxpool", "maxpool_overlap")])
def test_layer_finite_differences(case, rng):
    fd_check(CASES[case][0](), rng.standard_normal(CASES[case][2]), rng)


def test_relu_and_maxpool_finite_differences_away_from_kinks(rng):
    # ReLU and max are not differentiable at 0 / ties: use inputs well away from both.
    x = rng.choice([-1, 1], size=(2, 3, 4)) * (0.5 + rng.random((2, 3, 4)))
    fd_check(nn.ReLU(), x, rng)
    x = rng.permutation(np.arange(2 * 2 * 6 * 6, dtype=np.float64)).reshape(2, 2, 6, 6) * 0.1
    fd_check(nn.MaxPool2d(2), x.copy(), rng)
    fd_check(nn.MaxPool2d(3, stride=2), x.copy(), rng)


def test_maxpool_ties_route_to_the_first_maximum_like_torch():
    x = np.zeros((1, 1, 4, 4))  # all ties, as after a ReLU
    pool = nn.MaxPool2d(2)
    pool(x)
    dx = pool.backward(np.ones((1, 1, 2, 2)))
    xt = torch.zeros(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.nn.MaxPool2d(2)(xt).sum().backward()
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def test_sigmoid_does_not_overflow():
    y = nn.Sigmoid()(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])


def test_cross_entropy_matches_torch(rng):
    logits = rng.standard_normal((6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(logits, labels)
    grad = loss_fn.backward()
    lt = torch.from_numpy(logits).requires_grad_(True)
    tl = torch.nn.CrossEntropyLoss()(lt, torch.from_numpy(labels))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-12
    np.testing.assert_allclose(grad, lt.grad.numpy(), **BWD)
    big = nn.CrossEntropyLoss()(np.array([[1000.0, 0.0]]), np.array([1]))
    assert big == pytest.approx(1000.0)  # stable log-sum-exp


def test_dropout_train_and_eval(rng):
    drop = nn.Dropout(0.25, rng=np.random.default_rng(0))
    x = np.ones((200, 50))
    y = drop(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    np.testing.assert_array_equal(drop.backward(np.ones_like(x)), y)  # same mask, same scale
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)
    np.testing.assert_array_equal(drop.backward(x), x)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        nn.Dropout(1.0)


def test_initializers_have_the_stated_scale():
    rng = np.random.default_rng(0)
    w = nn.Parameter(np.zeros((400, 300)))
    nn.init.he_normal_(w, rng)
    assert w.data.std() == pytest.approx(np.sqrt(2 / 300), rel=0.02)
    nn.init.xavier_normal_(w, rng)
    assert w.data.std() == pytest.approx(np.sqrt(2 / 700), rel=0.02)
    nn.init.xavier_uniform_(w, rng)
    assert np.abs(w.data).max() <= np.sqrt(6 / 700)
    nn.init.normal_(w, 0.05, rng=rng)
    assert w.data.std() == pytest.approx(0.05, rel=0.02)
    conv = nn.Parameter(np.zeros((8, 4, 3, 3)))
    assert nn.init.fans(conv.shape) == (36, 72)


def test_layer_input_errors():
    with pytest.raises(ValueError, match=r"expected 2D input .*got 4D input"):
        nn.Linear(4, 2)(np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"expected 4 features on axis 1"):
        nn.Linear(4, 2)(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1"):
        nn.Conv2d(3, 2, 3)(np.zeros((2, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        nn.Conv2d(1, 2, 5)(np.zeros((2, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        nn.MaxPool2d(3)(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        nn.Conv2d(1, 1, 1)(np.zeros((1, 1, 2, 2), np.int64))
    with pytest.raises(ValueError, match="pair of equal ints"):
        nn.Conv2d(1, 1, (3, 5))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        nn.ReLU().backward(np.zeros(3))
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="expected integer labels"):
        loss(np.zeros((2, 3)), np.array([0.0, 1.0]))


def test_modules_convert_dtype_like_torch():
    """.double() / .float() / .to(dtype) cast parameters, grads and float buffers in place
    (same Parameter objects, so an optimizer built before still works)."""
    from bnlab import models

    model = models.seed_cnn(bn=True, channels=(2, 3))
    params = model.parameters()
    opt = nn.SGD(model.parameters(), 0.1)
    assert model.double() is model
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(p.data.dtype == np.float64 == p.grad.dtype for p in params)
    bn = model[1]
    assert bn.running_mean.dtype == bn.running_var.dtype == np.float64
    assert isinstance(bn.num_batches_tracked, int)
    x = np.random.default_rng(0).random((4, 1, 28, 28))
    y = model(x)
    assert y.dtype == np.float64
    model.backward(np.ones_like(y))
    opt.step()
    assert model.float() is model and y.dtype == np.float64
    assert all(p.data.dtype == np.float32 for p in params) and bn.running_var.dtype == np.float32
    assert model(x.astype(np.float32)).dtype == np.float32
    assert model.to(np.float64) is model and params[0].data.dtype == np.float64
    with pytest.raises(TypeError, match="floating-point dtype"):
        model.to(np.int32)
