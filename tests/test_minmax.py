"""bnlab.minmax_scale against scikit-learn's MinMaxScaler, and in `bnlab steps`."""

import numpy as np
import pytest
from sklearn.preprocessing import MinMaxScaler

import bnlab
from bnlab import cli


@pytest.mark.parametrize("feature_range", [(0, 1), (-1, 1), (2.5, 7.0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_sklearn_per_feature_with_a_constant_feature(feature_range, dtype):
    g = np.random.default_rng(0)
    x = (5 + 3 * g.standard_normal((40, 6))).astype(dtype)
    x[:, 2] = 4.25  # a constant feature: scikit-learn maps it to the range's low end
    got = bnlab.minmax_scale(x, axis=0, feature_range=feature_range)
    want = MinMaxScaler(feature_range=feature_range).fit_transform(x)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * (feature_range[1] - feature_range[0]))
    assert np.all(got[:, 2] == feature_range[0])
    np.testing.assert_allclose(np.delete(got, 2, axis=1).min(0), feature_range[0], atol=tol)
    np.testing.assert_allclose(np.delete(got, 2, axis=1).max(0), feature_range[1], atol=tol)


def test_axis_none_and_tuples_by_hand():
    x = np.array([[1.0, 3.0], [5.0, 9.0]])
    np.testing.assert_allclose(bnlab.minmax_scale(x), [[0, 0.25], [0.5, 1.0]])  # all of x
    np.testing.assert_allclose(bnlab.minmax_scale(x, axis=1), [[0, 1], [0, 1]])
    imgs = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    got = bnlab.minmax_scale(imgs, axis=(0, 2))  # per channel of (N, C, L)
    want = MinMaxScaler().fit_transform(imgs.transpose(0, 2, 1).reshape(-1, 3))
    np.testing.assert_allclose(got.transpose(0, 2, 1).reshape(-1, 3), want, atol=1e-12)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="lo < hi"):
        bnlab.minmax_scale(np.ones(3), feature_range=(1, 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        bnlab.minmax_scale(np.array([1.0, np.nan]))
    with pytest.raises(TypeError):
        bnlab.minmax_scale(np.arange(3))


def test_steps_shows_zscore_and_minmax(capsys):
    assert cli.main(["steps"]) == 0
    out = capsys.readouterr().out
    assert "bnlab.minmax_scale" in out and "bnlab.standardize" in out
