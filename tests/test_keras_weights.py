"""bnlab.convert_weights against real Keras 2 (tests/fixtures/keras_bn_weights.npz, made by
tools/make_keras_weights_fixture.py with tensorflow-cpu and tf_keras): a Keras
BatchNormalization layer and torch's BatchNorm given the converted weights produce the same
evaluation output, and after the same training batches the same running statistics, with
torch's momentum = 1 - Keras's and the variance convention of Keras's path (fused kernel:
unbiased, as torch; otherwise biased)."""

from pathlib import Path

import numpy as np
import pytest

import bnlab

torch = pytest.importorskip("torch")

DATA = np.load(Path(__file__).parent / "fixtures" / "keras_bn_weights.npz")
CASES = sorted({k.split("/")[0] for k in DATA.files if "/" in k})


def case(name):
    return {k.split("/", 1)[1]: DATA[k] for k in DATA.files if k.startswith(name + "/")}


def torch_layer(c):
    w = bnlab.convert_weights(
        {k: c[k] for k in ("gamma", "beta", "moving_mean", "moving_variance", "epsilon",
                           "momentum")},
        to="torch",
    )
    dtype = torch.float64 if c["x_eval"].dtype == np.float64 else torch.float32
    C = c["gamma"].shape[0]
    cls = torch.nn.BatchNorm2d if c["x_eval"].ndim == 4 else torch.nn.BatchNorm1d
    layer = cls(C, eps=w["eps"], momentum=w["momentum"], dtype=dtype)
    layer.load_state_dict({k: torch.from_numpy(w[k]) for k in
                           ("weight", "bias", "running_mean", "running_var")}, strict=False)
    return layer, w


def nchw(x):
    """Keras's channels-last batch as torch's channels-first tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


@pytest.mark.parametrize("name", CASES)
def test_converted_weights_give_keras_evaluation_output(name):
    c = case(name)
    layer, w = torch_layer(c)
    assert w["momentum"] == pytest.approx(1 - float(c["momentum"]))
    assert w["eps"] == float(c["epsilon"])
    with torch.no_grad():
        y = layer.eval()(nchw(c["x_eval"]))
    y = y.permute(0, 2, 3, 1) if y.dim() == 4 else y
    tol = 1e-12 if c["x_eval"].dtype == np.float64 else 2e-6
    np.testing.assert_allclose(y.numpy(), c["y_eval"], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", CASES)
def test_running_statistics_after_training_follow_the_momentum_mapping(name):
    """torch's update with m = 1 - Keras's momentum reproduces Keras's moving averages
    where Keras runs its fused kernel (both feed in the unbiased variance). On Keras's
    non-fused path the variance fed in is the biased one, and Keras rounds its decay
    1 - momentum to float32: both documented differences are modelled here, not tolerated
    (float64 cases agree to 1e-10 with them, and differ by ~1e-8 without the rounding)."""
    c = case(name)
    layer, w = torch_layer(c)
    m = w["momentum"]
    if not bool(c["fused"]):  # Keras rounds its decay 1 - momentum to float32 there
        m = layer.momentum = float(np.float32(m))
    layer.train()
    rv = layer.running_var.clone()
    for k, x in enumerate(c["x_train"]):
        n = x.size // x.shape[-1]
        xt = nchw(x)
        batch_var = xt.transpose(0, 1).reshape(xt.shape[1], -1).var(1, correction=0)
        with torch.no_grad():
            layer(xt)
        # Keras's own rule, computed from torch's numbers
        keras_var = batch_var * n / (n - 1) if bool(c["fused"]) else batch_var
        rv = (1 - m) * rv + m * keras_var
        tol = 1e-10 if x.dtype == np.float64 else 2e-5
        np.testing.assert_allclose(layer.running_mean.numpy(), c["moving_mean_after"][k],
                                   rtol=tol, atol=tol)
        np.testing.assert_allclose(rv.numpy(), c["moving_variance_after"][k], rtol=tol,
                                   atol=tol)
        if bool(c["fused"]):  # the same convention as torch: its own buffer matches too
            np.testing.assert_allclose(layer.running_var.numpy(),
                                       c["moving_variance_after"][k], rtol=tol, atol=tol)


def test_round_trip_and_bad_input():
    c = case(CASES[0])
    keras = {k: c[k] for k in ("gamma", "beta", "moving_mean", "moving_variance", "epsilon",
                               "momentum")}
    back = bnlab.convert_weights(bnlab.convert_weights(keras, to="torch"), to="keras")
    for k, v in keras.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-15)
    # no affine parameters (Keras center=False, scale=False): only the statistics
    out = bnlab.convert_weights({"moving_mean": [0.0], "moving_variance": [1.0]}, to="torch")
    assert set(out) == {"running_mean", "running_var"}
    with pytest.raises(ValueError, match="running_var"):
        bnlab.convert_weights({"weight": [1.0], "running_mean": [0.0]}, to="keras")
    with pytest.raises(ValueError, match="own names already"):
        bnlab.convert_weights({"weight": [1.0], "running_mean": [0.0], "running_var": [1.0]},
                              to="torch")
    with pytest.raises(ValueError, match=r"\(C,\) vector"):
        bnlab.convert_weights({"moving_mean": [0.0, 1.0], "moving_variance": [1.0]},
                              to="torch")
    with pytest.raises(ValueError, match='"torch" or "keras"'):
        bnlab.convert_weights(keras, to="jax")
