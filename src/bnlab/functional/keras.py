"""BN weights between Keras and PyTorch: the same layer under two sets of names and two
momentum conventions.

| Keras ``BatchNormalization`` | PyTorch ``BatchNorm*d`` |
| --- | --- |
| ``gamma`` | ``weight`` |
| ``beta`` | ``bias`` |
| ``moving_mean`` | ``running_mean`` |
| ``moving_variance`` | ``running_var`` |
| ``epsilon`` (default 1e-3) | ``eps`` (default 1e-5) |
| ``momentum`` = weight of the old value (default 0.99) | ``momentum`` = weight of the new batch = 1 - Keras's (default 0.1) |

Evaluation is the same function of these values in both, so converted weights give the same
output. In training both update ``new = (1 - m) * old + m * batch`` with PyTorch's m, and
both feed the running variance the batch's *unbiased* variance when Keras runs its fused
kernel (4-D input, the default); Keras's non-fused path (other ranks, ``fused=False``,
virtual batches, float64) feeds it the *biased* variance, so over training the two differ by
the factor n/(n - 1) on each batch's contribution (n values per channel), and it rounds its
decay 1 - momentum to float32 (0.01 becomes 0.0099999998): a float64 model's averages then
drift from torch's by about 1e-8 relative per step. ``tests/test_keras_weights.py`` checks
each of these against real Keras.
"""

from __future__ import annotations

import numpy as np

KERAS = ("gamma", "beta", "moving_mean", "moving_variance")
TORCH = ("weight", "bias", "running_mean", "running_var")


def convert_weights(weights: dict, to: str) -> dict:
    """One BN layer's weights in the other framework's names and conventions.

    Args:
        weights: Keras names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``, and
            optionally ``epsilon``, ``momentum``) when ``to="torch"``; PyTorch names
            (``weight``, ``bias``, ``running_mean``, ``running_var``, optionally ``eps``,
            ``momentum``) when ``to="keras"``. ``gamma``/``beta`` (``weight``/``bias``) may
            be missing or None (``scale=False``/``center=False``; ``affine=False``).
            Arrays of shape (C,): NumPy arrays or anything ``np.asarray`` takes (a torch
            state dict's tensors on the CPU).
        to: ``"torch"`` or ``"keras"``.

    Returns:
        A dict in the target's names: NumPy arrays (copies), and ``eps``/``epsilon`` and
        ``momentum`` converted (``momentum_torch = 1 - momentum_keras``) when given.

    Example:
        >>> w = convert_weights({"gamma": g, "beta": b, "moving_mean": m,
        ...                      "moving_variance": v, "epsilon": 1e-3, "momentum": 0.99},
        ...                     to="torch")
        >>> w["momentum"], w["eps"]     # (0.01, 0.001)
    """
    if to not in ("torch", "keras"):
        raise ValueError(f'to must be "torch" or "keras", got {to!r}')
    src, dst = (KERAS, TORCH) if to == "torch" else (TORCH, KERAS)
    eps_src, eps_dst = ("epsilon", "eps") if to == "torch" else ("eps", "epsilon")
    allowed = set(src) | {eps_src, "momentum"}
    unknown = set(weights) - allowed
    if unknown:
        raise ValueError(
            f"converting to {to} takes {sorted(allowed)}, got also {sorted(unknown)} "
            f"(are these {to}'s own names already?)"
        )
    for name in src[2:]:
        if weights.get(name) is None:
            raise ValueError(f"{name} is required to convert a BN layer's weights")
    out: dict = {}
    shape = None
    for a, b in zip(src, dst):
        v = weights.get(a)
        if v is None:
            continue
        arr = np.array(v, copy=True)
        if arr.ndim != 1 or (shape is not None and arr.shape != shape):
            raise ValueError(f"{a} must be a (C,) vector like the others, got shape {arr.shape}")
        shape = arr.shape
        out[b] = arr
    if weights.get(eps_src) is not None:
        out[eps_dst] = float(weights[eps_src])
    if weights.get("momentum") is not None:
        m = float(weights["momentum"])
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {m}")
        out["momentum"] = 1.0 - m
    return out
