"""The BN doctor (issue 14, first part: the rules, static and dynamic, for torch and bnlab
models): each planted problem is reported with exactly its code on exactly its layer; a
clean trained model gets nothing above info; the model is not changed."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab import doctor as D  # noqa: E402


def trained_cnn():
    """The torch seed CNN with BN after some training batches (warm statistics)."""
    net = bt.models.seed_cnn(image_size=12, channels=(4, 6))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = torch.rand(16, 1, 12, 12, generator=g)
        loss = torch.nn.functional.cross_entropy(net(x), torch.randint(0, 10, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def codes(findings, above_info=False):
    return sorted((f.code, f.layer) for f in findings
                  if not above_info or f.severity in ("error", "warning"))


def test_a_clean_trained_model_has_nothing_above_info_and_is_not_changed():
    net = trained_cnn()
    before = copy.deepcopy(net.state_dict())
    modes = [m.training for m in net.modules()]
    assert codes(bt.doctor(net), above_info=True) == []
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == modes


@pytest.mark.parametrize("code,plant", [
    ("nonfinite-stats", lambda net: net[1].running_var.__setitem__(2, float("nan"))),
    ("keras-momentum", lambda net: setattr(net[1], "momentum", 0.99)),
    ("dead-channel", lambda net: net[1].weight.data.__setitem__(0, 0.0)),
    ("cold-stats", lambda net: net[1].num_batches_tracked.fill_(3)),
    ("mixed-mode", lambda net: net[1].train()),
    ("frozen-train", lambda net: (net.train(), [p.requires_grad_(False)
                                                for p in net[1].parameters()])),
])
def test_each_planted_problem_is_reported_exactly(code, plant):
    net = trained_cnn()
    plant(net)
    found = codes(bt.doctor(net), above_info=True)
    if code == "frozen-train":  # the whole model is in train mode: only layer 1 is frozen
        assert found == [("frozen-train", "1")]
    else:
        assert found == [(code, "1")]
    f = next(f for f in bt.doctor(net) if f.code == code)
    assert f.message and f.fix and f.severity in D.SEVERITIES


def test_bias_before_bn_names_the_bn_and_the_layer():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU())
    found = [f for f in bt.doctor(net) if f.code == "bias-before-bn"]
    assert [(f.layer, f.severity) for f in found] == [("1", "info")]
    assert "0" in found[0].message and "bias=False" in found[0].fix


def test_warm_batches():
    assert D.warm_batches(0.1) == 29  # 0.9^29 < 0.05 <= 0.9^28
    assert 0.9 ** 29 < 0.05 <= 0.9 ** 28
    assert D.warm_batches(None) == 1


def test_small_batch_is_reported_for_layers_in_training():
    net = trained_cnn().train()
    g = torch.Generator().manual_seed(1)
    small = [torch.rand(2, 1, 12, 12, generator=g)]  # layer 5 sees 2*6*6 = 72, layer 1 288
    found = codes(bt.doctor(net, small), above_info=True)
    assert ("small-batch", "1") not in found and ("small-batch", "5") not in found
    tiny = bt.models.seed_cnn(image_size=4, channels=(4, 6)).train()
    found = [f for f in bt.doctor(tiny, [torch.rand(2, 1, 4, 4, generator=g)])
             if f.code == "small-batch"]
    # layer 1 sees 2*4*4 = 32 values per channel (enough), layer 5 2*2*2 = 8
    assert [(f.layer, f.evidence["values_per_channel"]) for f in found] == [("5", 8)]


def test_stale_statistics_on_real_digits_and_recalibrate_closes_the_gap():
    """The seed CNN trained on the embedded digits, then its running statistics spoiled
    (momentum 0.99 for a few batches of shifted data): the doctor names the stale layers
    with the eval/batch/recalibrated accuracies, and recalibrating closes the gap."""
    from bnlab import data

    d = data.load("mnist-5k")
    net = bt.models.seed_cnn()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    images, labels = torch.from_numpy(d.train[0]), torch.from_numpy(d.train[1]).long()
    for i in range(0, 64 * 60, 64):
        loss = torch.nn.functional.cross_entropy(net(images[i:i + 64]), labels[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # spoil: momentum 0.99 on shifted data
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.99
        for i in range(3):
            net(images[i * 64:(i + 1) * 64] * 3 + 1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
    net.eval()
    before = copy.deepcopy(net.state_dict())
    xs = [torch.from_numpy(d.test[0][i:i + 250]) for i in range(0, 1000, 250)]
    ys = [torch.from_numpy(d.test[1][i:i + 250]) for i in range(0, 1000, 250)]
    stale = [f for f in bt.doctor(net, xs, ys) if f.code == "stale-stats"]
    assert stale and stale[0].layer == "1"
    ev = stale[0].evidence
    assert ev["accuracy_running_stats"] < 0.5 < ev["accuracy_recalibrated_stats"]
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # untouched
    bt.recalibrate(net, xs)
    assert codes(bt.doctor(net, xs, ys), above_info=True) == []
    # without batches, 4 recalibration batches look cold; the batches show they are exact
    assert codes(bt.doctor(net), above_info=True) == [("cold-stats", "1"), ("cold-stats", "5")]


def test_nn_models_get_the_same_static_checks():
    from bnlab import models, nn

    net = models.seed_cnn(image_size=12, channels=(4, 6))
    g = np.random.default_rng(0)
    for _ in range(40):
        net(g.random((8, 1, 12, 12)).astype(np.float32))
    net.eval()
    before = net.state_dict()
    assert codes(nn.doctor(net), above_info=True) == []
    assert all(np.array_equal(v, before[k]) for k, v in net.state_dict().items())
    net[1].momentum = 0.99
    net[5].running_var[1] = np.inf
    assert codes(nn.doctor(net), above_info=True) == [("keras-momentum", "1"),
                                                      ("nonfinite-stats", "5")]
    mlp = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert [(f.code, f.layer) for f in nn.doctor(mlp)] == [("bias-before-bn", "1"),
                                                            ("cold-stats", "1")]


# --- bnlab models: the dynamic checks ----------------------------------------------------


def trained_nn_cnn(image_size=12):
    from bnlab import models

    net = models.seed_cnn(image_size=image_size, channels=(4, 6))
    g = np.random.default_rng(0)
    for _ in range(40):
        net(g.random((16, 1, image_size, image_size)).astype(np.float32))
    return net.eval()


def test_nn_dynamic_checks_report_exactly_small_batch_and_stale_stats():
    from bnlab import nn

    g = np.random.default_rng(1)
    net = trained_nn_cnn(image_size=4).train()
    batch = [g.random((2, 1, 4, 4)).astype(np.float32)]
    # layer 1 sees 2*4*4 = 32 values per channel (enough), layer 5 2*2*2 = 8
    found = [f for f in nn.doctor(net, batch) if f.code == "small-batch"]
    assert [(f.layer, f.evidence["values_per_channel"]) for f in found] == [("5", 8)]

    net = trained_nn_cnn()
    net[1].running_mean[...] += 5.0  # spoiled: 5 units off the batches' means
    xs = [g.random((32, 1, 12, 12)).astype(np.float32) for _ in range(3)]
    ys = [g.integers(0, 10, 32) for _ in range(3)]
    stale = [f for f in nn.doctor(net, xs, ys) if f.code == "stale-stats"]
    assert [f.layer for f in stale] == ["1"]
    ev = stale[0].evidence
    assert ev["mean_shift_std"] > D.STALE_SHIFT and "accuracy_recalibrated_stats" in ev
    nn.recalibrate(net, xs)
    assert codes(nn.doctor(net, xs, ys), above_info=True) == []


def _nn_snapshot(net):
    return ({k: v.copy() for k, v in net.state_dict().items()},
            [(m.training, getattr(m, "momentum", None)) for _, m in net.named_modules()])


def _torch_snapshot(net):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [(m.training, getattr(m, "momentum", None)) for m in net.modules()],
            [p.requires_grad for p in net.parameters()])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_doctor_never_changes_the_model(mode):
    """Parameters, buffers, modes and momenta bit for bit the same after the static and
    dynamic checks, bnlab's models and torch's alike."""
    from bnlab import nn

    g = np.random.default_rng(2)
    xs = [g.random((16, 1, 12, 12)).astype(np.float32) for _ in range(2)]
    ys = [g.integers(0, 10, 16) for _ in range(2)]
    net = trained_nn_cnn().train(mode == "train")
    net[5].momentum = 0.3
    before = _nn_snapshot(net)
    nn.doctor(net, xs, ys)
    after = _nn_snapshot(net)
    assert before[1] == after[1]
    assert all(np.array_equal(v, after[0][k]) and v.dtype == after[0][k].dtype
               for k, v in before[0].items())

    tnet = trained_cnn().train(mode == "train")
    tnet[5].momentum = 0.3
    tnet[1].weight.requires_grad_(False)
    before = _torch_snapshot(tnet)
    bt.doctor(tnet, [torch.from_numpy(x) for x in xs], ys)
    after = _torch_snapshot(tnet)
    assert before[1:] == after[1:]
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())


# --- bias-before-bn through torch.fx: residual blocks ------------------------------------


class _Residual(torch.nn.Module):
    def __init__(self, share=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)  # bias=True
        self.bn = torch.nn.BatchNorm2d(3)
        self.share = share

    def forward(self, x):
        h = self.conv(x)
        y = torch.relu(self.bn(h)) + x
        return y + h if self.share else y


class _Net(torch.nn.Module):
    def __init__(self, share=False):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 3, 1, bias=False)
        self.block = _Residual(share)

    def forward(self, x):
        return self.block(self.stem(x))


def test_bias_before_bn_is_found_in_residual_blocks():
    found = [(f.code, f.layer) for f in bt.doctor(_Net().eval()) if f.code == "bias-before-bn"]
    assert found == [("bias-before-bn", "block.bn")]
    f = next(f for f in bt.doctor(_Net().eval()) if f.code == "bias-before-bn")
    assert "block.conv" in f.message and "block.conv" in f.fix
    # the conv's output also feeds the sum: its bias is not cancelled there
    assert not [f for f in bt.doctor(_Net(share=True).eval()) if f.code == "bias-before-bn"]
