"""Batch normalization in NumPy: the reference every fast path is tested against.

Conventions (written down once, here; every docstring in bnlab points back to this):

* ``axis`` is the channel (feature) axis: 1 for (N, C), (N, C, L) and NCHW; -1 for NHWC.
  Statistics are taken over every other axis, so each channel sees
  ``m = x.size // C`` values.
* Normalization uses the **biased** batch variance ``var = mean((x - mu)**2)``.
  ``running_var`` stores the **unbiased** estimate ``var * m / (m - 1)`` (paper
  Algorithm 2, PyTorch).
* ``momentum`` is PyTorch's: the weight of the *new* batch,
  ``running = (1 - momentum) * running + momentum * batch``. Keras/Flax "momentum=0.99"
  is ``momentum=0.01`` here.
* dtypes: float32 and float64 are computed in their own precision; float16 input is
  computed in float32 (its statistics are float32) and returned as float16; longdouble
  takes the NumPy path in its own precision. Integer input is a TypeError.
* Statistics hold at any size: every sum over the batch (mean, variance, dgamma, dbeta) is
  accumulated in float64 (longdouble in itself), never as a float32 running sum, whose
  error grows with m; the result is rounded once to the compute dtype.
* The variance is computed in two passes (mean first, then the mean of squared
  deviations), never as ``E[x^2] - E[x]^2``, so a large common offset such as
  ``x = 1e4 + noise`` in float32 does not cancel it away, at m = 1e6 as at m = 10.
  Finite inputs never overflow the sums (float64 ones are rescaled by a power of two when
  they would); a variance beyond the dtype's range is an error in BN, inf in ``moments``.
* Elementwise steps (x_hat, y, dx) run in the compute dtype and subtract the mean first:
  ``(x - mu) * inv_std``, so y's error is about half an ulp of mu, times inv_std: for a
  large offset, no more than the rounding that the input itself already carries.

Modules, by topic: :mod:`~bnlab.functional.tensorflow` (``moments``,
``batch_normalization``), :mod:`~bnlab.functional.batchnorm` (PyTorch-style: forward,
backward, inference, ``batch_norm``), :mod:`~bnlab.functional.variants` (folding, batch
renormalization, ghost batches, recalibration), :mod:`~bnlab.functional.scaling`
(z-score, min-max), :mod:`~bnlab.functional.keras` (BN weights between Keras and PyTorch). Every public name is importable from ``bnlab.functional`` itself.

The algorithm (Ioffe & Szegedy 2015, Algorithm 1), per channel over a mini-batch B:

    mu_B      = 1/m * sum_i x_i                     # 1. mini-batch mean
    sigma2_B  = 1/m * sum_i (x_i - mu_B)^2          # 2. mini-batch variance
    x_hat_i   = (x_i - mu_B) / sqrt(sigma2_B + eps) # 3. normalize
    y_i       = gamma * x_hat_i + beta              # 4. scale and shift
"""

from __future__ import annotations

from ._common import check_float
from .batchnorm import (
    ACTS,
    BNCache,
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    check_act,
    inv_std_of,
    update_running_stats,
)
from .keras import convert_weights
from .scaling import minmax_scale, standardize
from .tensorflow import batch_normalization, moments
from .variants import (
    RenormCache,
    batch_renorm_backward,
    batch_renorm_forward,
    check_virtual_batch_size,
    fold_batchnorm_params,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    ghost_statistics,
    recalibrate_layers,
    renorm_correction,
    update_renorm_stats,
)

__all__ = [
    "ACTS",
    "BNCache",
    "RenormCache",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_normalization",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "check_act",
    "check_float",
    "check_virtual_batch_size",
    "convert_weights",
    "fold_batchnorm_params",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "ghost_statistics",
    "inv_std_of",
    "minmax_scale",
    "moments",
    "recalibrate_layers",
    "renorm_correction",
    "standardize",
    "update_renorm_stats",
    "update_running_stats",
]
