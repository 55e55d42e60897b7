"""Every bnlab.torch module and function x engine x dtype x layout x strided parameters x
train/eval x a NaN batch: values against the float64 definition (written here, in float64
torch autograd), the engine that actually ran (a spy on each engine's entry points), every
buffer after a NaN batch, and the errors a forced engine gives for what it does not take.

Engines: numba, Triton (in its interpreter: conftest sets TRITON_INTERPRET=1), the reference
(torch operations) and torch's native kernel, each forced, and "auto".
"""

import itertools
import zlib

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab.kernels import numba_bn, triton_bn  # noqa: E402
from bnlab.torch import engine, reference  # noqa: E402

ENGINES = ("numba", "triton", "reference", "native")
TAKES = {"numba": (torch.float32, torch.float64),
         "triton": (torch.float32, torch.float16, torch.bfloat16),
         "reference": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
         "native": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16,
          "bf16": torch.bfloat16}
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4),
       torch.float16: (4e-3, 1e-2), torch.bfloat16: (2e-2, 6e-2)}
EPS, MOMENTUM = 1e-3, 0.25


@pytest.fixture
def spy(monkeypatch):
    """Names of the engines whose entry points ran since the last clear()."""
    ran = []

    def wrap(owner, name, engine_name):
        fn = getattr(owner, name)

        def spied(*args, **kwargs):
            ran.append(engine_name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(owner, name, spied)

    for name in ("train_forward", "inference", "backward", "moments", "add_act_forward"):
        wrap(numba_bn, name, "numba")
        wrap(triton_bn, name, "triton")
    wrap(numba_bn, "add_act_backward", "numba")
    wrap(reference, "forward", "reference")
    wrap(torch.nn.functional, "batch_norm", "native")
    return ran


# --- the definition, in float64 ---------------------------------------------------------------


def definition(x, w, b, rm, rv, training, mask=None, act=None, ghost=None, renorm=None,
               residual=None):
    """y, and the running statistics after the call, in float64 (autograd gives the
    gradients). ``mask``: statistics over True positions; ``ghost``: virtual batch size;
    ``renorm``: (renorm_mean, renorm_std, rmax, dmax); ``residual``: added before the
    activation."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)

    def stats(x):
        if mask is None:
            return x.mean(dims), x.var(dims, correction=0), x.numel() // x.shape[1]
        keep = mask.unsqueeze(1).double()
        n = keep.sum() * 1.0
        mean = (x * keep).sum(dims) / n
        return mean, (((x - mean.reshape(shape)) * keep) ** 2).sum(dims) / n, int(n)

    if not training:
        mean, var = rm.double(), rv.double()
        y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS)
        new = (rm, rv)
    elif ghost:
        ys, ms, vs = [], [], []
        for c in x.split(ghost):
            mean, var, m = stats(c)
            ys.append((c - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + EPS))
            ms.append(mean.detach())
            vs.append(var.detach() * m / (m - 1))
        y = torch.cat(ys)
        new = tuple((1 - MOMENTUM) * r.double() + MOMENTUM * torch.stack(v).mean(0)
                    for r, v in ((rm, ms), (rv, vs)))
    else:
        mean, var, m = stats(x)
        sigma_b = torch.sqrt(var + EPS)
        y = (x - mean.reshape(shape)) / sigma_b.reshape(shape)
        if renorm is not None:  # Ioffe 2017 as Keras 2: r, d constants
            mu, std, rmax, dmax = renorm
            sigma = torch.clamp(std.double(), min=EPS ** 0.5)
            r = torch.clamp(sigma_b.detach() / sigma, 1 / rmax, rmax)
            d = torch.clamp((mean.detach() - mu.double()) / sigma, -dmax, dmax)
            y = y * r.reshape(shape) + d.reshape(shape)
        new = ((1 - MOMENTUM) * rm.double() + MOMENTUM * mean.detach(),
               (1 - MOMENTUM) * rv.double() + MOMENTUM * var.detach() * m / (m - 1))
    y = y * w.double().reshape(shape) + b.double().reshape(shape)
    if residual is not None:
        y = y + residual
    if act == "relu":
        y = torch.relu(y)
    return y, new


# --- cases -----------------------------------------------------------------------------------

KINDS = {  # name: (shape, module factory or None for the functional form)
    "functional": ((4, 3, 3, 3), None),
    "BatchNorm1d": ((6, 3, 4), lambda: bt.BatchNorm1d(3, EPS, MOMENTUM)),
    "BatchNorm2d": ((4, 3, 3, 3), lambda: bt.BatchNorm2d(3, EPS, MOMENTUM)),
    "BatchNorm3d": ((2, 3, 2, 2, 3), lambda: bt.BatchNorm3d(3, EPS, MOMENTUM)),
    "BatchNormAct2d": ((4, 3, 3, 3), lambda: bt.BatchNormAct2d(3, eps=EPS, momentum=MOMENTUM)),
    "BatchNormAddAct2d": ((4, 3, 3, 3), lambda: bt.BatchNormAddAct2d(3, eps=EPS,
                                                                     momentum=MOMENTUM)),
    "GhostBatchNorm2d": ((4, 3, 3, 3), lambda: bt.GhostBatchNorm2d(3, 2, EPS, MOMENTUM)),
    "BatchRenorm2d": ((4, 3, 3, 3), lambda: bt.BatchRenorm2d(3, EPS, MOMENTUM, rmax=1.5,
                                                               dmax=0.5, renorm_momentum=0.3)),
    "masked BatchNorm2d": ((4, 3, 3, 3), lambda: bt.BatchNorm2d(3, EPS, MOMENTUM)),
}
LAYOUTS = ("contiguous", "channels_last", "strided")


def make_input(shape, layout, dtype, g):
    x = 1.5 + 2.0 * torch.randn(shape[:-1] + (2 * shape[-1],), generator=g, dtype=torch.float64)
    x = x[..., ::2] if layout == "strided" else x[..., :shape[-1]].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    return x.to(dtype)  # .to keeps the strides


def make_params(dtype, strided, g):
    """weight, bias, running_mean, running_var: (3,) views of (6,) tensors when strided."""
    n = 6 if strided else 3
    vals = [0.5 + torch.rand(n, generator=g), torch.randn(n, generator=g),
            0.3 * torch.randn(n, generator=g), 0.5 + torch.rand(n, generator=g)]
    vals = [v.to(dtype) for v in vals]
    return [v[::2] if strided else v for v in vals]


def layout_ok(kind, layout):
    shape = KINDS[kind][0]
    return layout != "channels_last" or len(shape) in (4, 5)


def cases():
    for kind, eng, dname, layout, strided in itertools.product(
            KINDS, ("auto", *ENGINES), DTYPES, LAYOUTS, (False, True)):
        if not layout_ok(kind, layout):
            continue
        if kind not in ("functional", "BatchNorm2d") and (strided or layout == "strided"):
            continue  # every layout and strided vector on the two main paths
        yield pytest.param(kind, eng, dname, layout, strided,
                           id=f"{kind}-{eng}-{dname}-{layout}{'-strided' if strided else ''}")


def expected_engine(kind, backend, dtype):
    """What must run, or the exception type a forced backend raises."""
    if kind == "masked BatchNorm2d":
        return "reference" if backend in ("auto", "reference") else ValueError
    if backend == "auto":
        return "numba" if dtype in TAKES["numba"] else "native"
    return backend if dtype in TAKES[backend] else TypeError


def install(module, params):
    """The module's parameters and buffers replaced by the given (possibly strided) views."""
    w, b, rm, rv = params
    module.weight = torch.nn.Parameter(w.detach())  # a Parameter keeps the view's strides
    module.bias = torch.nn.Parameter(b.detach())
    module.running_mean = rm
    module.running_var = rv
    return module


@pytest.mark.parametrize("kind,backend,dname,layout,strided", list(cases()))
def test_matrix(spy, kind, backend, dname, layout, strided):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind} {dname} {layout}".encode()))
    shape, factory = KINDS[kind]
    x = make_input(shape, layout, dtype, g)
    # half activations with float32 parameters, as autocast makes them
    w, b, rm, rv = make_params(torch.float32 if dtype in (torch.float16, torch.bfloat16)
                               else dtype, strided, g)
    rm0, rv0 = rm.clone(), rv.clone()
    neighbours = [t._base[1::2].clone() for t in (w, b, rm, rv)] if strided else None
    mask = None
    if kind == "masked BatchNorm2d":
        mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.6
        mask[0, 0, 0] = True
    want_engine = expected_engine(kind, backend, dtype)
    module = renorm0 = None
    if factory is not None:
        module = install(factory().to(w.dtype), (w, b, rm, rv))
        module.backend = backend
        renorm0 = (module.renorm_mean.clone(), module.renorm_std.clone()) if hasattr(
            module, "renorm_mean") else None

    residual = r64 = None
    if kind == "BatchNormAddAct2d":  # in x's dtype and memory format
        residual = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype).contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else
            torch.contiguous_format).requires_grad_()
        r64 = residual.detach().double().requires_grad_()

    def call(xx, training):
        if module is None:
            return bt.batch_norm(xx, rm, rv, w, b, training, MOMENTUM, EPS, backend=backend)
        module.train(training)
        if residual is not None:
            return module(xx, residual)
        return module(xx, mask=mask) if mask is not None else module(xx)

    xg = x.detach().clone(memory_format=torch.preserve_format) if layout != "strided" else \
        x.detach()
    xg.requires_grad_()
    if isinstance(want_engine, type):  # a forced engine that does not take this input
        with pytest.raises(want_engine, match=f'backend="{backend}"'):
            call(xg, True)
        assert spy == []  # nothing ran in its place
        return

    # training: values, gradients, running statistics, the engine
    y = call(xg, True)
    assert set(spy) == {want_engine}, spy
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref, (rm_ref, rv_ref) = definition(
        x64, w64, b64, rm0, rv0, True, mask=mask,
        act="relu" if kind in ("BatchNormAct2d", "BatchNormAddAct2d") else None,
        ghost=2 if kind == "GhostBatchNorm2d" else None,
        renorm=(renorm0[0], renorm0[1], 1.5, 0.5) if renorm0 else None, residual=r64)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref.detach(), rtol=rtol, atol=atol)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=rtol, atol=atol * 4)
    if residual is not None:
        torch.testing.assert_close(residual.grad.double(), r64.grad, rtol=rtol, atol=atol)
    wgrad = (module.weight.grad if module is not None else None)
    if wgrad is not None:
        torch.testing.assert_close(wgrad.double(), w64.grad, rtol=rtol, atol=atol * 10)
        torch.testing.assert_close(module.bias.grad.double(), b64.grad, rtol=rtol,
                                   atol=atol * 10)
    running = (module.running_mean, module.running_var) if module is not None else (rm, rv)
    torch.testing.assert_close(running[0].double(), rm_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(running[1].double(), rv_ref, rtol=rtol, atol=atol)

    # a NaN batch: NaN output where torch gives it, every buffer unchanged
    buffers = {k: v.clone() for k, v in (module.state_dict() if module is not None else
                                         {"running_mean": rm, "running_var": rv}).items()}
    bad = x.detach().clone()
    bad[(0, 0) + (0,) * (x.dim() - 2)] = float("nan")
    spy.clear()
    with torch.no_grad():
        y_bad = call(bad, True)
    assert set(spy) == {want_engine}, spy
    assert torch.isnan(y_bad[:, 0]).any()
    after = module.state_dict() if module is not None else {"running_mean": rm,
                                                             "running_var": rv}
    for k, v in buffers.items():
        assert torch.equal(after[k], v), k

    # evaluation: the running statistics
    spy.clear()
    with torch.no_grad():
        y_eval = call(x.detach(), False)
    ref_eval, _ = definition(x.double(), w.double(), b.double(), running[0], running[1], False,
                             act="relu" if kind in ("BatchNormAct2d", "BatchNormAddAct2d")
                             else None, residual=None if r64 is None else r64.detach())
    torch.testing.assert_close(y_eval.double(), ref_eval, rtol=rtol, atol=atol)
    if kind != "masked BatchNorm2d":  # eval ignores the mask: the unmasked engines
        assert set(spy) == {expected_engine("BatchNorm2d", backend, dtype)}, spy
    if strided:  # the views were read and written in place, their neighbours untouched
        assert running[0].data_ptr() == rm.data_ptr() and not rm.is_contiguous()
        for t, before in zip((w, b, rm, rv), neighbours):
            assert torch.equal(t._base[1::2], before)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("eps,training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_eps_errors_are_torchs_on_every_engine(spy, backend, eps, training):
    dtype = torch.float32
    x = torch.randn(4, 3, 2, 2, dtype=dtype)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=training, eps=eps)
    spy.clear()
    with pytest.raises(ValueError) as ours:
        bt.batch_norm(x, rm, rv, training=training, eps=eps, backend=backend)
    assert str(ours.value) == str(theirs.value)
    m = bt.BatchNorm2d(3, eps=eps)
    m.backend = backend
    m.train(training)
    with pytest.raises(ValueError) as ours:
        m(x)
    assert str(ours.value) == str(theirs.value)
    assert spy == []


def test_forced_backends_never_hand_the_call_elsewhere(spy):
    x = torch.randn(4, 3, 2, 2)
    cases = [
        (dict(backend="numba"), x.bfloat16(), TypeError, "takes float32 or float64 input"),
        (dict(backend="numba"), x.half(), TypeError, "got float16"),
        (dict(backend="triton"), x.double(), TypeError, "got float64"),
        (dict(backend="numba", weight=torch.ones(3, dtype=torch.float64)), x, TypeError,
         "takes weight as a (3,) float32 tensor"),
        (dict(backend="triton", weight=torch.ones(3, dtype=torch.float64)), x, TypeError,
         "takes weight as a (3,) float32 tensor"),
        (dict(backend="numba"), x[:0], ValueError, "at least one element"),
    ]
    for kwargs, xx, exc, msg in cases:
        spy.clear()
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
            bt.batch_norm(xx, None, None, training=True, **kwargs)
        assert spy == []
    # an input torch rejects too gets torch's own error, from every forced engine
    for backend in ENGINES:
        spy.clear()
        for kwargs in (dict(weight=torch.ones(4)), dict(running_mean=torch.zeros(4),
                                                        running_var=torch.ones(4))):
            with pytest.raises(RuntimeError) as theirs:
                torch.nn.functional.batch_norm(x, training=True, **{
                    "running_mean": None, "running_var": None, **kwargs})
            spy.clear()
            with pytest.raises(RuntimeError) as ours:
                bt.batch_norm(x, kwargs.get("running_mean"), kwargs.get("running_var"),
                              kwargs.get("weight"), training=True, backend=backend)
            assert str(ours.value) == str(theirs.value)
            assert spy in ([], ["native"]) if backend == "native" else spy == []
    with pytest.raises(ValueError, match="cannot run mask="):
        m = bt.BatchNorm2d(3)
        m.backend = "numba"
        m(x, mask=torch.ones(4, 2, 2, dtype=torch.bool))


def test_the_docs_table_is_the_rules():
    """docs/performance.md shows engine.table() as it is."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    assert engine.table() in text
