"""Whole networks: Sequential state dicts both ways, training step for step against
PyTorch, and a tiny batch overfitted to 100%."""

import numpy as np
import pytest
import torch

from bnlab import models, nn
from bnlab.train import make_optimizer


def torch_twin(model: nn.Sequential) -> torch.nn.Sequential:
    """The same architecture in PyTorch, weights loaded from bnlab's state dict."""
    layers = []
    for layer in model:
        kind = type(layer).__name__
        if kind == "Conv2d":
            layers.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                          layer.stride, layer.padding, bias=layer.bias is not None))
        elif kind == "Linear":
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features,
                                          bias=layer.bias is not None))
        elif kind in ("BatchNorm1d", "BatchNorm2d"):
            layers.append(getattr(torch.nn, kind)(layer.num_features))
        elif kind == "MaxPool2d":
            layers.append(torch.nn.MaxPool2d(layer.kernel_size, layer.stride))
        else:
            layers.append(getattr(torch.nn, kind)())
    twin = torch.nn.Sequential(*layers).double()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return twin


def test_sequential_state_dict_uses_torch_keys_and_moves_both_ways():
    ours = models.seed_cnn(bn=True, dtype=np.float64)
    keys = list(ours.state_dict())
    assert keys[:6] == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                        "1.num_batches_tracked"]
    twin = torch_twin(ours)
    assert list(twin.state_dict()) == keys
    # and back: torch's (different) weights into a fresh bnlab network
    torch.manual_seed(0)
    fresh = torch_twin(models.seed_cnn(bn=True, dtype=np.float64))
    for m in fresh.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    ours.load_state_dict({k: v.numpy() for k, v in fresh.state_dict().items()})
    x = np.random.default_rng(0).random((3, 1, 28, 28))
    ours.eval()
    fresh.eval()
    with torch.no_grad():
        np.testing.assert_allclose(ours(x), fresh(torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("build", [
    lambda: models.seed_cnn(bn=True, image_size=12, dtype=np.float64),
    lambda: models.seed_cnn(bn=False, image_size=12, dtype=np.float64),
    lambda: models.paper_mlp(bn=True, in_features=144, dtype=np.float64),
    lambda: models.paper_mlp(bn=False, activation="relu", in_features=144, dtype=np.float64),
], ids=["cnn_bn", "cnn_plain", "mlp_bn", "mlp_relu_plain"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_matches_torch_step_for_step(build, optimizer):
    rng = np.random.default_rng(0)
    ours = build()
    twin = torch_twin(ours)
    opt = make_optimizer(optimizer, ours.parameters(), 0.05, momentum=0.9)
    topt = (torch.optim.SGD(twin.parameters(), 0.05, momentum=0.9) if optimizer == "sgd"
            else torch.optim.Adam(twin.parameters(), 0.05))
    loss_fn, tloss_fn = nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for _ in range(5):
        x, y = rng.random((16, 1, 12, 12)), rng.integers(0, 10, 16)
        opt.zero_grad()
        loss = loss_fn(ours(x), y)
        ours.backward(loss_fn.backward())
        opt.step()
        topt.zero_grad()
        tloss = tloss_fn(twin(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-9, abs=1e-12)
    for key, value in twin.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-8, atol=1e-10)


def test_small_cnn_with_bn_overfits_a_tiny_batch():
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 12, 12)).astype(np.float32)
    y = np.arange(20) % 10
    model = models.seed_cnn(bn=True, image_size=12, seed=1)
    opt = nn.Adam(model.parameters(), 0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    assert (model(x).argmax(axis=1) == y).mean() == 1.0  # training mode: batch statistics
    model.eval()
    assert (model(x).argmax(axis=1) == y).mean() == 1.0  # eval: running statistics
    assert loss < 0.05


def test_models_put_bn_where_the_lesson_puts_it():
    cnn = [type(m).__name__ for m in models.seed_cnn(bn=True)]
    assert cnn == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                   "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert models.seed_cnn(bn=True)[0].bias is None and models.seed_cnn(bn=False)[0].bias is not None
    mlp = [type(m).__name__ for m in models.paper_mlp(bn=True)]
    assert mlp == ["Flatten"] + ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    plain = models.paper_mlp(bn=False)
    assert [type(m).__name__ for m in plain][1:3] == ["Linear", "Sigmoid"]
    assert plain[1].bias is not None
    assert [p.shape for p in models.paper_mlp(bn=False).parameters()][::2] == [
        (100, 784), (100, 100), (100, 100), (10, 100)]
    # the same seed gives the same weights with and without BN
    np.testing.assert_array_equal(models.seed_cnn(bn=True)[0].weight.data,
                                  models.seed_cnn(bn=False)[0].weight.data)
    np.testing.assert_array_equal(models.paper_mlp(bn=True)[-1].weight.data,
                                  models.paper_mlp(bn=False)[-1].weight.data)
    assert models.paper_mlp(weight_std=0.05)[1].weight.data.std() == pytest.approx(0.05, rel=0.05)
    x = np.zeros((2, 3, 32, 32), np.float32)
    assert models.seed_cnn(in_channels=3, image_size=32)(x).shape == (2, 10)
    with pytest.raises(ValueError, match="activation must be one of"):
        models.paper_mlp(activation="tanh")
