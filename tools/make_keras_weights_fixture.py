"""Generate tests/fixtures/keras_bn_weights.npz from real Keras 2 (tf_keras): BN layers
whose weights tests/test_keras_weights.py converts to PyTorch with bnlab.convert_weights.

Run in a separate virtual environment with tensorflow-cpu and tf_keras (bnlab never imports
them):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf-keras numpy
    /tmp/tfenv/bin/python tools/make_keras_weights_fixture.py

Cases: 4-D NHWC float32 input (Keras's fused kernel), 4-D float64 and 2-D (N, C) float64
(its non-fused path: the fused kernel takes no float64), each with random gamma, beta, moving mean and variance, Keras's default epsilon and
momentum and non-default ones. Stored per case: the weights, epsilon and momentum; an
evaluation batch and Keras's output on it; then training calls (``layer(x,
training=True)``) on batches with a drifting offset, and the moving statistics after each.
"""

from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "keras_bn_weights.npz"
rng = np.random.default_rng(20150211)  # the BN paper's arXiv date
arrays: dict[str, np.ndarray] = {}
CASES = {  # name: (input shape, dtype, epsilon, momentum); float32 4-D runs the fused kernel
    "nhwc_fused_default": ((6, 5, 4, 3), "float32", 1e-3, 0.99),
    "nhwc_fused_custom": ((6, 5, 4, 3), "float32", 1e-2, 0.8),
    "nhwc_float64": ((6, 5, 4, 3), "float64", 1e-3, 0.9),
    "nc_default": ((16, 7), "float64", 1e-3, 0.99),
    "nc_custom": ((16, 7), "float64", 1e-4, 0.7),
}

for name, (shape, dtype, eps, momentum) in CASES.items():
    C = shape[-1]
    layer = tf_keras.layers.BatchNormalization(epsilon=eps, momentum=momentum, dtype=dtype)
    layer.build(shape)
    weights = [
        (0.5 + rng.random(C)).astype(dtype),  # gamma
        rng.standard_normal(C).astype(dtype),  # beta
        rng.standard_normal(C).astype(dtype),  # moving_mean
        (0.5 + rng.random(C)).astype(dtype),  # moving_variance
    ]
    layer.set_weights(weights)
    x_eval = (2.0 + 1.5 * rng.standard_normal(shape)).astype(dtype)
    y_eval = layer(tf.constant(x_eval), training=False).numpy()
    steps = [(3.0 * k + rng.standard_normal(shape) * (1 + k)).astype(dtype) for k in range(4)]
    means, variances = [], []
    for x in steps:
        layer(tf.constant(x), training=True)
        means.append(layer.moving_mean.numpy().copy())
        variances.append(layer.moving_variance.numpy().copy())
    for key, value in {
        "gamma": weights[0], "beta": weights[1], "moving_mean": weights[2],
        "moving_variance": weights[3], "epsilon": np.float64(eps),
        "momentum": np.float64(momentum), "x_eval": x_eval, "y_eval": y_eval,
        "x_train": np.stack(steps), "moving_mean_after": np.stack(means),
        "moving_variance_after": np.stack(variances),
        "fused": np.bool_(bool(layer.fused)),
    }.items():
        arrays[f"{name}/{key}"] = np.asarray(value)

arrays["versions"] = np.array(f"tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}")
OUT.parent.mkdir(parents=True, exist_ok=True)
tmp = OUT.with_name(OUT.name + ".tmp.npz")
np.savez(tmp, **arrays)
tmp.replace(OUT)  # atomically
print(f"wrote {OUT} ({arrays['versions']})")
