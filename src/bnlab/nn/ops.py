"""Forward/backward pairs for the layers around BN: pure NumPy functions.

Each ``*_forward`` returns ``(y, cache)`` and its ``*_backward(dy, cache)`` returns the
input gradient (and parameter gradients), written next to each other so one can be read
against the other. Layout is NCHW throughout.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# --- Linear: y = x W^T + b ---------------------------------------------------------------


def linear_forward(x, weight, bias):
    """y = x @ W^T + b.  x: (N, in), W: (out, in), b: (out,) or None -> y: (N, out)."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y, (x, weight)


def linear_backward(dy, cache):
    """dx = dy W, dW = dy^T x, db = sum_n dy."""
    x, weight = cache
    return dy @ weight, dy.T @ x, dy.sum(axis=0)


# --- Conv2d by im2col + one GEMM -----------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _im2col(xp, kh, kw, stride):
    """Padded (N, C, Hp, Wp) -> columns (N*Ho*Wo, C*kh*kw): one row per output pixel."""
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[
        :, :, ::stride, ::stride
    ]  # (N,C,Ho,Wo,kh,kw)
    N, C, Ho, Wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C * kh * kw), Ho, Wo


def conv2d_forward(x, weight, bias, stride: int = 1, padding: int = 0):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

        y[n, o, i, j] = b[o] + sum_{c, p, q} W[o, c, p, q] * x_pad[n, c, i*s + p, j*s + q]

    x: (N, C, H, W), W: (O, C, kh, kw), b: (O,) or None -> y: (N, O, Ho, Wo) with
    Ho = (H + 2*padding - kh) // stride + 1.
    """
    N, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding))) if padding else x
    cols, Ho, Wo = _im2col(xp, kh, kw, stride)  # (N*Ho*Wo, C*kh*kw)
    y = cols @ weight.reshape(O, -1).T  # (N*Ho*Wo, O)
    if bias is not None:
        y += bias
    y = y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2)  # (N, O, Ho, Wo)
    return np.ascontiguousarray(y), (cols, x.shape, weight, stride, padding)


def conv2d_backward(dy, cache):
    """dW = dy_mat^T cols, db = sum dy, dx = col2im(dy_mat W_mat) (overlaps summed)."""
    cols, (N, C, H, W), weight, stride, padding = cache
    O, _, kh, kw = weight.shape
    Ho, Wo = dy.shape[2:]
    dy_mat = dy.transpose(0, 2, 3, 1).reshape(-1, O)  # (N*Ho*Wo, O)
    dweight = (dy_mat.T @ cols).reshape(weight.shape)
    dbias = dy_mat.sum(axis=0)
    dcols = (dy_mat @ weight.reshape(O, -1)).reshape(N, Ho, Wo, C, kh, kw)
    dxp = np.zeros((N, C, H + 2 * padding, W + 2 * padding), dtype=dy.dtype)
    for p in range(kh):  # col2im: kh*kw strided adds
        for q in range(kw):
            dxp[:, :, p : p + stride * Ho : stride, q : q + stride * Wo : stride] += dcols[
                :, :, :, :, p, q
            ].transpose(0, 3, 1, 2)
    dx = dxp[:, :, padding : padding + H, padding : padding + W] if padding else dxp
    return dx, dweight, dbias


# --- MaxPool2d ------------------------------------------------------------------------------


def maxpool2d_forward(x, kernel_size: int, stride: int):
    """y[n, c, i, j] = max over the k x k window at (i*s, j*s); floor mode, no padding.

    x: (N, C, H, W) -> y: (N, C, Ho, Wo), Ho = (H - k) // s + 1. The cache keeps the
    position of the first maximum of each window (PyTorch's tie rule).
    """
    k, s = kernel_size, stride
    win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]  # (N, C, Ho, Wo, k, k)
    flat = win.reshape(win.shape[:4] + (k * k,))
    arg = flat.argmax(axis=-1)  # (N, C, Ho, Wo)
    y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    return y, (arg, x.shape, k, s)


def maxpool2d_backward(dy, cache):
    """Each window's gradient goes to its (first) maximum; overlapping windows add up."""
    arg, shape, k, s = cache
    N, C, Ho, Wo = arg.shape
    rows = np.arange(Ho)[:, None] * s + arg // k  # (N, C, Ho, Wo)
    cols = np.arange(Wo)[None, :] * s + arg % k
    n = np.arange(N)[:, None, None, None]
    c = np.arange(C)[None, :, None, None]
    dx = np.zeros(shape, dtype=dy.dtype)
    if s >= k:  # windows do not overlap: each input receives from at most one window
        dx[n, c, rows, cols] = dy
    else:
        np.add.at(dx, (n, c, rows, cols), dy)
    return dx


# --- elementwise activations -------------------------------------------------------------


def relu_forward(x):
    """y = max(x, 0)."""
    return np.maximum(x, 0), x > 0


def relu_backward(dy, mask):
    """dx = dy where x > 0, else 0."""
    return dy * mask


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), computed without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    y = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
    return y, y


def sigmoid_backward(dy, y):
    """dx = dy * y * (1 - y)."""
    return dy * y * (1 - y)


# --- softmax cross-entropy ---------------------------------------------------------------


def cross_entropy_forward(logits, labels):
    """loss = mean_n [ logsumexp(z_n) - z_n[label_n] ].  logits (N, K), labels (N,) ints."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log-softmax (N, K)
    N = logits.shape[0]
    loss = -log_p[np.arange(N), labels].mean()
    return loss, (log_p, labels)


def cross_entropy_backward(cache):
    """dloss/dlogits = (softmax(z) - onehot(label)) / N."""
    log_p, labels = cache
    N = log_p.shape[0]
    d = np.exp(log_p)
    d[np.arange(N), labels] -= 1
    return d / N
