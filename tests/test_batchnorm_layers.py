"""BatchNorm1d / BatchNorm2d against torch.nn.BatchNorm* in float64, over several steps."""

import numpy as np
import pytest
import torch

from bnlab import nn
from conftest import LAYOUTS, from_torch, sample, to_torch

FWD64 = dict(rtol=1e-11, atol=1e-12)
BWD64 = dict(rtol=1e-9, atol=1e-10)


def make_pair(layout, C, **kw):
    """A bnlab layer and its float64 PyTorch twin with the same configuration."""
    if layout in ("NC", "NCL"):
        return nn.BatchNorm1d(C, dtype=np.float64, **kw), torch.nn.BatchNorm1d(C, **kw).double()
    fmt = "NHWC" if layout == "NHWC" else "NCHW"
    return (nn.BatchNorm2d(C, dtype=np.float64, data_format=fmt, **kw),
            torch.nn.BatchNorm2d(C, **kw).double())


def step(ours, theirs, x, dy, layout):
    """One forward + backward of both; returns both sides' outputs and gradients."""
    ours.zero_grad()
    for p in theirs.parameters():
        p.grad = None
    y = ours(x)
    dx = ours.backward(dy)
    xt = to_torch(x, layout).requires_grad_(True)
    yt = theirs(xt)
    yt.backward(to_torch(dy, layout))
    return (y, dx), (from_torch(yt, layout), from_torch(xt.grad, layout))


def assert_same_state(ours, theirs):
    if ours.affine:
        np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), **BWD64)
        np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), **BWD64)
    if ours.track_running_stats:
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), **FWD64)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), **FWD64)
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    else:
        assert ours.running_mean is None and theirs.running_mean is None


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_layer_matches_torch_over_steps_then_eval(layout, momentum, affine, track, rng):
    shape, axis = LAYOUTS[layout]["shape"], LAYOUTS[layout]["axis"]
    C = shape[axis]
    ours, theirs = make_pair(layout, C, momentum=momentum, affine=affine,
                             track_running_stats=track)
    if affine:  # non-trivial gamma, beta on both sides
        gamma, beta = sample(rng, (C,), loc=1.0), sample(rng, (C,))
        ours.weight.data[...] = gamma
        ours.bias.data[...] = beta
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(gamma))
            theirs.bias.copy_(torch.from_numpy(beta))
    for k in range(4):  # training steps with shifting statistics
        x = sample(rng, shape, loc=0.5 * k, scale=1.0 + k)
        (y, dx), (ty, tdx) = step(ours, theirs, x, sample(rng, shape), layout)
        np.testing.assert_allclose(y, ty, **FWD64)
        np.testing.assert_allclose(dx, tdx, **BWD64)
        assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    x = sample(rng, shape, loc=1.0)
    (y, dx), (ty, tdx) = step(ours, theirs, x, sample(rng, shape), layout)
    np.testing.assert_allclose(y, ty, **FWD64)
    np.testing.assert_allclose(dx, tdx, **BWD64)
    assert_same_state(ours, theirs)


def test_float32_layer_close_to_float64_torch(rng):
    ours = nn.BatchNorm2d(3)
    theirs = torch.nn.BatchNorm2d(3).double()
    for _ in range(3):
        x = sample(rng, (8, 3, 5, 5), np.float32, loc=2.0)
        dy = sample(rng, x.shape, np.float32)
        (y, dx), (ty, tdx) = step(ours, theirs, x, dy, "NCHW")
        assert y.dtype == dx.dtype == np.float32
        np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, tdx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-6)


def test_state_dict_loads_into_torch_and_gives_the_same_eval_output(rng):
    ours = nn.BatchNorm2d(4)
    ours.weight.data[...] = sample(rng, (4,), np.float32, loc=1.0)
    ours.bias.data[...] = sample(rng, (4,), np.float32)
    for _ in range(3):
        ours(sample(rng, (6, 4, 5, 5), np.float32, loc=3.0, scale=2.0))
    sd = ours.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    theirs = torch.nn.BatchNorm2d(4)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    assert int(theirs.num_batches_tracked) == 3
    ours.eval()
    theirs.eval()
    x = sample(rng, (2, 4, 5, 5), np.float32, loc=3.0)
    with torch.no_grad():
        ty = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x), ty, rtol=1e-6, atol=1e-6)


def test_torch_state_dict_loads_into_bnlab(rng):
    theirs = torch.nn.BatchNorm1d(5)
    theirs.train()
    for _ in range(2):
        theirs(torch.from_numpy(sample(rng, (7, 5), np.float32, loc=1.0)))
    ours = nn.BatchNorm1d(5)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert ours.num_batches_tracked == 2 and isinstance(ours.num_batches_tracked, int)
    np.testing.assert_array_equal(ours.running_var, theirs.running_var.numpy())


def test_parameters_and_modes():
    bn = nn.BatchNorm2d(3)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert bn.weight.data.dtype == np.float32 and bn.training
    assert bn.eval() is bn and not bn.training
    assert nn.BatchNorm1d(3, affine=False).parameters() == []
    assert list(nn.BatchNorm1d(3, track_running_stats=False).state_dict()) == ["weight", "bias"]
    bn.weight.grad += 1.0
    bn.zero_grad()
    assert not bn.weight.grad.any()


# --- errors ------------------------------------------------------------------------------


def test_rank_errors_name_the_expected_rank():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        nn.BatchNorm2d(3)(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        nn.BatchNorm1d(3)(np.zeros((2, 3, 4, 4), np.float32))


def test_channel_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1.*got 4 channels"):
        nn.BatchNorm2d(3)(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 3.*got 5 channels"):
        nn.BatchNorm2d(3, data_format="NHWC")(np.zeros((2, 4, 4, 5), np.float32))


def test_one_value_per_channel_and_integer_input():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 8, 1, 1\)"):
        nn.BatchNorm2d(8)(np.zeros((1, 8, 1, 1), np.float32))
    bn = nn.BatchNorm2d(8).eval()  # one sample is fine with running statistics
    assert bn(np.zeros((1, 8, 1, 1), np.float32)).shape == (1, 8, 1, 1)
    with pytest.raises(TypeError, match="got dtype int"):
        nn.BatchNorm1d(2)(np.zeros((4, 2), dtype=np.int32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="data_format"):
        nn.BatchNorm2d(3, data_format="NWHC")
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="num_features"):
        nn.BatchNorm1d(0)


def test_load_state_dict_errors_change_nothing():
    bn = nn.BatchNorm2d(3)
    good = bn.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['running_var'\]"):
        bn.load_state_dict({k: v for k, v in good.items() if k != "running_var"})
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        bn.load_state_dict({**good, "extra": np.zeros(3)})
    bad = dict(good, weight=np.ones(4, np.float32), running_mean=np.full(3, 9, np.float32))
    with pytest.raises(ValueError, match=r"size mismatch for weight: expected shape \(3,\), got \(4,\)"):
        bn.load_state_dict(bad)
    assert not bn.running_mean.any()  # validated before anything was written
    with pytest.raises(ValueError, match="running_var contains NaN"):
        bn.load_state_dict(dict(good, running_var=np.array([1, np.nan, 1], np.float32)))
    with pytest.raises(TypeError, match="num_batches_tracked must be an integer"):
        bn.load_state_dict(dict(good, num_batches_tracked=np.array(1.5)))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="backward called before forward"):
        nn.BatchNorm1d(2).backward(np.zeros((3, 2)))
