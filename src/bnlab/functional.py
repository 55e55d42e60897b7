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

The algorithm (Ioffe & Szegedy 2015, Algorithm 1), per channel over a mini-batch B:

    mu_B      = 1/m * sum_i x_i                     # 1. mini-batch mean
    sigma2_B  = 1/m * sum_i (x_i - mu_B)^2          # 2. mini-batch variance
    x_hat_i   = (x_i - mu_B) / sqrt(sigma2_B + eps) # 3. normalize
    y_i       = gamma * x_hat_i + beta              # 4. scale and shift
"""

from __future__ import annotations

import math
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
            f"expected a floating-point array for {name} (float16, float32, float64 or "
            f"longdouble), got dtype {x.dtype}"
        )


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 is computed in float32; other float dtypes in themselves."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _accumulator(dtype: np.dtype) -> np.dtype:
    """Sums accumulate in float64 at least: float16/float32 in float64, longdouble in itself."""
    return np.promote_types(dtype, np.float64)


def _check_number(v, name: str, minimum: float | None = None) -> float:
    """A finite real scalar (eps, momentum); ``minimum`` bounds it from below when given."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {v!r} ({type(v).__name__})")
    v = float(v)
    if not np.isfinite(v) or (minimum is not None and v < minimum):
        bound = "a finite number" if minimum is None else f"a finite number >= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {v!r}")
    return v


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    if np.ndim(axes) == 0:
        axes = (axes,)
    out = []
    for a in axes:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axes must be integers, got {a!r} ({type(a).__name__})")
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


def _check_running_buffer(buf, name: str, C: int) -> None:
    """A running-statistics buffer is updated in place: a float NumPy array of shape (C,)."""
    if buf is None:
        return
    if not isinstance(buf, np.ndarray):
        raise TypeError(
            f"{name} is updated in place, so it must be a NumPy array of shape "
            f"({C},), got {type(buf).__name__}"
        )
    _check_channel_vector(buf, name, C, buf.dtype)
    if not buf.flags.writeable:
        raise ValueError(f"{name} is updated in place, but the array given is read-only")


def _count(shape, axes) -> int:
    """Number of values reduced over ``axes`` (m, per channel)."""
    return math.prod(shape[a] for a in axes)


def _check_finite_stats(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
    """Non-finite batch statistics: NaN/inf in x, or a variance beyond the dtype's range.

    Checked on the (C,) statistics; x itself is scanned only on this failure path, to say
    which of the two it is.
    """
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if not bad.any():
        return
    ch = np.flatnonzero(bad)
    where = f"channel(s) {ch[:8].tolist()} (mean={mean[ch[0]]}, var={var[ch[0]]})"
    if np.isfinite(x).all():
        wider = "" if var.dtype.itemsize >= 8 else " or compute in float64"
        raise FloatingPointError(
            f"input of size {tuple(x.shape)} is finite, but the batch variance of {where} "
            f"overflows {var.dtype}: rescale the input{wider}"
        )
    raise FloatingPointError(
        f"input of size {tuple(x.shape)} contains NaN or inf: batch statistics of {where} "
        f"are not finite"
    )


def _cast(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round to ``dtype``; a value past its range becomes inf (IEEE), without a warning."""
    with np.errstate(over="ignore"):
        return v.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- statistics


def _two_pass(x: np.ndarray, axes: tuple[int, ...]):
    acc = _accumulator(x.dtype)
    mean = x.mean(axis=axes, dtype=acc, keepdims=True)
    dev = np.subtract(x, mean, dtype=acc)  # like x, in acc
    return mean, np.square(dev, out=dev).mean(axis=axes, keepdims=True)


def _moments_keepdims(x: np.ndarray, axes: tuple[int, ...]):
    """Mean and biased variance over ``axes`` (kept with length 1), in float64 or wider.

    Two passes, both accumulated in float64 (longdouble in itself): the mean, then the mean
    of the squared deviations from it. A float32 running sum would not do: its rounding
    error grows with m, and for ``x = 1e4 + noise`` it leaves nothing of the variance by
    m = 1e5. Finite inputs do not overflow: float16/float32 values cannot overflow float64
    sums, and float64 sums past 1.8e308 are redone on x scaled by a power of two (exact).
    A variance that is itself beyond the dtype's range is inf.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled below
        mean, var = _two_pass(x, axes)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()) and np.isfinite(x).all():
            scale = np.ldexp(1.0, int(np.frexp(np.abs(x).max())[1]) - 1)  # max|x| / scale < 2
            mean, var = _two_pass(x / scale, axes)
            mean, var = mean * scale, var * scale * scale
    return mean, var


# ----------------------------------------------------------------------------- TF-style


def moments(x, axes, shift=None, keepdims: bool = False):
    """Mean and biased variance of ``x`` over ``axes``, as ``tf.nn.moments``.

        mean     = 1/m * sum(x)
        variance = 1/m * sum((x - mean)^2)      (two passes: no E[x^2] - E[x]^2)

    Both sums are accumulated in float64 (see the module docstring), so the result is the
    float64 statistic rounded once to ``x``'s dtype.

    Args:
        x: floating-point array.
        axes: int or sequence of ints, the axes to reduce. ``axes=[0]`` on (N, C) gives
            per-feature statistics of shape (C,); ``[0, 1, 2]`` on NHWC gives per-channel ones.
        shift: accepted for signature compatibility and unused, as in TensorFlow 2.
        keepdims: keep the reduced axes with length 1 (for broadcasting back onto ``x``).

    Returns:
        ``(mean, variance)`` in ``x``'s dtype (float16 in, float16 out, as TensorFlow; a
        variance beyond float16's range, 65504, is then inf, as there).

    Raises:
        ValueError: ``axes`` cover no values while other axes do (statistics of nothing).

    Example:
        >>> mean, var = moments(np.array([[1.0, 2.0], [3.0, 6.0]]), axes=[0])
        >>> mean, var
        (array([2., 4.]), array([1., 4.]))
    """
    del shift  # unused, as in tf.nn.moments
    x = np.asarray(x)
    _check_float(x)
    axes = _normalize_axes(axes, x.ndim)
    kept = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    if _count(x.shape, axes) == 0 and math.prod(kept) > 0:
        raise ValueError(
            f"moments over no values: axes {list(axes)} of x with shape {x.shape} are empty"
        )
    if x.size == 0:  # then there are no statistics to compute either: kept has a 0
        mean = variance = np.zeros(kept, x.dtype)
    else:
        mean, variance = _moments_keepdims(x, axes)
    if not keepdims:
        mean, variance = mean.squeeze(axis=axes), variance.squeeze(axis=axes)
    return _cast(mean, x.dtype), _cast(variance, x.dtype)


def batch_normalization(x, mean, variance, offset, scale, variance_epsilon, name=None):
    """Normalize ``x`` with given statistics, exactly as ``tf.nn.batch_normalization``.

        inv = 1 / sqrt(variance + variance_epsilon)
        inv = inv * scale                        (if scale is given)
        y   = x * inv + (offset - mean * inv)    (offset = 0 if None)

    Every operation is done in ``x``'s dtype, as TensorFlow does (float16 included: this
    function takes given statistics, so it does not widen them); the result matches
    TensorFlow bit for bit. Statistics and parameters broadcast against ``x`` by NumPy's
    rules (so per-channel (C,) vectors fit NHWC and (N, C) directly, and keepdims
    statistics fit any layout). ``mean``, ``variance`` and ``variance_epsilon`` are
    required; ``offset`` and ``scale`` may be None.
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
        if v is None and k in ("mean", "variance"):
            raise TypeError(
                f"{k} is required (an array that broadcasts against x of shape "
                f"{x.shape}), got None"
            )
        if v is not None:
            _check_float(np.asarray(v), k)
    variance_epsilon = _check_number(variance_epsilon, "variance_epsilon")
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
    mask: np.ndarray | None = None  # statistics' positions: x's shape, 1 on the channel axis
    act: str = "identity"  # the activation fused after BN ("relu": BatchNormAct2d)
    beta: np.ndarray | None = None  # (C,), for the activation's gradient


def _prepare(x, gamma, beta, axis):
    x = np.asarray(x)
    _check_float(x)
    axis, reduce_axes, bshape = _channel_axes(x, axis)
    C = x.shape[axis]
    cdt = _compute_dtype(x.dtype)
    gamma = _check_channel_vector(gamma, "gamma (weight)", C, cdt)
    beta = _check_channel_vector(beta, "beta (bias)", C, cdt)
    return x, axis, reduce_axes, bshape, C, cdt, gamma, beta


def _kernels(backend: str, x: np.ndarray):
    """The fast kernel module for ``x`` (compute dtype), or None for the NumPy reference.

    Empty tensors (zero channels) take the reference: there is nothing to be fast at.
    """
    fast = kernels.resolve(backend, x.dtype)
    return None if x.size == 0 else fast


def _normalize(xc, mean, inv_std, bshape):
    """x_hat = (x - mean) * inv_std in xc's precision; the mean is subtracted first, so a
    large common offset cancels exactly instead of in ``x * inv_std - mean * inv_std``."""
    return (xc - mean.reshape(bshape)) * inv_std.reshape(bshape)


def _affine(x_hat, gamma, beta, bshape):
    y = x_hat if gamma is None else x_hat * gamma.reshape(bshape)
    return y if beta is None else y + beta.reshape(bshape)


def _check_mask(mask, x: np.ndarray, axis: int) -> np.ndarray:
    """``mask`` (x's shape without the channel axis, booleans with a True somewhere) as a
    boolean array broadcastable against x (length 1 on the channel axis)."""
    want = x.shape[:axis] + x.shape[axis + 1 :]
    mask = np.asarray(mask)
    if mask.shape != want:
        raise ValueError(
            f"mask must have x's shape without the channel axis {want}, got {mask.shape}"
        )
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be boolean (True: counts in the statistics), got {mask.dtype}")
    if not mask.any():
        raise ValueError("mask has no True entry: there is nothing to take statistics over")
    return np.expand_dims(mask, axis)


def _masked_forward(x, gamma, beta, eps, axis, mask):
    """:func:`batch_norm_forward` with statistics over the positions where ``mask`` holds."""
    x, axis, reduce_axes, bshape, C, cdt, gamma, beta = _prepare(x, gamma, beta, axis)
    eps = _check_number(eps, "eps", 0.0)
    mask = _check_mask(mask, x, axis)
    m = int(mask.sum())
    if m <= 1:
        raise ValueError(f"expected more than 1 unmasked value per channel when training, got {m}")
    xc = x.astype(cdt, copy=False)
    acc = _accumulator(cdt)
    w = mask.astype(acc)
    mean = (xc * w).sum(axis=reduce_axes, dtype=acc) / m  # (C,)
    var = (np.square(xc - mean.reshape(bshape), dtype=acc) * w).sum(axis=reduce_axes) / m
    inv_std = inv_std_of(var, eps, var.dtype)
    mean, var, inv_std = (_cast(v, cdt) for v in (mean, var, inv_std))
    _check_finite_stats(np.where(mask, x, 0), mean, var)
    y = _affine(_normalize(xc, mean, inv_std, bshape), gamma, beta, bshape)  # everywhere
    g = np.ones(C, cdt) if gamma is None else gamma
    cache = BNCache(xc, mean, inv_std, g, axis, True, x.dtype, var, mask)
    return y.astype(x.dtype, copy=False), cache


ACTS = ("identity", "relu")


def _check_act(act: str) -> bool:
    """True for ReLU; a ValueError for an activation bnlab does not fuse."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return act == "relu"


def _activate(y, relu: bool):
    return np.maximum(y, 0, out=y) if relu else y  # NaN stays NaN


def batch_norm_forward(
    x,
    gamma,
    beta,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str = "auto",
    mask=None,
    act: str = "identity",
):
    """Training-mode batch normalization with batch statistics: Algorithm 1 of the paper.

        mu      = mean(x)                  over every axis except ``axis``   (C,)
        var     = mean((x - mu)^2)         biased                            (C,)
        x_hat   = (x - mu) / sqrt(var + eps)
        y       = gamma * x_hat + beta

    mu, var and 1/sqrt(var + eps) are computed in float64 (see the module docstring) and
    rounded once to the compute dtype; x_hat and y are computed in the compute dtype.

    Args:
        x: input, e.g. (N, C), (N, C, L), (N, C, H, W) or NHWC with ``axis=-1``.
        gamma: (C,) scale, or None for 1.
        beta: (C,) shift, or None for 0.
        eps: added to the variance, a number >= 0; default 1e-5.
        axis: the channel axis; default 1 (see the module docstring).
        backend: "auto" (fused kernels when numba is available and the dtype is one they
            take), "numpy" (this reference) or "numba"; see :mod:`bnlab.kernels`.
        mask: None, or booleans of x's shape without the channel axis (e.g. (N, L) for
            padded sequences (N, C, L)): mu and var are taken only over the True positions
            (m = their count), y is computed everywhere with them (Flax/Keras ``mask``).
            The NumPy reference computes it.
        act: "identity" (default) or "relu": ``y = relu(gamma * x_hat + beta)``, in the same
            pass with the kernels (timm's BatchNormAct2d).

    Returns:
        ``(y, cache)``: ``y`` like ``x`` (same dtype), ``cache`` a :class:`BNCache` for
        :func:`batch_norm_backward`; ``cache.mean`` and ``cache.var`` are the batch statistics.

    Raises:
        ValueError: at most one value per channel (``m <= 1``), or gamma/beta not (C,), or a
            mask of the wrong shape or without a True entry.
        FloatingPointError: the input holds NaN or inf, or its variance is beyond the
            compute dtype's range.
    """
    relu = _check_act(act)
    if mask is not None:
        if relu:
            raise ValueError("mask= and act= together are not supported")
        return _masked_forward(x, gamma, beta, eps, axis, mask)
    x, axis, reduce_axes, bshape, C, cdt, gamma, beta = _prepare(x, gamma, beta, axis)
    eps = _check_number(eps, "eps", 0.0)
    m = _count(x.shape, reduce_axes)
    if m <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of size {x.shape}"
        )
    xc = x.astype(cdt, copy=False)
    fast = _kernels(backend, xc)
    if fast is not None:
        y, mean, var, inv_std = fast.train_forward(
            xc, gamma, beta, eps, axis, act=act
        )  # float64 stats
        if not np.isfinite(var).all() and np.isfinite(x).all():
            fast = None  # the kernels' float64 sums overflowed; the reference rescales
    if fast is None:
        mean, var = (s.reshape(C) for s in _moments_keepdims(xc, reduce_axes))  # (C,), biased
        inv_std = inv_std_of(var, eps, var.dtype)  # (C,)
    mean, var, inv_std = (_cast(v, cdt) for v in (mean, var, inv_std))  # compute dtype
    _check_finite_stats(x, mean, var)
    if fast is None:
        y = _activate(_affine(_normalize(xc, mean, inv_std, bshape), gamma, beta, bshape), relu)
    g = np.ones(C, cdt) if gamma is None else gamma
    cache = BNCache(xc, mean, inv_std, g, axis, True, x.dtype, var, act=act, beta=beta)
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
    With a mask (statistics over its m True positions), positions outside it get the second
    formula and those inside the first (dbeta, dgamma still summed over every position).
    The sums are accumulated in float64, like the statistics.

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
    cdt = x.dtype
    fast = None if cache.mask is not None else _kernels(backend, x)
    if fast is not None:
        dx, dgamma, dbeta = fast.backward(
            dy,
            x,
            cache.mean,
            cache.inv_std,
            cache.gamma,
            cache.axis,
            cache.batch_stats,
            beta=cache.beta,
            act=cache.act,
        )
        return dx.astype(cache.out_dtype, copy=False), _cast(dgamma, cdt), _cast(dbeta, cdt)
    _, reduce_axes, bshape = _channel_axes(x, cache.axis)
    acc = _accumulator(cdt)
    dyc = dy.astype(cdt, copy=False)
    x_hat = _normalize(x, cache.mean, cache.inv_std, bshape)  # like x
    if cache.act == "relu":  # through the ReLU: dy where its input was positive
        z = _affine(x_hat, cache.gamma, cache.beta, bshape)
        dyc = np.where(z > 0, dyc, 0).astype(cdt, copy=False)
    dbeta = _cast(dyc.sum(axis=reduce_axes, dtype=acc), cdt)  # (C,)
    dgamma = _cast((dyc * x_hat).sum(axis=reduce_axes, dtype=acc), cdt)  # (C,)
    scale = cache.gamma.reshape(bshape) * cache.inv_std.reshape(bshape)  # (1, C, 1, 1)
    if cache.mask is not None:  # the statistics saw only the masked positions
        m = int(cache.mask.sum())
        through_stats = (scale / m) * (dbeta.reshape(bshape) + x_hat * dgamma.reshape(bshape))
        dx = scale * dyc - np.where(cache.mask, through_stats, 0)
    elif cache.batch_stats:
        m = _count(x.shape, reduce_axes)
        dx = (scale / m) * (m * dyc - dbeta.reshape(bshape) - x_hat * dgamma.reshape(bshape))
    else:
        dx = scale * dyc
    return dx.astype(cache.out_dtype, copy=False), dgamma, dbeta


def batch_norm_inference(
    x,
    mean,
    var,
    gamma,
    beta,
    eps: float = 1e-5,
    axis: int = 1,
    backend: str = "auto",
    act: str = "identity",
):
    """Evaluation-mode batch normalization with fixed statistics, and its cache.

        y = gamma * (x - mean) / sqrt(var + eps) + beta     (then ReLU with ``act="relu"``)

    Shapes and conventions as :func:`batch_norm_forward`; ``mean`` and ``var`` are (C,)
    (typically ``running_mean`` and ``running_var``). Each sample is normalized on its own,
    so the output of one sample does not depend on the rest of the batch.
    """
    x, axis, _, bshape, C, cdt, gamma, beta = _prepare(x, gamma, beta, axis)
    eps = _check_number(eps, "eps", 0.0)
    mean = _check_channel_vector(mean, "running_mean", C, cdt)
    var = _check_channel_vector(var, "running_var", C, cdt)
    inv_std = inv_std_of(var, eps, cdt)  # (C,)
    relu = _check_act(act)
    xc = x.astype(cdt, copy=False)
    fast = _kernels(backend, xc)
    if fast is not None:
        y = fast.inference(xc, mean, inv_std, gamma, beta, axis, act=act)
    else:
        y = _activate(_affine(_normalize(xc, mean, inv_std, bshape), gamma, beta, bshape), relu)
    g = np.ones(C, cdt) if gamma is None else gamma
    cache = BNCache(xc, mean, inv_std, g, axis, False, x.dtype, act=act, beta=beta)
    return y.astype(x.dtype, copy=False), cache


def inv_std_of(var, eps: float, dtype) -> np.ndarray:
    """``1 / sqrt(var + eps)``, computed in float64 (or wider) and rounded once to ``dtype``."""
    var = np.asarray(var)
    return _cast(1.0 / np.sqrt(var.astype(_accumulator(var.dtype)) + eps), np.dtype(dtype))


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


def fold_batchnorm_params(weight, bias, running_mean, running_var, gamma, beta, eps: float):
    """The weight and bias of a layer ``z = W x + b`` (Linear, or a convolution with output
    channels on W's axis 0) followed by evaluation-mode BN, as one layer:

        s = gamma / sqrt(running_var + eps)          (C,)
        W' = W * s  (along W's axis 0),   b' = (b - running_mean) * s + beta

    ``bias``, ``gamma``, ``beta`` may be None (0, 1, 0). Computed in float64, returned in
    W's dtype.
    """
    dt = np.asarray(weight).dtype
    var = np.asarray(running_var, np.float64)
    s = (1.0 if gamma is None else np.asarray(gamma, np.float64)) / np.sqrt(var + eps)
    s = np.broadcast_to(s, var.shape)
    w = np.asarray(weight, np.float64) * s.reshape((-1,) + (1,) * (np.ndim(weight) - 1))
    b = 0.0 if bias is None else np.asarray(bias, np.float64)
    b = (b - np.asarray(running_mean, np.float64)) * s + (
        0.0 if beta is None else np.asarray(beta, np.float64)
    )
    return w.astype(dt), b.astype(dt)


def renorm_correction(mean, var, eps: float, renorm_mean, renorm_std, rmax: float, dmax: float):
    """Batch renormalization's corrections (Ioffe 2017, as Keras 2 computes them) from the
    batch statistics and the renorm averages *before* this batch's update:

        sigma_B = sqrt(var + eps)                      (var: the biased batch variance)
        sigma   = max(renorm_std, sqrt(eps))
        r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mean - renorm_mean) / sigma, -dmax, dmax)

    Returns float64 (C,) r, d and sigma_B. r and d are constants for the gradient.
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    sigma_b = np.sqrt(var + eps)
    sigma = np.maximum(np.asarray(renorm_std, np.float64), np.sqrt(eps))
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mean - np.asarray(renorm_mean, np.float64)) / sigma, -dmax, dmax)
    return r, d, sigma_b


def update_renorm_stats(renorm_mean, renorm_std, mean, sigma_b, momentum: float) -> None:
    """In place: ``renorm = (1 - momentum) * renorm + momentum * batch`` for the batch mean
    and sigma_B (PyTorch's momentum convention: Keras's ``renorm_momentum=0.99`` is 0.01;
    no debiasing, as Keras 2)."""
    renorm_mean *= 1.0 - momentum
    renorm_mean += momentum * np.asarray(mean).astype(renorm_mean.dtype, copy=False)
    renorm_std *= 1.0 - momentum
    renorm_std += momentum * np.asarray(sigma_b).astype(renorm_std.dtype, copy=False)


@dataclass
class RenormCache:
    """What :func:`batch_renorm_backward` needs: the plain BN cache (gamma 1: its y is
    x_hat), r and d (C,), and gamma (C,)."""

    bn: BNCache
    r: np.ndarray
    d: np.ndarray
    gamma: np.ndarray


def batch_renorm_forward(
    x,
    gamma,
    beta,
    eps: float,
    axis: int,
    renorm_mean,
    renorm_std,
    rmax: float,
    dmax: float,
    backend: str = "auto",
):
    """Batch renormalization in training (Ioffe 2017):

        x_hat = (x - mu_B) / sigma_B          (:func:`batch_norm_forward`, batch statistics)
        y     = gamma * (x_hat * r + d) + beta   (r, d: :func:`renorm_correction`)

    Returns ``(y, cache)`` (a :class:`RenormCache`; ``cache.bn.mean``/``.var`` are the batch
    statistics, for the running and renorm averages). The averages are not updated here.
    """
    x_hat, cache = batch_norm_forward(x, None, None, eps, axis, backend)
    C = cache.mean.shape[0]
    r, d, _ = renorm_correction(cache.mean, cache.var, eps, renorm_mean, renorm_std, rmax, dmax)
    cdt = cache.x.dtype
    g = np.ones(C, cdt) if gamma is None else np.asarray(gamma, cdt)
    _, _, bshape = _channel_axes(cache.x, cache.axis)
    b = 0 if beta is None else np.asarray(beta, cdt).reshape(bshape)
    y = (
        g.reshape(bshape)
        * (
            x_hat.astype(cdt, copy=False) * _cast(r, cdt).reshape(bshape)
            + _cast(d, cdt).reshape(bshape)
        )
        + b
    )
    return y.astype(cache.out_dtype, copy=False), RenormCache(cache, r, d, g)


def batch_renorm_backward(dy, cache: RenormCache, backend: str = "auto"):
    """dx, dgamma, dbeta of :func:`batch_renorm_forward` (r and d constant):

    dx     = BN's dx with gamma * r in place of gamma
    dgamma = sum(dy * (x_hat * r + d)),   dbeta = sum(dy)
    """
    dy = np.asarray(dy)
    bn = cache.bn
    _, reduce_axes, bshape = _channel_axes(bn.x, bn.axis)
    cdt = bn.x.dtype
    scale = (cache.gamma * cache.r).astype(cdt).reshape(bshape)
    dx, _, _ = batch_norm_backward(dy.astype(cdt, copy=False) * scale, bn, backend)
    acc = _accumulator(cdt)
    dyc = dy.astype(cdt, copy=False)
    dbeta = dyc.sum(axis=reduce_axes, dtype=acc)
    x_hat = _normalize(bn.x, bn.mean, bn.inv_std, bshape)
    dgamma = (dyc * x_hat).sum(axis=reduce_axes, dtype=acc) * cache.r + dbeta * cache.d
    return dx.astype(bn.out_dtype, copy=False), _cast(dgamma, cdt), _cast(dbeta, cdt)


def check_virtual_batch_size(v) -> int:
    """``v`` as an int, or a ValueError: a virtual batch size is a positive integer."""
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"virtual_batch_size must be a positive integer, got {v!r}")
    return int(v)


def ghost_batch_norm_forward(
    x,
    gamma,
    beta,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    axis: int = 1,
    backend: str = "auto",
):
    """Ghost batch normalization (Hoffer et al. 2017; Keras's ``virtual_batch_size``): the
    batch is cut along axis 0 into virtual batches ``[k*v, (k+1)*v)`` of ``v`` samples,
    each normalized by :func:`batch_norm_forward` with its own statistics.

    Returns ``(y, caches)``: y like x, one :class:`BNCache` per virtual batch. A batch size
    that is not a multiple of ``v`` is a ValueError naming both numbers.
    """
    x = np.asarray(x)
    v = check_virtual_batch_size(virtual_batch_size)
    if x.ndim < 2 or x.shape[0] % v:
        raise ValueError(
            f"the batch size must be a multiple of virtual_batch_size={v}, got a "
            f"batch of {x.shape[0] if x.ndim else 0} (input shape {x.shape})"
        )
    ys, caches = [], []
    for k in range(x.shape[0] // v):
        y, cache = batch_norm_forward(x[k * v : (k + 1) * v], gamma, beta, eps, axis, backend)
        ys.append(y)
        caches.append(cache)
    return np.concatenate(ys), caches


def ghost_batch_norm_backward(dy, caches, backend: str = "auto"):
    """dx, dgamma, dbeta of :func:`ghost_batch_norm_forward`: each virtual batch's
    :func:`batch_norm_backward`, parameter gradients summed."""
    dy = np.asarray(dy)
    v = caches[0].x.shape[0]
    if dy.shape[0] != v * len(caches):
        raise ValueError(f"dy has {dy.shape[0]} samples, expected {v * len(caches)}")
    parts = [
        batch_norm_backward(dy[k * v : (k + 1) * v], c, backend) for k, c in enumerate(caches)
    ]
    return (
        np.concatenate([p[0] for p in parts]),
        sum(p[1] for p in parts),
        sum(p[2] for p in parts),
    )


def ghost_statistics(caches):
    """The running-statistics update's inputs for ghost BN: the average of the virtual
    batches' means and (biased) variances, and the count per virtual batch. With
    :func:`update_running_stats` that averages the unbiased variances (equal counts)."""
    mean = np.mean([c.mean for c in caches], axis=0)
    var = np.mean([c.var for c in caches], axis=0)
    return mean, var, caches[0].x.size // caches[0].mean.size


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
            In training they are updated in place, so they must be writeable NumPy arrays.
        weight, bias: (C,) gamma and beta, or None.
        training: use batch statistics; default False.
        momentum: weight of the new batch, in [0, 1]; default 0.1 (Keras 0.99 is 0.01
            here). The layers' ``momentum=None`` (a cumulative average) is theirs alone:
            it needs the count of batches seen, which a function does not keep; pass
            ``momentum=1 / num_batches_tracked`` for the same update.
        eps: default 1e-5.
        backend: as in :func:`batch_norm_forward`.

    Returns:
        ``y`` like ``x``.
    """
    if training:
        if momentum is None:
            raise TypeError(
                "momentum=None (a cumulative average) needs the number of batches seen, which "
                "the functional form does not keep: pass momentum=1/num_batches_tracked (what "
                "nn.BatchNorm1d/2d(momentum=None) do), or use those layers"
            )
        momentum = _check_number(momentum, "momentum", 0.0)
        if momentum > 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        x = np.asarray(x)
        channel, reduce_axes, _ = _channel_axes(x, axis)
        for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
            _check_running_buffer(buf, name, x.shape[channel])
        y, cache = batch_norm_forward(x, weight, bias, eps=eps, axis=axis, backend=backend)
        update_running_stats(
            running_mean,
            running_var,
            cache.mean,
            cache.var,
            _count(x.shape, reduce_axes),
            momentum,
        )
        return y
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    y, _ = batch_norm_inference(
        x, running_mean, running_var, weight, bias, eps=eps, axis=axis, backend=backend
    )
    return y


def standardize(x, axis=None, eps: float = 0.0):
    """z-score: ``(x - mean) / sqrt(var + eps)`` with the biased variance.

    The statistics are accumulated in float64, as everywhere in bnlab (see the module
    docstring); the subtraction and scaling are done in the compute dtype.

    Args:
        x: floating-point array.
        axis: axis or axes to take mean and variance over; None (default) for all of ``x``.
            ``axis=0`` on (N, D) standardizes each feature over the samples.
        eps: a number >= 0, default 0.0 (pure z-score: a constant feature gives 0/0 = NaN,
            with NumPy's warning); add a small value to map constant features to 0.

    Returns:
        Array like ``x``: zero mean and unit variance over ``axis``.
    """
    x = np.asarray(x)
    _check_float(x)
    axes = tuple(range(x.ndim)) if axis is None else _normalize_axes(axis, x.ndim)
    eps = _check_number(eps, "eps", 0.0)
    if x.size == 0:
        return x.copy()
    cdt = _compute_dtype(x.dtype)
    mean, var = _moments_keepdims(x, axes)  # keepdims, float64
    with np.errstate(divide="ignore"):  # eps = 0, constant: 0 * inf
        inv_std = 1.0 / np.sqrt(var + eps)
    z = _normalize(x.astype(cdt, copy=False), _cast(mean, cdt), _cast(inv_std, cdt), mean.shape)
    return z.astype(x.dtype, copy=False)


def minmax_scale(x, axis=None, feature_range=(0, 1)):
    """Min-max scaling, the other usual preprocessing beside the z-score (:func:`standardize`):

        y = (x - min) / (max - min) * (hi - lo) + lo        over ``axis``

    A constant slice (max == min) maps to ``lo``, as scikit-learn's ``MinMaxScaler`` does (it
    treats a zero range as 1). Unlike the z-score, the result depends on the two extreme
    values only, so a single outlier squeezes everything else.

    Args:
        x: floating-point array, finite (NaN/inf are a ValueError: scikit-learn would skip
            NaN as missing values, which bnlab does not guess).
        axis: axis or axes to take min and max over; None (default) for all of ``x``.
            ``axis=0`` on (N, D) scales each feature over the samples (``MinMaxScaler``).
        feature_range: ``(lo, hi)`` with lo < hi; default (0, 1).

    Returns:
        Array like ``x``, in [lo, hi] over ``axis``.
    """
    x = np.asarray(x)
    _check_float(x)
    lo, hi = (float(v) for v in feature_range)
    if not lo < hi:
        raise ValueError(f"feature_range must be (lo, hi) with lo < hi, got {feature_range!r}")
    axes = tuple(range(x.ndim)) if axis is None else _normalize_axes(axis, x.ndim)
    if x.size == 0:
        return x.copy()
    if not np.isfinite(x).all():
        raise ValueError("minmax_scale takes finite values; x holds NaN or inf")
    acc = _accumulator(x.dtype)
    xmin = x.min(axis=axes, keepdims=True).astype(acc)
    span = x.max(axis=axes, keepdims=True).astype(acc) - xmin
    span = np.where(span == 0, 1.0, span)  # constant: maps to lo
    y = (x.astype(acc) - xmin) * ((hi - lo) / span) + lo
    return y.astype(x.dtype)
