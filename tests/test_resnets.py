"""bnlab.torch.models.resnet18/resnet50: torchvision's architecture and state-dict keys
without torchvision (its published parameter counts and key layout), and bnlab's BN inside
a real ResNet equal to torch's, training and evaluation."""

import copy

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab.torch import models  # noqa: E402

# torchvision's model table: resnet18 11,689,512 parameters, resnet50 25,557,032
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_and_keys_are_torchvisions(name):
    net = getattr(models, name)()
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED[name]
    sd = net.state_dict()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(sd) == 5 * len(bns) + len(convs) + 2  # BN: 5 entries each; fc: weight, bias
    want = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "fc.bias": (1000,)}
    if name == "resnet18":
        want |= {"layer1.1.conv2.weight": (64, 64, 3, 3),
                 "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                 "layer4.1.bn2.num_batches_tracked": (), "fc.weight": (1000, 512)}
        assert len(bns) == 20
    else:
        want |= {"layer1.0.downsample.0.weight": (256, 64, 1, 1),
                 "layer2.0.conv2.weight": (128, 128, 3, 3),  # v1.5: stride on the 3x3
                 "layer3.5.bn3.running_mean": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "fc.weight": (1000, 2048)}
        assert len(bns) == 53
        assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k


def test_shapes_through_the_network():
    net = models.resnet50(num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_converted_resnet18_trains_and_evaluates_as_torchs():
    """bnlab's BN (convert) in a real ResNet-18: two SGD steps and evaluation equal torch's
    BN, float64 (outputs, every parameter after the steps, every running statistic)."""
    torch.manual_seed(0)
    theirs = models.resnet18(num_classes=5).double()
    ours = bt.convert(copy.deepcopy(theirs))
    assert any(isinstance(m, bt.BatchNorm2d) for m in ours.modules())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, theirs)]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=g)
        for m, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=k)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
