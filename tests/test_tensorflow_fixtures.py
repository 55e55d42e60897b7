"""moments and batch_normalization against outputs of real TensorFlow.

The fixtures come from ``tools/make_tf_fixtures.py`` (run with tensorflow-cpu in its own
virtual environment); the test itself never imports TensorFlow.
"""

from pathlib import Path

import numpy as np
import pytest

import bnlab
from truth import assert_within, stat_bounds

FIXTURES = np.load(Path(__file__).parent / "fixtures" / "tf_bn.npz")
CASES = sorted({k.split("__")[0] for k in FIXTURES.files if "__" in k})


def field(case, name):
    key = f"{case}__{name}"
    return FIXTURES[key] if key in FIXTURES.files else None


def ulps(actual, expected):
    """Largest distance in units of the last place of ``actual``'s dtype at the expected value."""
    expected = np.asarray(expected, np.longdouble)
    spacing = np.spacing(np.abs(expected).astype(actual.dtype)).astype(np.longdouble)
    return float(np.max(np.abs(actual.astype(np.longdouble) - expected) / spacing))


def test_fixtures_cover_the_required_cases():
    for case in ["moments_fc_last_axis", "moments_nhwc_keepdims", "moments_float16",
                 "moments_large_offset", "bn_offset_none", "bn_scale_none", "bn_both_none",
                 "bn_float16", "bn_large_offset"]:
        assert case in CASES


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("moments_")])
def test_moments_matches_tensorflow(case):
    x = field(case, "x")
    mean, var = bnlab.moments(x, list(field(case, "axes")), keepdims=bool(field(case, "keepdims")))
    tf_mean, tf_var = field(case, "mean"), field(case, "variance")
    assert mean.dtype == tf_mean.dtype and mean.shape == tf_mean.shape
    assert var.dtype == tf_var.dtype and var.shape == tf_var.shape
    # Same formula; TensorFlow's reduction order differs, so a few ulps of summation error.
    assert ulps(mean, tf_mean) <= 8
    # TensorFlow takes the deviations from its own rounded mean, so its variance carries
    # that mean's error squared: var_tf = var + (mean - mean_tf)^2. bnlab's mean and
    # variance are accumulated in float64 and rounded once (checked against an
    # extended-precision truth with the bounds of tests/truth.py).
    b = stat_bounds(x, list(field(case, "axes")), x.dtype)
    assert_within(mean, b.mean, b.mean_err, "mean")
    assert_within(var, b.var, b.var_err, "variance")
    tf_bias = np.square(b.mean.reshape(tf_mean.shape) - tf_mean.astype(np.longdouble))
    assert ulps((var + tf_bias).astype(var.dtype), tf_var) <= 8


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("bn_")])
def test_batch_normalization_matches_tensorflow_bit_for_bit(case):
    y = bnlab.batch_normalization(field(case, "x"), field(case, "mean"), field(case, "variance"),
                                  field(case, "offset"), field(case, "scale"),
                                  float(field(case, "eps")))
    expected = field(case, "y")
    assert y.dtype == expected.dtype and y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


def test_large_offset_variance_survives_in_tensorflow_and_bnlab():
    x = field("moments_large_offset", "x")
    _, var = bnlab.moments(x, [0])
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-3)
    assert np.all(np.abs(var - 1.0) < 0.2)  # the noise is unit Gaussian
