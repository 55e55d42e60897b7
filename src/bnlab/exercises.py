"""The lesson's graded exercises: run a learner's batch norm against bnlab's, say what is wrong.

Every check calls the learner's code on several inputs (shapes, dtypes, one channel, a large
common offset, a large eps), compares with :mod:`bnlab.functional`, and returns a
:class:`Feedback`. When something differs it names the *first* wrong thing: which step of
the forward (mean, variance, biased or unbiased, where eps goes, normalization, gamma and
beta, the axis) or which gradient (dx, dgamma, dbeta) and by how much, with a hint, never
the solution. It recognises a mistake by recomputing the learner's output under that
mistake (the variance divided by m - 1, eps outside the square root, ...) and finding the
learner's numbers there; what it cannot name, it still locates. An exception in the
learner's code becomes feedback, not a traceback. A correct implementation passes however
it is written (closed form or step by step, two-pass or Welford, in the input's dtype or in
float64).

    from bnlab.exercises import check_forward, check_backward
    print(check_forward(batchnorm_forward))            # Feedback: passed, or what to fix
    print(check_backward(batchnorm_forward, batchnorm_backward))

Exercises (the notebooks under ``notebooks/``):

* ``batchnorm_forward(x, gamma, beta, eps) -> (out, cache)`` on (N, D): :func:`check_forward`
  (``layout="NHWC"``: images (N, H, W, C), statistics over N, H and W);
* ``batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta)``: :func:`check_backward`;
* ``batchnorm_step(x, gamma, beta, running_mean, running_var, training, momentum, eps) ->
  (out, running_mean, running_var)``, train and eval with the running averages:
  :func:`check_train_eval`;
* a PyTorch ``torch.autograd.Function`` with ``apply(x, gamma, beta, eps)``:
  :func:`check_function`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import functional as F

__all__ = ["Feedback", "check_backward", "check_forward", "check_function", "check_train_eval"]


@dataclass
class Feedback:
    """A check's verdict: ``passed``, and ``message`` (also ``str(feedback)``): what was
    checked, or the first wrong thing with a hint. ``details``: the numbers behind it."""

    passed: bool
    message: str
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def __bool__(self) -> bool:
        return self.passed


# --- inputs ------------------------------------------------------------------------------------


@dataclass
class _Case:
    name: str
    x: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float


def _cases(layout: str = "NC") -> list[_Case]:
    """The inputs every check runs, the telling ones first (a mistake shows clearly there)."""
    rng = np.random.default_rng(2015)

    def make(name, shape, dtype=np.float64, offset=0.0, scale=1.0, eps=1e-5):
        C = shape[-1]
        x = offset + scale * rng.standard_normal(shape)
        return _Case(
            name,
            x.astype(dtype),
            (0.5 + rng.random(C)).astype(dtype),
            rng.standard_normal(C).astype(dtype),
            eps,
        )

    if layout == "NHWC":
        return [
            make("images (4, 3, 5, 2)", (4, 3, 5, 2)),
            make("images (2, 4, 4, 6), eps = 0.5", (2, 4, 4, 6), eps=0.5),
            make("images (3, 2, 2, 3) in float32", (3, 2, 2, 3), np.float32),
        ]
    return [
        make("a batch (8, 5)", (8, 5), scale=2.0, offset=0.5),
        make("a small batch (3, 4), eps = 0.5", (3, 4), eps=0.5),
        make("one channel (6, 1)", (6, 1)),
        make("a large common offset (16, 3): x = 1e6 + noise", (16, 3), offset=1e6),
        make("float32 input (10, 4)", (10, 4), np.float32),
    ]


def _axes(x: np.ndarray) -> tuple[int, ...]:
    """The batch (and spatial) axes: every axis but the last, the channels."""
    return tuple(range(x.ndim - 1))


def _reference_forward(c: _Case) -> tuple[np.ndarray, F.BNCache]:
    y, cache = F.batch_norm_forward(c.x, c.gamma, c.beta, c.eps, axis=-1)
    return y, cache


def _tolerance(dtype) -> float:
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-8


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|b|, 1): the size of an error relative to the values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if b.size else 0.0


def _close(a, b, dtype) -> bool:
    a = np.asarray(a)
    return (
        a.shape == np.shape(b)
        and bool(np.all(np.isfinite(a)))
        and _rel_error(a, b) <= _tolerance(dtype)
    )


def _call(what: str, fn: Callable, *args):
    """(result, None), or (None, Feedback) for an exception in the learner's code."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - the learner's exception becomes feedback
        where = traceback.extract_tb(e.__traceback__)[-1]
        return None, Feedback(
            False,
            f"{what} raised {type(e).__name__}: {e} (line {where.lineno}: "
            f"{(where.line or '').strip()!r}). Hint: run it on a small array of your own "
            f"and print the shapes of each step.",
            {"exception": repr(e)},
        )


# --- the forward's mistakes ----------------------------------------------------------------


def _stats(x, axes, ddof=0):
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    return mean, xd.var(axis=axes, ddof=ddof, keepdims=True)


def _forward_mistakes(c: _Case) -> list[tuple[str, np.ndarray]]:
    """(what the learner got wrong, the output that mistake gives), the common ones."""
    x, g, b, eps = c.x.astype(np.float64), c.gamma, c.beta, c.eps
    axes = _axes(x)
    mean, var = _stats(x, axes)
    m = int(np.prod([x.shape[a] for a in axes]))
    out = []
    if m > 1:
        _, uvar = _stats(x, axes, ddof=1)
        out.append(
            (
                "variance: you used the unbiased variance (dividing by m - 1). BN normalizes "
                "with the biased variance of the batch, dividing by m; the unbiased one is only "
                "for the running average. Hint: np.var's default, or mean((x - mu)**2).",
                (x - mean) / np.sqrt(uvar + eps) * g + b,
            )
        )
    out.append(
        (
            "epsilon: it is added outside the square root. It belongs inside, under the "
            "variance, so the square root never sees 0. Hint: sqrt(var + eps).",
            (x - mean) / (np.sqrt(var) + eps) * g + b,
        )
    )
    out.append(
        (
            "epsilon: it is missing. Hint: it goes under the square root with the variance.",
            (x - mean) / np.sqrt(var) * g + b,
        )
    )
    out.append(
        (
            "epsilon: you divided by the variance plus eps, not by its square root (the "
            "standard deviation).",
            (x - mean) / (var + eps) * g + b,
        )
    )
    if x.ndim == 2 and x.shape[1] > 1:
        fmean, fvar = _stats(x, (1,))
        out.append(
            (
                "mean and variance: taken over the features (axis 1) of each sample. BN takes "
                "them per feature, over the batch: axis 0, one value per column.",
                (x - fmean) / np.sqrt(fvar + eps) * g + b,
            )
        )
    if x.ndim == 4:
        for wrong, text in (
            ((0,), "over the batch axis 0 only"),
            ((1, 2), "over height and width only"),
            ((0, 1, 2, 3), "over every axis, channels included"),
        ):
            wmean, wvar = _stats(x, wrong)
            out.append(
                (
                    f"mean and variance: taken {text}. In NHWC images each channel's statistics "
                    "are over N, H and W: axes (0, 1, 2).",
                    (x - wmean) / np.sqrt(wvar + eps) * g + b,
                )
            )
    x_hat = (x - mean) / np.sqrt(var + eps)
    out.append(
        (
            "scale and shift: gamma and beta are not applied. Hint: y = gamma * x_hat "
            "+ beta, per feature.",
            x_hat,
        )
    )
    out.append(
        ("scale and shift: gamma and beta are swapped. gamma scales, beta shifts.", x_hat * b + g)
    )
    out.append(
        (
            "normalize: the mean is not subtracted. Hint: x_hat = (x - mu) / sqrt(var + eps).",
            x / np.sqrt(var + eps) * g + b,
        )
    )
    return out


def _diagnose(got: np.ndarray, c: _Case, mistakes, want: np.ndarray, what: str) -> Feedback:
    """Name the mistake whose output is the learner's, else say where and by how much."""
    got64 = np.asarray(got, np.float64)
    tol = max(_tolerance(c.x.dtype), 1e-6)
    for message, wrong in mistakes:
        if got64.shape == np.shape(wrong) and _rel_error(got64, wrong) <= tol:
            return Feedback(
                False,
                f"{what} on {c.name}: {message}",
                {"case": c.name, "error": _rel_error(got64, want)},
            )
    err = _rel_error(got64, want)
    if err < 1e-3:
        why = (
            "the variance lost precision to the large common offset. Hint: compute it in "
            "two passes, mean((x - mu)**2), never mean(x**2) - mu**2, which cancels."
            if "offset" in c.name
            else "the formula looks right but precision is lost. Hint: compute in the input's "
            "dtype (or float64), not in a lower precision."
        )
        return Feedback(
            False,
            f"{what} on {c.name}: close but not exact (error {err:.2g}): " + why,
            {"case": c.name, "error": err},
        )
    worst = np.unravel_index(np.argmax(np.abs(got64 - want)), want.shape)
    return Feedback(
        False,
        f"{what} on {c.name}: wrong by up to {err:.3g} (relative), worst at index "
        f"{tuple(int(i) for i in worst)}: {got64[worst]:.6g} instead of {want[worst]:.6g}. "
        "Hint: check each step on this input: the mean and variance per feature (biased), "
        "x_hat = (x - mean) / sqrt(var + eps), then gamma * x_hat + beta.",
        {"case": c.name, "error": err},
    )


def check_forward(fn: Callable, layout: str = "NC") -> Feedback:
    """Grade ``fn(x, gamma, beta, eps) -> (out, cache)``: training-mode batch norm of x,
    statistics per feature (the last axis) over every other axis.

        mu = mean(x), var = mean((x - mu)^2)      per feature, biased
        out = gamma * (x - mu) / sqrt(var + eps) + beta

    Args:
        fn: the learner's forward; ``cache`` is anything (:func:`check_backward` passes it
            back to the learner's backward unread).
        layout: "NC" (default: (N, D) arrays, statistics over axis 0) or "NHWC" (images
            (N, H, W, C), statistics over axes 0, 1, 2).

    Returns:
        A :class:`Feedback`; when it fails, its message names the first wrong step.
    """
    cases = _cases(layout)
    for c in cases:
        result, problem = _call(
            "your forward", fn, c.x.copy(), c.gamma.copy(), c.beta.copy(), c.eps
        )
        if problem is not None:
            return problem
        if not isinstance(result, tuple) or len(result) != 2:
            return Feedback(
                False,
                f"your forward returned {type(result).__name__}; it should "
                "return a pair (out, cache).",
            )
        out = np.asarray(result[0])
        want, _ = _reference_forward(c)
        if out.shape != c.x.shape:
            return Feedback(
                False,
                f"your forward on {c.name} returned out of shape "
                f"{out.shape}, expected x's shape {c.x.shape}. Hint: the "
                "statistics are (D,) vectors that broadcast against x.",
            )
        if not _close(out, want, c.x.dtype):
            return _diagnose(out, c, _forward_mistakes(c), want.astype(np.float64), "your forward")
    return Feedback(
        True,
        f"forward: correct on all {len(cases)} inputs (" + "; ".join(c.name for c in cases) + ").",
    )


# --- the backward's mistakes ---------------------------------------------------------------


def _grads(c: _Case, dy: np.ndarray):
    """dx, dgamma, dbeta of the definition (float64), and the pieces the mistakes reuse."""
    x = c.x.astype(np.float64)
    axes = _axes(x)
    m = int(np.prod([x.shape[a] for a in axes]))
    mean, var = _stats(x, axes)
    inv = 1.0 / np.sqrt(var + c.eps)
    x_hat = (x - mean) * inv
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    g = c.gamma.astype(np.float64)

    def dx(gamma=g, sign_mean=1.0, sign_var=1.0):
        return gamma * inv / m * (m * dy - sign_mean * dbeta - sign_var * x_hat * dgamma)

    return dx, dgamma, dbeta, x_hat, axes


def _backward_feedback(c: _Case, dy: np.ndarray, got) -> Feedback | None:
    """None if the learner's (dx, dgamma, dbeta) are right on this case."""
    dx_of, dgamma, dbeta, x_hat, axes = _grads(c, dy)
    want_dx = dx_of()
    dx, dg, db = (np.asarray(v) for v in got)
    for name, value, want in (("dbeta", db, dbeta), ("dgamma", dg, dgamma)):
        if value.shape != want.shape:
            hint = (
                " It has one value per sample: you summed over the features; sum over "
                "the batch (axis 0) instead."
                if value.shape == (c.x.shape[0],)
                else ""
            )
            return Feedback(
                False,
                f"{name} on {c.name} has shape {value.shape}, expected "
                f"{want.shape} (one per feature).{hint}",
            )
    tol = _tolerance(c.x.dtype)
    if not _close(db, dbeta, c.x.dtype):
        alt = [
            (
                "dbeta: summed over the features of each sample; sum dout over the batch "
                "(axis 0), one value per feature.",
                None,
            )
        ]
        if c.x.ndim == 2 and c.x.shape[0] == c.x.shape[1]:
            alt = [(alt[0][0], dy.sum(axis=1))]
        if _close(db, dbeta / c.x.shape[0], c.x.dtype):
            return Feedback(
                False,
                f"dbeta on {c.name}: you averaged dout over the batch; "
                "beta's gradient is the sum. Hint: d(out)/d(beta) = 1 "
                "for every sample.",
            )
        for message, wrong in alt:
            if wrong is not None and _close(db, wrong, c.x.dtype):
                return Feedback(False, f"dbeta on {c.name}: {message}")
        return Feedback(
            False,
            f"dbeta on {c.name} is wrong by up to {_rel_error(db, dbeta):.3g}"
            " (relative). Hint: beta is added to every sample: its "
            "gradient sums dout over the batch.",
        )
    if not _close(dg, dgamma, c.x.dtype):
        if _close(dg, (dy * c.x.astype(np.float64)).sum(axis=axes), c.x.dtype):
            return Feedback(
                False,
                f"dgamma on {c.name}: you multiplied dout by x; gamma "
                "scales x_hat, so its gradient sums dout * x_hat.",
            )
        return Feedback(
            False,
            f"dgamma on {c.name} is wrong by up to "
            f"{_rel_error(dg, dgamma):.3g} (relative). Hint: sum dout * "
            "x_hat over the batch.",
        )
    if dx.shape != c.x.shape:
        return Feedback(False, f"dx on {c.name} has shape {dx.shape}, expected {c.x.shape}.")
    if _close(dx, want_dx, c.x.dtype):
        return None
    mistakes = [
        (
            "dx: gamma is missing. The output is gamma * x_hat + beta, so every path from x "
            "to out goes through gamma.",
            dx_of(gamma=1.0),
        ),
        (
            "dx: the term through the mean has the wrong sign. Hint: x_hat falls when the "
            "mean rises; recheck d(mu)/d(x) and the sign of dmu's contribution.",
            dx_of(sign_mean=-1.0),
        ),
        (
            "dx: the term through the variance has the wrong sign. Hint: recheck dvar (the "
            "exponent -3/2 brings a minus sign) and its contribution 2 (x - mu) / m.",
            dx_of(sign_var=-1.0),
        ),
        (
            "dx: only the direct path: the mean and the variance depend on x too, in training "
            "(the batch's own statistics).",
            dx_of(sign_mean=0.0, sign_var=0.0),
        ),
    ]
    for message, wrong in mistakes:
        if _rel_error(dx, wrong) <= max(tol, 1e-6):
            return Feedback(False, f"{message} (on {c.name}; dgamma and dbeta are right)")
    return Feedback(
        False,
        f"dx on {c.name} is wrong by up to {_rel_error(dx, want_dx):.3g} "
        "(relative); dgamma and dbeta are right. Hint: check it against a "
        "numerical gradient on this input, one path at a time.",
        {"error": _rel_error(dx, want_dx)},
    )


def check_backward(forward: Callable, backward: Callable) -> Feedback:
    """Grade ``backward(dout, cache) -> (dx, dgamma, dbeta)``, with the learner's own
    ``forward`` making the cache (which the grader never reads). Gradients of training-mode
    batch norm (the statistics depend on x):

        dbeta = sum(dout),  dgamma = sum(dout * x_hat)          over the batch
        dx = gamma / sqrt(var + eps) / m * (m dout - dbeta - x_hat dgamma)

    The forward must pass :func:`check_forward` first (else that feedback comes back).
    """
    first = check_forward(forward)
    if not first.passed:
        return Feedback(False, "fix the forward first: " + first.message)
    rng = np.random.default_rng(1502)
    cases = _cases()
    for c in cases:
        (out, cache), _ = _call(
            "your forward", forward, c.x.copy(), c.gamma.copy(), c.beta.copy(), c.eps
        )
        dy = rng.standard_normal(c.x.shape)
        got, problem = _call("your backward", backward, dy.astype(c.x.dtype), cache)
        if problem is not None:
            return problem
        if not isinstance(got, tuple) or len(got) != 3:
            return Feedback(
                False, "your backward should return three arrays: (dx, dgamma, dbeta)."
            )
        verdict = _backward_feedback(c, dy, got)
        if verdict is not None:
            return verdict
    return Feedback(True, f"backward: dx, dgamma and dbeta correct on all {len(cases)} inputs.")


# --- train and eval, the running averages ------------------------------------------------


def check_train_eval(fn: Callable) -> Feedback:
    """Grade ``fn(x, gamma, beta, running_mean, running_var, training, momentum, eps) ->
    (out, running_mean, running_var)`` (new arrays or the same ones updated): training
    normalizes with the batch's statistics and updates the running averages with PyTorch's
    convention (``momentum`` weighs the new batch; the running variance receives the
    *unbiased* batch variance); evaluation normalizes with the running averages and changes
    nothing."""
    rng = np.random.default_rng(1603)
    N, D, momentum, eps = 12, 4, 0.1, 1e-5
    x = 3.0 + 2.0 * rng.standard_normal((N, D))
    gamma, beta = 0.5 + rng.random(D), rng.standard_normal(D)
    rm, rv = rng.standard_normal(D), 0.5 + rng.random(D)
    mean, var = x.mean(0), x.var(0)
    want_out = (x - mean) / np.sqrt(var + eps) * gamma + beta
    want_rm = (1 - momentum) * rm + momentum * mean
    want_rv = (1 - momentum) * rv + momentum * x.var(0, ddof=1)
    got, problem = _call(
        "your function (training)",
        fn,
        x.copy(),
        gamma,
        beta,
        rm.copy(),
        rv.copy(),
        True,
        momentum,
        eps,
    )
    if problem is not None:
        return problem
    out, new_rm, new_rv = (np.asarray(v, np.float64) for v in got)
    if not _close(out, want_out, np.float64):
        if any(
            _close(out, (x - m_) / np.sqrt(v_ + eps) * gamma + beta, np.float64)
            for m_, v_ in ((rm, rv), (want_rm, want_rv))
        ):  # before or after the update
            return Feedback(
                False,
                "training: you normalized with the running averages. In "
                "training BN normalizes with the batch's own mean and "
                "variance; the running averages are for evaluation.",
            )
        c = _Case("the training batch (12, 4)", x, gamma, beta, eps)
        return _diagnose(out, c, _forward_mistakes(c), want_out, "training")
    if not _close(new_rm, want_rm, np.float64):
        if _close(new_rm, momentum * rm + (1 - momentum) * mean, np.float64):
            return Feedback(
                False,
                "running mean: momentum weighs the old value here (Keras's "
                "convention). In PyTorch's, momentum is the weight of the "
                "new batch: running = (1 - momentum) * running + momentum "
                "* batch.",
            )
        return Feedback(
            False,
            f"running mean: wrong by up to {_rel_error(new_rm, want_rm):.3g}"
            " (relative). Hint: an exponential moving average of the "
            "batch means.",
        )
    if not _close(new_rv, want_rv, np.float64):
        if _close(new_rv, (1 - momentum) * rv + momentum * var, np.float64):
            return Feedback(
                False,
                "running variance: you averaged the biased batch variance. "
                "The running variance estimates the population's, so it "
                "takes the unbiased one: var * m / (m - 1).",
            )
        if _close(new_rv, momentum * rv + (1 - momentum) * x.var(0, ddof=1), np.float64):
            return Feedback(
                False,
                "running variance: momentum weighs the old value (Keras's "
                "convention); in PyTorch's it weighs the new batch.",
            )
        return Feedback(
            False,
            f"running variance: wrong by up to {_rel_error(new_rv, want_rv):.3g} (relative).",
        )
    got, problem = _call(
        "your function (evaluation)",
        fn,
        x.copy(),
        gamma,
        beta,
        want_rm.copy(),
        want_rv.copy(),
        False,
        momentum,
        eps,
    )
    if problem is not None:
        return problem
    out, rm2, rv2 = (np.asarray(v, np.float64) for v in got)
    want_eval = (x - want_rm) / np.sqrt(want_rv + eps) * gamma + beta
    if not _close(out, want_eval, np.float64):
        if _close(out, want_out, np.float64):
            return Feedback(
                False,
                "evaluation: you normalized with the batch's statistics. "
                "In evaluation use the running averages, so a sample's "
                "output does not depend on the rest of the batch.",
            )
        return Feedback(
            False, f"evaluation: wrong by up to {_rel_error(out, want_eval):.3g} (relative)."
        )
    if not (_close(rm2, want_rm, np.float64) and _close(rv2, want_rv, np.float64)):
        return Feedback(
            False, "evaluation: the running averages changed; evaluation only reads them."
        )
    return Feedback(
        True,
        "train and eval: the batch's statistics in training, PyTorch's "
        "running averages (unbiased variance), the running averages in "
        "evaluation: all correct.",
    )


# --- PyTorch --------------------------------------------------------------------------------


def check_function(function) -> Feedback:
    """Grade a ``torch.autograd.Function`` subclass whose ``apply(x, gamma, beta, eps)`` is
    training-mode batch norm of an (N, D) tensor, forward and backward: outputs and
    gradients against torch's own ``torch.nn.functional.batch_norm`` (float64), with the
    same diagnosis as :func:`check_forward` and :func:`check_backward`."""
    import torch

    rng = np.random.default_rng(1704)
    cases = [c for c in _cases() if c.x.dtype == np.float64]
    for c in cases:
        x = torch.tensor(c.x, requires_grad=True)
        g = torch.tensor(c.gamma, requires_grad=True)
        b = torch.tensor(c.beta, requires_grad=True)
        out, problem = _call("your Function's forward", function.apply, x, g, b, c.eps)
        if problem is not None:
            return problem
        want = torch.nn.functional.batch_norm(
            x.detach(), None, None, g.detach(), b.detach(), True, 0.0, c.eps
        ).numpy()
        got = out.detach().numpy()
        if not _close(got, want, np.float64):
            return _diagnose(got, c, _forward_mistakes(c), want, "your Function's forward")
        dy = rng.standard_normal(c.x.shape)
        grads, problem = _call(
            "your Function's backward",
            lambda out=out, wrt=(x, g, b), dy=dy: torch.autograd.grad(
                out, wrt, torch.tensor(dy), allow_unused=True
            ),
        )
        if problem is not None:
            return problem
        if any(v is None for v in grads):
            return Feedback(
                False,
                "your Function's backward returned None for x, gamma or "
                "beta: return a gradient for each (and None for eps).",
            )
        verdict = _backward_feedback(c, dy, tuple(v.numpy() for v in grads))
        if verdict is not None:
            return verdict
    return Feedback(
        True, f"autograd Function: forward and gradients correct on all {len(cases)} inputs."
    )
