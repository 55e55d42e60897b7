"""SGD and Adam against torch.optim over several steps."""

import numpy as np
import pytest
import torch

from bnlab import nn


def run_both(make_ours, make_theirs, rng, steps=5):
    w0 = rng.standard_normal((4, 3))
    ours_p = nn.Parameter(w0.copy())
    theirs_p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ours, theirs = make_ours([ours_p]), make_theirs([theirs_p])
    for _ in range(steps):
        g = rng.standard_normal((4, 3))
        ours.zero_grad()
        ours_p.grad += g
        ours.step()
        theirs.zero_grad()
        theirs_p.grad = torch.from_numpy(g.copy())
        theirs.step()
        np.testing.assert_allclose(ours_p.data, theirs_p.detach().numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2), (0.0, 1e-2)])
def test_sgd_matches_torch(momentum, wd, rng):
    run_both(lambda p: nn.SGD(p, 0.1, momentum=momentum, weight_decay=wd),
             lambda p: torch.optim.SGD(p, 0.1, momentum=momentum, weight_decay=wd), rng)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_matches_torch(wd, rng):
    run_both(lambda p: nn.Adam(p, 0.01, weight_decay=wd),
             lambda p: torch.optim.Adam(p, 0.01, weight_decay=wd), rng)


def test_optimizer_state_round_trip(rng):
    p = nn.Parameter(rng.standard_normal(3))
    opt = nn.Adam([p], 0.1)
    p.grad += 1.0
    opt.step()
    state = opt.state_dict()
    other = nn.Adam([nn.Parameter(p.data.copy())], 0.1)
    other.load_state_dict(state)
    assert other.t == 1
    np.testing.assert_array_equal(other.m[0], opt.m[0])


def test_optimizer_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        nn.SGD([], 0.1)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        nn.SGD([nn.Parameter(np.zeros(2))], 0.0)
