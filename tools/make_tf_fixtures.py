"""Generate tests/fixtures/tf_bn.npz from real TensorFlow.

Run in a separate virtual environment that has tensorflow-cpu (bnlab itself never
imports TensorFlow):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python tools/make_tf_fixtures.py

Each case stores its inputs and TensorFlow's outputs under keys ``<case>__<field>``;
``tests/test_tensorflow_fixtures.py`` replays them against bnlab.
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tf_bn.npz"
rng = np.random.default_rng(20151102)  # the paper's arXiv date
arrays: dict[str, np.ndarray] = {}


def moments_case(name, x, axes, keepdims=False):
    mean, var = tf.nn.moments(tf.constant(x), axes=axes, keepdims=keepdims)
    arrays.update({f"moments_{name}__x": x, f"moments_{name}__axes": np.array(axes),
                   f"moments_{name}__keepdims": np.array(keepdims),
                   f"moments_{name}__mean": mean.numpy(), f"moments_{name}__variance": var.numpy()})


def bn_case(name, x, mean, var, offset, scale, eps):
    t = lambda a: None if a is None else tf.constant(a)  # noqa: E731
    y = tf.nn.batch_normalization(t(x), t(mean), t(var), t(offset), t(scale), eps)
    arrays.update({f"bn_{name}__x": x, f"bn_{name}__mean": mean, f"bn_{name}__variance": var,
                   f"bn_{name}__eps": np.array(eps), f"bn_{name}__y": y.numpy()})
    if offset is not None:
        arrays[f"bn_{name}__offset"] = offset
    if scale is not None:
        arrays[f"bn_{name}__scale"] = scale


def randn(*shape, dtype=np.float32, loc=0.0, scale=1.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


# tf.nn.moments ------------------------------------------------------------------------
moments_case("fc_last_axis", randn(32, 7, loc=3.0, scale=2.0), [0])   # (N, C) -> (C,)
moments_case("nhwc", randn(4, 5, 5, 6), [0, 1, 2])                    # NHWC -> (C,)
moments_case("nhwc_keepdims", randn(4, 5, 5, 6), [0, 1, 2], keepdims=True)
moments_case("nchw_keepdims", randn(4, 6, 5, 5), [0, 2, 3], keepdims=True)
moments_case("all_axes", randn(8, 9), [0, 1])
moments_case("float64", randn(16, 3, 4, dtype=np.float64), [0, 2])
moments_case("float16", randn(64, 8, dtype=np.float16, loc=1.0), [0])
moments_case("large_offset", randn(512, 4, loc=1e4), [0])             # var ~ 1 must survive

# tf.nn.batch_normalization ------------------------------------------------------------
for name, offset, scale in [("full", True, True), ("offset_none", False, True),
                            ("scale_none", True, False), ("both_none", False, False)]:
    x = randn(16, 6, loc=-2.0, scale=3.0)
    m, v = (a.numpy() for a in tf.nn.moments(tf.constant(x), [0]))
    bn_case(name, x, m, v, randn(6) if offset else None,
            (1.0 + 0.5 * randn(6)) if scale else None, 1e-3)
x = randn(4, 6, 5, 5)
m, v = (a.numpy() for a in tf.nn.moments(tf.constant(x), [0, 2, 3], keepdims=True))
bn_case("nchw_keepdims", x, m, v, randn(1, 6, 1, 1), randn(1, 6, 1, 1), 1e-5)
x = randn(4, 5, 5, 6)
m, v = (a.numpy() for a in tf.nn.moments(tf.constant(x), [0, 1, 2]))
bn_case("nhwc", x, m, v, randn(6), randn(6), 1e-5)
x = randn(32, 8, dtype=np.float16, loc=1.0)
m, v = (a.numpy() for a in tf.nn.moments(tf.constant(x), [0]))
bn_case("float16", x, m, v, randn(8, dtype=np.float16), randn(8, dtype=np.float16), 1e-3)
x = randn(256, 4, loc=1e4)
m, v = (a.numpy() for a in tf.nn.moments(tf.constant(x), [0]))
bn_case("large_offset", x, m, v, np.zeros(4, np.float32), np.ones(4, np.float32), 1e-5)
x = randn(16, 6, dtype=np.float64)
m, v = (a.numpy() for a in tf.nn.moments(tf.constant(x), [0]))
bn_case("float64", x, m, v, randn(6, dtype=np.float64), randn(6, dtype=np.float64), 1e-5)

arrays["tensorflow_version"] = np.array(tf.__version__)
OUT.parent.mkdir(parents=True, exist_ok=True)
np.savez_compressed(OUT, **arrays)
print(f"wrote {OUT} ({len(arrays)} arrays) with TensorFlow {tf.__version__}")
