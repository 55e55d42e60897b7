"""Batch renormalization and ghost batches against real Keras 2 (tf_keras), replayed from
tests/fixtures/keras_bn_variants.npz (made by tools/make_keras_fixtures.py).

Conventions mapped: Keras's momenta weigh the old value (0.9 there is 0.1 here); renorm
cases are float32 in Keras (its float64 renorm path fails), compared with bnlab in float32;
Keras's virtual batch b holds samples b, b + N/v, ... (bnlab's: [k*v, (k+1)*v)), so bnlab
gets the batch permuted; Keras's moving_variance averages biased variances and bnlab's
running_var unbiased ones (PyTorch's), which the ghost test maps explicitly.
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab import nn  # noqa: E402

FIXTURES = np.load(Path(__file__).parent / "fixtures" / "keras_bn_variants.npz")


def case(name):
    f = {k.split("__", 1)[1]: FIXTURES[k] for k in FIXTURES.files if k.startswith(name + "__")}
    steps = [{k.split("__")[1]: v for k, v in f.items() if k.startswith(f"{s}__")}
             for s in range(int(f["steps"]))]
    return f, steps


def close(a, b, rtol, atol):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, np.asarray(b), rtol=rtol, atol=atol)


RENORM = ["renorm_clipped", "renorm_defaults"]


def renorm_pair(f, C, ndim):
    kw = dict(eps=float(f["epsilon"]), momentum=1 - float(f["momentum"]),
              rmax=float(f["rmax"]), dmax=float(f["dmax"]),
              renorm_momentum=1 - float(f["renorm_momentum"]))
    ours = (nn.BatchRenorm2d if ndim == 4 else nn.BatchRenorm1d)(C, dtype=np.float32, **kw)
    ours.weight.data[:], ours.bias.data[:] = f["gamma"], f["beta"]
    theirs = (bt.BatchRenorm2d if ndim == 4 else bt.BatchRenorm1d)(C, **kw)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(f["gamma"]))
        theirs.bias.copy_(torch.from_numpy(f["beta"]))
    return ours, theirs


@pytest.mark.parametrize("name", RENORM)
def test_batch_renorm_matches_keras(name):
    """Outputs, input and parameter gradients, renorm averages and moving mean, step by
    step (float32: a few ulps of each quantity's scale)."""
    f, steps = case(name)
    x0 = steps[0]["x"]
    ours, theirs = renorm_pair(f, x0.shape[1], x0.ndim)
    tol = dict(rtol=2e-5, atol=2e-5)
    clipped = 0
    for s in steps:
        ours.weight.grad[:] = 0
        ours.bias.grad[:] = 0
        theirs.weight.grad = theirs.bias.grad = None
        # r and d before clipping, from the averages before this step
        axes = (0, *range(2, s["x"].ndim))
        eps = float(f["epsilon"])
        sigma = np.maximum(ours.renorm_std, np.sqrt(eps))
        r = np.sqrt(s["x"].var(axis=axes) + eps) / sigma
        d = (s["x"].mean(axis=axes) - ours.renorm_mean) / sigma
        clipped += np.any(r > float(f["rmax"])) or np.any(np.abs(d) > float(f["dmax"]))
        y = ours(s["x"])
        dx = ours.backward(s["dy"])
        xt = torch.from_numpy(s["x"]).requires_grad_()
        yt = theirs(xt)
        yt.backward(torch.from_numpy(s["dy"]))
        for got_y, got_dx, dg, db, model in ((y, dx, ours.weight.grad, ours.bias.grad, ours),
                                            (yt, xt.grad, theirs.weight.grad,
                                             theirs.bias.grad, theirs)):
            close(got_y, s["y"], **tol)
            close(got_dx, s["dx"], **tol)
            close(dg, s["dgamma"], **tol)
            close(db, s["dbeta"], **tol)
            close(model.renorm_mean, s["renorm_mean"], **tol)
            close(model.renorm_std, s["renorm_stddev"], **tol)
            close(model.running_mean, s["moving_mean"], **tol)
    if name == "renorm_clipped":
        assert clipped >= 2  # the case exercises the clipping


def test_ghost_batches_match_keras_up_to_the_permutation():
    f, steps = case("ghost")
    v = int(f["virtual_batch_size"])
    eps, momentum = float(f["epsilon"]), 1 - float(f["momentum"])
    N, C = steps[0]["x"].shape[:2]
    perm = np.array([a * (N // v) + k for k in range(N // v) for a in range(v)])
    ours = nn.GhostBatchNorm2d(C, v, eps=eps, momentum=momentum, dtype=np.float64)
    ours.weight.data[:], ours.bias.data[:] = f["gamma"], f["beta"]
    theirs = bt.GhostBatchNorm2d(C, v, eps=eps, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(f["gamma"]))
        theirs.bias.copy_(torch.from_numpy(f["beta"]))
    m = v * int(np.prod(steps[0]["x"].shape[2:]))
    keras_var, expected_var = np.ones(C), np.ones(C)
    for s in steps:
        for key in ("moving_mean", "moving_variance", "dgamma", "dbeta"):  # Keras: (1, 1, C, 1, 1)
            s[key] = s[key].reshape(C)
        ours.weight.grad[:] = 0
        ours.bias.grad[:] = 0
        y = ours(s["x"][perm])
        dx = ours.backward(s["dy"][perm])
        xt = torch.from_numpy(s["x"][perm]).requires_grad_()
        yt = theirs(xt)
        yt.backward(torch.from_numpy(s["dy"][perm]))
        theirs_grads = theirs.weight.grad.clone(), theirs.bias.grad.clone()
        theirs.weight.grad = theirs.bias.grad = None
        # Keras's moving variance averages biased variances; bnlab's the unbiased ones
        biased = (s["moving_variance"] - (1 - momentum) * keras_var) / momentum
        keras_var = s["moving_variance"]
        expected_var = (1 - momentum) * expected_var + momentum * biased * m / (m - 1)
        for got in ((y, dx, ours.weight.grad, ours.bias.grad, ours.running_mean,
                     ours.running_var),
                    (yt, xt.grad, *theirs_grads, theirs.running_mean, theirs.running_var)):
            close(got[0], s["y"][perm], 1e-10, 1e-10)
            close(got[1], s["dx"][perm], 1e-10, 1e-10)
            close(got[2], s["dgamma"], 1e-10, 1e-10)
            close(got[3], s["dbeta"], 1e-10, 1e-10)
            # Keras rounds its decay 1 - momentum to float32 first (0.1 -> 0.10000000149):
            # 1.5e-8 relative in the moving averages of a float64 layer
            close(got[4], s["moving_mean"], 1e-7, 1e-10)
            close(got[5], expected_var, 1e-7, 1e-10)
