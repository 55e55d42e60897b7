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
  computed with float32 statistics and returned as float16. Integer input is a TypeError.
* The variance is computed in two passes (mean first, then the mean of squared
  deviations), never as ``E[x^2] - E[x]^2``, so a large common offset such as
  ``x = 1e4 + noise`` in float32 does not cancel it away.

The algorithm (Ioffe & Szegedy 2015, Algorithm 1), per channel over a mini-batch B:

    mu_B      = 1/m * sum_i x_i                     # 1. mini-batch mean
    sigma2_B  = 1/m * sum_i (x_i - mu_B)^2          # 2. mini-batch variance
    x_hat_i   = (x_i - mu_B) / sqrt(sigma2_B + eps) # 3. normalize
    y_i       = gamma * x_hat_i + beta              # 4. scale and shift
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels

__all__ = [
    "BNCache",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_normalization",
    "moments",
    "standardize",
]


# ----------------------------------------------------------------------------- helpers


def _check_float(x: np.ndarray, name: str = "x") -> None:
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"expected a floating-point array for {name} (float16, float32 or float64), "
            f"got dtype {x.dtype}"
        )


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 is computed in float32; other float dtypes in themselves."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    if isinstance(axes, (int, np.integer)):
        axes = (axes,)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in axes={tuple(axes)}")
    return tuple(out)


def _channel_axes(x: np.ndarray, axis: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """For channel axis ``axis`` return (axis, reduced axes, broadcast shape of a (C,) array)."""
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (N, C, ...), got {x.ndim}D input")
    (axis,) = _normalize_axes(axis, x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
    bshape = tuple(x.shape[axis] if a == axis else 1 for a in range(x.ndim))
    return axis, reduce_axes, bshape


def _check_channel_vector(v, name: str, C: int, dtype: np.dtype) -> np.ndarray | None:
    """A per-channel parameter (gamma, beta, running stats) must have shape (C,)."""
    if v is None:
        return None
    v = np.asarray(v)
    _check_float(v, name)
    if v.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},), got {v.shape}")
    return v.astype(dtype, copy=False)


def _check_finite_stats(mean: np.ndarray, var: np.ndarray, x_shape) -> None:
    """Non-finite batch statistics mean the input held NaN or inf (checked on (C,), not on x)."""
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if bad.any():
        ch = np.flatnonzero(bad)
        raise FloatingPointError(
            f"input of size {tuple(x_shape)} contains NaN or inf: batch statistics of "
            f"channel(s) {ch[:8].tolist()} are not finite (mean={mean[ch[0]]}, var={var[ch[0]]})"
        )


# ----------------------------------------------------------------------------- TF-style


def _moments_keepdims(xc: np.ndarray, axes: tuple[int, ...]):
    """Two-pass mean and biased variance in ``xc``'s own precision, reduced axes kept."""
    mean = xc.mean(axis=axes, keepdims=True)
    return mean, np.square(xc - mean).mean(axis=axes, keepdims=True)


def moments(x, axes, shift=None, keepdims: bool = False):
    """Mean and biased variance of ``x`` over ``axes``, as ``tf.nn.moments``.

        mean     = 1/m * sum(x)
        variance = 1/m * sum((x - mean)^2)      (two passes: no E[x^2] - E[x]^2)

    Args:
        x: floating-point array.
        axes: int or sequence of ints, the axes to reduce. ``axes=[0]`` on (N, C) gives
            per-feature statistics of shape (C,); ``[0, 1, 2]`` on NHWC gives per-channel ones.
        shift: accepted for signature compatibility and unused, as in TensorFlow 2.
        keepdims: keep the reduced axes with length 1 (for broadcasting back onto ``x``).

    Returns:
        ``(mean, variance)`` in ``x``'s dtype. float16 input is accumulated in float32 and
        the results are cast back to float16 (as TensorFlow does).

    Example:
        >>> mean, var = moments(np.array([[1.0, 2.0], [3.0, 6.0]]), axes=[0])
        >>> mean, var
        (array([2., 4.]), array([1., 4.]))
    """
    del shift  # unused, as in tf.nn.moments
    x = np.asarray(x)
    _check_float(x)
    axes = _normalize_axes(axes, x.ndim)
    mean, variance = _moments_keepdims(x.astype(_compute_dtype(x.dtype), copy=False), axes)
    if not keepdims:
        mean, variance = mean.squeeze(axis=axes), variance.squeeze(axis=axes)
    return mean.astype(x.dtype, copy=False), variance.astype(x.dtype, copy=False)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, name=None):
    """Normalize ``x`` with given statistics, exactly as ``tf.nn.batch_normalization``.

        inv = 1 / sqrt(variance + variance_epsilon)
        inv = inv * scale                        (if scale is given)
        y   = x * inv + (offset - mean * inv)    (offset = 0 if None)

    Every operation is done in ``x``'s dtype, as TensorFlow does (float16 included: this
    function takes given statistics, so it does not widen them); the result matches
    TensorFlow bit for bit. Statistics and parameters broadcast against ``x`` by NumPy's
    rules (so per-channel (C,) vectors fit NHWC and (N, C) directly, and keepdims
    statistics fit any layout).
    ``name`` is accepted for signature compatibility and ignored.

    Returns:
        ``y`` with ``x``'s dtype and shape.

    Example:
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> m, v = moments(x, [0])
        >>> batch_normalization(x, m, v, None, None, 0.0)
        array([[-1., -1.],
               [ 1.,  1.]])
    """
    del name
    x = np.asarray(x)
    _check_float(x)
    arrays = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    for k, v in arrays.items():
        if v is not None:
            _check_float(np.asarray(v), k)
    # TensorFlow computes every op in x's dtype (float16 too), rsqrt through float32 with one
    # rounding; doing the same makes the result identical bit for bit, float16 included.
    dt = x.dtype
    mean = np.asarray(mean, dtype=dt)
    var_eps = np.asarray(variance, dtype=dt) + dt.type(variance_epsilon)
    inv = (1.0 / np.sqrt(var_eps.astype(_compute_dtype(dt)))).astype(dt)
    if scale is not None:
        inv = inv * np.asarray(scale, dtype=dt)
    shift = -mean * inv if offset is None else np.asarray(offset, dtype=dt) - mean * inv
    try:
        y = x * inv + shift
    except ValueError as e:
        raise ValueError(
            f"statistics/parameters do not broadcast against x of shape {x.shape}: "
            f"mean {mean.shape}, inv {np.shape(inv)}"
        ) from e
    return y


# ----------------------------------------------------------------------------- PyTorch-style


@dataclass
class BNCache:
    """What the backward pass needs from a forward pass.

    ``x`` is the input in compute precision, ``mean`` and ``inv_std = 1/sqrt(var + eps)``
    are (C,) vectors, ``gamma`` is (C,) (ones when not affine). ``batch_stats`` says whether
    the statistics came from this batch (training) or were frozen running statistics
    (evaluation), which changes the gradient.
    """

    x: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray
    axis: int
    batch_stats: bool
    out_dtype: np.dtype
    var: np.ndarray | None = None  # biased batch variance (training only), (C,)


def _prepare(x, gamma, beta, axis):
    x = np.asarray(x)
    _check_float(x)
    axis, reduce_axes, bshape = _channel_axes(x, axis)
    C = x.shape[axis]
    cdt = _compute_dtype(x.dtype)
    gamma = _check_channel_vector(gamma, "gamma (weight)", C, cdt)
    beta = _check_channel_vector(beta, "beta (bias)", C, cdt)
    return x, axis, reduce_axes, bshape, C, cdt, gamma, beta


def _affine(x_hat, gamma, beta, bshape):
    y = x_hat if gamma is None else x_hat * gamma.reshape(bshape)
    return y if beta is None else y + beta.reshape(bshape)


def batch_norm_forward(x, gamma, beta, eps: float = 1e-5, axis: int = 1, backend: str = "auto"):
    """Training-mode batch normalization with batch statistics: Algorithm 1 of the paper.

        mu      = mean(x)                  over every axis except ``axis``   (C,)
        var     = mean((x - mu)^2)         biased                            (C,)
        x_hat   = (x - mu) / sqrt(var + eps)
        y       = gamma * x_hat + beta

    Args:
        x: input, e.g. (N, C), (N, C, L), (N, C, H, W) or NHWC with ``axis=-1``.
        gamma: (C,) scale, or None for 1.
        beta: (C,) shift, or None for 0.
        eps: added to the variance; default 1e-5.
        axis: the channel axis; default 1 (see the module docstring).
        backend: "auto" (fused kernels when numba is available), "numpy" (this reference)
            or "numba"; see :mod:`bnlab.kernels`.

    Returns:
        ``(y, cache)``: ``y`` like ``x`` (same dtype), ``cache`` a :class:`BNCache` for
        :func:`batch_norm_backward`; ``cache.mean`` and ``cache.var`` are the batch statistics.

    Raises:
        ValueError: only one value per channel (``m == 1``), or gamma/beta not (C,).
        FloatingPointError: the input holds NaN or inf.
    """
    x, axis, reduce_axes, bshape, C, cdt, gamma, beta = _prepare(x, gamma, beta, axis)
    if x.size // C <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of size {x.shape}"
        )
    xc = x.astype(cdt, copy=False)
    fast = kernels.resolve(backend)
    if fast is not None:
        y, *stats = fast.train_forward(xc, gamma, beta, eps, axis)
        mean, var, inv_std = (v.astype(cdt) for v in stats)  # statistics in compute dtype
        _check_finite_stats(mean, var, x.shape)
    else:
        mean, var = (s.reshape(C) for s in _moments_keepdims(xc, reduce_axes))  # (C,), biased
        _check_finite_stats(mean, var, x.shape)
        inv_std = 1.0 / np.sqrt(var + cdt.type(eps))                          # (C,)
        x_hat = (xc - mean.reshape(bshape)) * inv_std.reshape(bshape)        # like x
        y = _affine(x_hat, gamma, beta, bshape)
    g = np.ones(C, cdt) if gamma is None else gamma
    cache = BNCache(xc, mean, inv_std, g, axis, True, x.dtype, var)
    return y.astype(x.dtype, copy=False), cache


def batch_norm_backward(dy, cache: BNCache, backend: str = "auto"):
    """Gradient of batch normalization, in one closed-form expression.

    With ``m`` values per channel and sums over every axis except the channel axis:

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)   (batch statistics)
        dx     = gamma * inv_std * dy                                      (frozen statistics)

    The first ``dx`` is the paper's chain rule through mu and sigma^2 collapsed into one
    formula; the second holds in evaluation mode, where mean and variance are constants.

    Args:
        dy: upstream gradient, same shape as the forward input.
        cache: the :class:`BNCache` from the forward pass.
        backend: as in :func:`batch_norm_forward`.

    Returns:
        ``(dx, dgamma, dbeta)``: ``dx`` like ``dy`` (float16 in, float16 out), the others (C,)
        in compute precision.
    """
    dy = np.asarray(dy)
    _check_float(dy, "dy")
    if dy.shape != cache.x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected the forward input's {cache.x.shape}")
    x = cache.x
    fast = kernels.resolve(backend)
    if fast is not None:
        dx, dgamma, dbeta = fast.backward(dy, x, cache.mean, cache.inv_std, cache.gamma,
                                          cache.axis, cache.batch_stats)
        cdt = x.dtype
        return dx.astype(cache.out_dtype, copy=False), dgamma.astype(cdt), dbeta.astype(cdt)
    _, reduce_axes, bshape = _channel_axes(x, cache.axis)
    dyc = dy.astype(x.dtype, copy=False)
    inv_std = cache.inv_std.astype(x.dtype, copy=False).reshape(bshape)
    x_hat = (x - cache.mean.astype(x.dtype, copy=False).reshape(bshape)) * inv_std  # like x
    dbeta = dyc.sum(axis=reduce_axes)                                       # (C,)
    dgamma = (dyc * x_hat).sum(axis=reduce_axes)                            # (C,)
    scale = cache.gamma.reshape(bshape) * inv_std                           # (1, C, 1, 1)
    if cache.batch_stats:
        m = x.size // x.shape[cache.axis]
        dx = (scale / m) * (m * dyc - dbeta.reshape(bshape) - x_hat * dgamma.reshape(bshape))
    else:
        dx = scale * dyc
    return dx.astype(cache.out_dtype, copy=False), dgamma, dbeta


def batch_norm_inference(x, mean, var, gamma, beta, eps: float = 1e-5, axis: int = 1,
                         backend: str = "auto"):
    """Evaluation-mode batch normalization with fixed statistics, and its cache.

        y = gamma * (x - mean) / sqrt(var + eps) + beta

    Shapes and conventions as :func:`batch_norm_forward`; ``mean`` and ``var`` are (C,)
    (typically ``running_mean`` and ``running_var``). Each sample is normalized on its own,
    so the output of one sample does not depend on the rest of the batch.
    """
    x, axis, _, bshape, C, cdt, gamma, beta = _prepare(x, gamma, beta, axis)
    mean = _check_channel_vector(mean, "running_mean", C, cdt)
    var = _check_channel_vector(var, "running_var", C, cdt)
    inv_std = 1.0 / np.sqrt(var + cdt.type(eps))
    xc = x.astype(cdt, copy=False)
    fast = kernels.resolve(backend)
    if fast is not None:
        y = fast.inference(xc, mean, inv_std, gamma, beta, axis)
    else:
        y = _affine((xc - mean.reshape(bshape)) * inv_std.reshape(bshape), gamma, beta, bshape)
    g = np.ones(C, cdt) if gamma is None else gamma
    cache = BNCache(xc, mean, inv_std, g, axis, False, x.dtype)
    return y.astype(x.dtype, copy=False), cache


def update_running_stats(running_mean, running_var, mean, var, m: int, momentum: float) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch``.

    ``var`` is the biased batch variance over ``m`` values; the running variance receives
    the unbiased ``var * m / (m - 1)`` (paper Algorithm 2, PyTorch).
    """
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean.astype(running_mean.dtype, copy=False)
    if running_var is not None:
        unbiased = var * (m / (m - 1))
        running_var *= 1.0 - momentum
        running_var += momentum * unbiased.astype(running_var.dtype, copy=False)


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str = "auto",
):
    """Batch normalization with PyTorch's ``torch.nn.functional.batch_norm`` semantics.

    In training, normalizes with the batch statistics and, if the buffers are given, updates
    them in place: ``running_mean`` with the batch mean and ``running_var`` with the
    *unbiased* batch variance, each as ``(1 - momentum) * running + momentum * batch``.
    Otherwise normalizes with ``running_mean`` and ``running_var``.

    Args:
        x: input with channels on ``axis`` (default 1; -1 for NHWC).
        running_mean, running_var: (C,) float arrays, or None (only when ``training``).
        weight, bias: (C,) gamma and beta, or None.
        training: use batch statistics; default False.
        momentum: weight of the new batch; default 0.1 (Keras 0.99 is 0.01 here).
        eps: default 1e-5.
        backend: as in :func:`batch_norm_forward`.

    Returns:
        ``y`` like ``x``.
    """
    if training:
        y, cache = batch_norm_forward(x, weight, bias, eps=eps, axis=axis, backend=backend)
        C = cache.mean.shape[0]
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            if buf is not None:
                _check_channel_vector(buf, name, C, np.asarray(buf).dtype)
        update_running_stats(running_mean, running_var, cache.mean, cache.var,
                             cache.x.size // C, momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    y, _ = batch_norm_inference(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                                backend=backend)
    return y


def standardize(x, axis=None, eps: float = 0.0):
    """z-score: ``(x - mean) / sqrt(var + eps)`` with the biased variance.

    Args:
        x: floating-point array.
        axis: axis or axes to take mean and variance over; None (default) for all of ``x``.
            ``axis=0`` on (N, D) standardizes each feature over the samples.
        eps: default 0.0 (pure z-score); add a small value to guard constant inputs.

    Returns:
        Array like ``x``: zero mean and unit variance over ``axis``.
    """
    x = np.asarray(x)
    _check_float(x)
    axes = tuple(range(x.ndim)) if axis is None else _normalize_axes(axis, x.ndim)
    cdt = _compute_dtype(x.dtype)
    xc = x.astype(cdt, copy=False)
    mean, var = _moments_keepdims(xc, axes)
    z = (xc - mean) / np.sqrt(var + cdt.type(eps))
    return z.astype(x.dtype, copy=False)
