"""Running statistics from pooled batch statistics: bnlab.torch.accumulating (gradient
accumulation) against torch's BN on one batch of K*b, and bnlab.torch.recalibrate across
ranks (gloo on 127.0.0.1, bounded waits) against one process's recalibrate over the union
of the ranks' batches."""

import os

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402
from bnlab.torch import distributed  # noqa: E402

K, B = 4, 5
MODULES = {  # name: (factory(C, momentum, dtype), torch's class, sample shape)
    "BatchNorm1d": (lambda C, m, d: bt.BatchNorm1d(C, momentum=m, dtype=d),
                    torch.nn.BatchNorm1d, (6,)),
    "BatchNorm2d": (lambda C, m, d: bt.BatchNorm2d(C, momentum=m, dtype=d),
                    torch.nn.BatchNorm2d, (3, 4, 4)),
    "BatchNorm3d": (lambda C, m, d: bt.BatchNorm3d(C, momentum=m, dtype=d),
                    torch.nn.BatchNorm3d, (2, 2, 3, 3)),
    "BatchNormAct2d": (lambda C, m, d: bt.BatchNormAct2d(C, momentum=m, dtype=d),
                       torch.nn.BatchNorm2d, (3, 4, 4)),
    "SyncBatchNorm (no group)": (lambda C, m, d: bt.SyncBatchNorm(C, momentum=m, dtype=d),
                                 torch.nn.BatchNorm2d, (3, 4, 4)),
}


@pytest.mark.parametrize("backend", ["auto", "numba", "reference", "native", "triton"])
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulating_equals_one_batch_of_k_times_b(kind, backend, momentum):
    factory, torch_cls, shape = MODULES[kind]
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    ours, ref = factory(shape[0], momentum, dtype), torch_cls(shape[0], momentum=momentum,
                                                              dtype=dtype)
    ours.backend = backend
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        xs = [(3 + 2 * torch.randn(B, *shape, generator=g, dtype=torch.float64)).to(dtype)
              for _ in range(K)]
        with bt.accumulating(ours, steps=K):
            for x in xs:
                y = ours(x)
                # each micro-batch is still normalized by its own statistics
                want = torch.nn.functional.batch_norm(x, None, None, ours.weight, ours.bias,
                                                      True, 0.0, ours.eps)
                if kind == "BatchNormAct2d":
                    want = torch.relu(want)
                torch.testing.assert_close(y, want, **tol)
        ref(torch.cat(xs))
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert "_bn_pool" not in ours.__dict__ and ours._bn_pool is None  # outside the block: as ever
    ours(xs[0])
    assert int(ours.num_batches_tracked) == 4


def test_accumulating_in_a_model_leftovers_and_errors():
    torch.manual_seed(0)
    model = bt.convert(bt.models.seed_cnn()).double()
    ref = bt.revert(bt.convert(bt.models.seed_cnn())).double()
    ref.load_state_dict(model.state_dict())
    xs = [torch.rand(4, 1, 28, 28, dtype=torch.float64) for _ in range(6)]
    with bt.accumulating(model, steps=4):  # 6 micro-batches: one update of 4, then of 2
        for x in xs:
            model(x)
    with torch.no_grad():
        ref(torch.cat(xs[:4]))
        ref(torch.cat(xs[4:]))
    # the first BN sees the same inputs either way; a deeper one does not (its inputs were
    # normalized per micro-batch: what accumulation cannot change), but it counts the same
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        if k.startswith("1.") or "num_batches" in k:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)
    with pytest.raises(TypeError, match=r"convert\(model\) first"):
        with bt.accumulating(bt.models.seed_cnn(), steps=2):
            pass
    with pytest.raises(TypeError, match="GhostBatchNorm2d"):
        with bt.accumulating(torch.nn.Sequential(bt.GhostBatchNorm2d(3, 2)), steps=2):
            pass
    with pytest.raises(ValueError, match="positive integer"):
        with bt.accumulating(model, steps=0):
            pass


def test_a_nan_micro_batch_leaves_the_running_statistics_as_they_were():
    bn = bt.BatchNorm2d(3, dtype=torch.float64)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bad = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    bad[0, 0, 0, 0] = float("nan")
    with bt.accumulating(bn, steps=2):
        bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
        bn(bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- recalibrate across ranks ------------------------------------------------------------------

RANK_BATCHES = [5, 3, 0]


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [2 + torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)
            for _ in range(RANK_BATCHES[rank])]


def _model():
    torch.manual_seed(0)
    return bt.convert(bt.models.seed_cnn(), sync=True).double()


def _recalibrate_worker(rank, world, out_dir):
    torch.set_num_threads(1)
    model = _model()
    model.eval()
    bt.recalibrate(model, _batches(rank))
    assert not model.training  # the mode restored
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_recalibrate_across_ranks_equals_one_process_over_all_batches(tmp_path):
    distributed.launch(_recalibrate_worker, len(RANK_BATCHES), args=(str(tmp_path),),
                       timeout=60)
    one = _model()
    everything = [b for r in range(len(RANK_BATCHES)) for b in _batches(r)]
    bt.recalibrate(one, everything)  # no process group here: one process's precise BN
    assert int(one[1].num_batches_tracked) == sum(RANK_BATCHES)
    for r in range(len(RANK_BATCHES)):
        state = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in one.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-12, msg=f"{r} {k}")


# --- uneven inputs under Join ---------------------------------------------------------------

JOIN_BATCHES = [5, 3, 0]


def _join_batches(rank):
    g = torch.Generator().manual_seed(200 + rank)
    return [2 + torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)
            for _ in range(JOIN_BATCHES[rank])]


def _join_worker(rank, world, out_dir, lr):
    from torch.distributed.algorithms.join import Join

    torch.set_num_threads(1)
    net = _model()  # SyncBatchNorm layers
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    with Join(bt.joinables(ddp)):
        for x in _join_batches(rank):
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
    torch.save(net.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_uneven_ranks_under_join_finish_with_the_active_ranks_statistics(tmp_path):
    """Ranks with 5, 3 and 0 batches: every step's BN statistics are those of the ranks
    still holding data (one process's BN over their concatenated batches), on every rank;
    nobody waits forever. lr = 0 keeps the weights: the statistics alone are compared."""
    distributed.launch(_join_worker, len(JOIN_BATCHES), args=(str(tmp_path), 0.0),
                       timeout=60, deadline=120)
    one = bt.revert(_model())  # torch's BN, one process
    per_rank = [_join_batches(r) for r in range(len(JOIN_BATCHES))]
    one.train()
    with torch.no_grad():
        for step in range(max(JOIN_BATCHES)):
            one(torch.cat([b[step] for b in per_rank if step < len(b)]))
    for r in range(len(JOIN_BATCHES)):
        state = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in one.state_dict().items():
            if "running" in k or "num_batches" in k:
                torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-12,
                                           msg=f"rank {r} {k}")


def test_joinables_needs_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        bt.joinables(torch.nn.Sequential(bt.SyncBatchNorm(3)))


def test_under_join_with_learning_every_rank_ends_identical(tmp_path):
    """With a learning rate: nobody hangs, and parameters and buffers agree on every rank."""
    distributed.launch(_join_worker, len(JOIN_BATCHES), args=(str(tmp_path), 0.1),
                       timeout=60, deadline=120)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(JOIN_BATCHES))]
    assert int(states[0]["1.num_batches_tracked"]) == max(JOIN_BATCHES)
    for state in states[1:]:
        for k, v in states[0].items():
            torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-12, msg=k)
