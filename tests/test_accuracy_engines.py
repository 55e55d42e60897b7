"""Statistics at full accuracy on every bnlab.torch engine: no engine depends on which
element comes first or on a common offset. Against the float64 definition of the same
float32 input: the batch variance (read from the running variance after one step with
momentum 1: the unbiased m/(m-1) variance) within 8 float32 ulps, relative; the mean and
the normalized output within 8 ulps of the inputs' own scale (max |x|, and max |x| / std for
y: a float32 x at 1e4 is itself only known to 1e-3).

Triton runs in its interpreter (conftest), so its cases are smaller."""

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402

ULP = torch.finfo(torch.float32).eps  # 2**-23
ENGINES = ("numba", "triton", "reference")


def batch(kind, shape, g):
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "outlier first":  # x[0, c, 0, 0] far from the rest: a poor shift
        x[(0, slice(None)) + (0,) * (len(shape) - 2)] = 1e4
    elif kind == "offset 1e4":
        x += 1e4
    return x.float()


def check(x, backend, ulps=8):
    C = x.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    y = bt.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-5, backend=backend)
    x64 = x.double()
    dims = [0, *range(2, x.dim())]
    var = x64.var(dims, correction=1)
    rel = ((rv.double() - var) / var).abs().max().item()
    assert rel <= ulps * ULP, f"running_var relative error {rel:.2e} ({rel / ULP:.1f} ulps)"
    mean = x64.mean(dims)
    shape = [1, -1] + [1] * (x.dim() - 2)
    want = (x64 - mean.reshape(shape)) / torch.sqrt(x64.var(dims, correction=0).reshape(shape)
                                                    + 1e-5)
    scale = x64.abs().max().item()
    std = x64.var(dims, correction=0).sqrt().min().item()
    assert (y.double() - want).abs().max().item() <= ulps * ULP * scale / std
    assert (rm.double() - mean).abs().max().item() <= ulps * ULP * scale


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("kind", ["outlier first", "offset 1e4"])
def test_statistics_do_not_depend_on_a_shift(backend, kind):
    g = torch.Generator().manual_seed(5)
    check(batch(kind, (32, 2, 16, 16), g), backend)  # the case: 8192 values a channel
    check(batch(kind, (64, 3), g), backend)


@pytest.mark.parametrize("backend,m", [("numba", 10_000_000), ("reference", 1_000_000),
                                       ("triton", 200_000)])
def test_offset_at_large_m(backend, m):
    """x = 1e4 + N(0, 1) at m values per channel (the interpreter takes smaller m)."""
    g = torch.Generator().manual_seed(6)
    x = (1e4 + torch.randn(m // 1000, 1, 1000, generator=g, dtype=torch.float64)).float()
    check(x, backend)


def test_strided_channel_vectors_every_engine():
    """(C,) weight, bias and running buffers as views with a stride are read and written in
    place on every engine (the neighbours between their entries untouched)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 4, 4, generator=g)
    for backend in ENGINES + ("native",):
        base = [torch.rand(6, generator=g) + 0.5 for _ in range(4)]
        before = [b.clone() for b in base]
        w, b, rm, rv = (t[::2] for t in base)
        y = bt.batch_norm(x, rm, rv, w, b, True, 0.5, 1e-5, backend=backend)
        rm2, rv2 = before[2][::2].clone(), before[3][::2].clone()
        want = torch.nn.functional.batch_norm(x, rm2, rv2, w.clone(), b.clone(), True, 0.5,
                                              1e-5)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-6)
        for t, t0 in zip(base, before):
            assert torch.equal(t[1::2], t0[1::2]), backend


@pytest.mark.parametrize("fused_partials,finalize_partials", [(1024, 4096), (1, 4)],
                         ids=["parts added in every program", "parts merged once, in chunks"])
def test_triton_merges_parts_whose_means_differ(monkeypatch, fused_partials, finalize_partials):
    """A batch whose samples drift (each part of the reduction sees another mean): the
    between-parts term of Chan's merge carries most of the variance, so every way of
    merging the parts (in every program, or once in chunks) must include it."""
    from bnlab.kernels import triton_bn as tb

    monkeypatch.setattr(tb, "PROGRAMS_PER_SM", 1000)
    monkeypatch.setattr(tb, "FUSED_PARTIALS", fused_partials)
    monkeypatch.setattr(tb, "FINALIZE_PARTIALS", finalize_partials)
    tb.clear_caches()
    try:
        g = torch.Generator().manual_seed(8)
        x = torch.randn(512, 2, 64, generator=g, dtype=torch.float64)  # 16 tiles a channel
        assert tb._geometry(x.float(), torch.contiguous_format).P >= 8
        drift = torch.linspace(-50, 50, 512, dtype=torch.float64).reshape(512, 1, 1)
        check((drift + x).float(), "triton")
    finally:
        tb.clear_caches()
