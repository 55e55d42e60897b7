"""Generate tests/fixtures/keras_bn_variants.npz from real Keras 2 (tf_keras).

Run in a separate virtual environment with tensorflow-cpu and tf_keras (bnlab itself never
imports them):

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf-keras numpy
    /tmp/tfenv/bin/python tools/make_keras_fixtures.py

Cases (several training steps each, ``loss = sum(y * dy)``; renorm in float32, since Keras's
renorm path mixes a float32 ``sqrt(epsilon)`` into float64 layers and fails; ghost in
float64):

* ``renorm_*``: ``BatchNormalization(renorm=True)``: batch renormalization. The inputs'
  offset and scale drift from step to step, so r and d are clipped in some steps (with
  small ``rmax``/``dmax``).
* ``ghost``: ``BatchNormalization(virtual_batch_size=v)``: ghost batches (Keras's virtual
  batch b holds samples b, b + N/v, ...).

Stored per case: the configuration, gamma and beta, and per step x, dy, y, dx, dgamma, dbeta
and the variables after the step (moving_mean, moving_variance; renorm_mean and
renorm_stddev for renorm). Keras's momenta are the weights of the *old* value (0.9 here is
PyTorch's 0.1). ``tests/test_keras_fixtures.py`` replays them against bnlab.
"""

from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "keras_bn_variants.npz"
rng = np.random.default_rng(20170210)  # the batch renorm paper's arXiv date
arrays: dict[str, np.ndarray] = {}


def run_case(name, shape, steps, layer_kwargs, drift=False, dtype="float64"):
    C = shape[1]
    gamma = (0.5 + rng.random(C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    init = tf_keras.initializers.Constant
    layer = tf_keras.layers.BatchNormalization(
        axis=1, dtype=dtype, gamma_initializer=init(gamma), beta_initializer=init(beta),
        **layer_kwargs)
    layer.build(shape)
    arrays[f"{name}__gamma"], arrays[f"{name}__beta"] = gamma, beta
    for key, value in layer_kwargs.items():
        if key == "renorm_clipping":
            for k, v in value.items():
                arrays[f"{name}__{k}"] = np.array(v)
        else:
            arrays[f"{name}__{key}"] = np.array(value)
    arrays[f"{name}__steps"] = np.array(steps)
    for step in range(steps):
        offset = 2.0 * step if drift else 1.0
        scale = 0.5 + 1.5 * step if drift else 2.0
        x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * tf.constant(dy))
        dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        out = {"x": x, "dy": dy, "y": y.numpy(), "dx": dx.numpy(), "dgamma": dgamma.numpy(),
               "dbeta": dbeta.numpy(), "moving_mean": layer.moving_mean.numpy(),
               "moving_variance": layer.moving_variance.numpy()}
        if layer_kwargs.get("renorm"):
            out.update(renorm_mean=layer.renorm_mean.numpy(),
                       renorm_stddev=layer.renorm_stddev.numpy())
        for key, value in out.items():
            arrays[f"{name}__{step}__{key}"] = np.asarray(value)


run_case("renorm_clipped", (8, 3, 4, 4), 4,
         dict(renorm=True, momentum=0.9, epsilon=1e-3, renorm_momentum=0.9,
              renorm_clipping={"rmin": 1 / 1.5, "rmax": 1.5, "dmax": 0.5}), drift=True,
         dtype="float32")
run_case("renorm_defaults", (16, 5), 3,
         dict(renorm=True, momentum=0.9, epsilon=1e-3, renorm_momentum=0.9,
              renorm_clipping={"rmin": 1 / 3.0, "rmax": 3.0, "dmax": 5.0}), dtype="float32")
run_case("ghost", (12, 3, 2, 2), 2, dict(momentum=0.9, epsilon=1e-3, virtual_batch_size=4))

OUT.parent.mkdir(parents=True, exist_ok=True)
np.savez_compressed(OUT, **arrays)
print(f"wrote {OUT} ({len(arrays)} arrays, {OUT.stat().st_size} bytes) with TensorFlow "
      f"{tf.__version__}, tf_keras {tf_keras.__version__}")
