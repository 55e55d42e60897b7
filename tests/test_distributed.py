"""SyncBatchNorm and data-parallel training across processes: gloo on 127.0.0.1, processes
spawned by the tests, every wait bounded."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import bnlab.torch as bt  # noqa: E402
from bnlab.torch import distributed  # noqa: E402

DEADLINE = 150  # seconds for any one launch: a hang fails the test instead of blocking CI
STEPS = 3


def _data(sizes, shape, seed):
    """Global batches x, dy (float64) for STEPS steps and one eval batch."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    batches = [(3.0 + 2.0 * torch.randn(n, *shape, generator=g, dtype=torch.float64),
                torch.randn(n, *shape, generator=g, dtype=torch.float64)) for _ in range(STEPS)]
    return batches, 3.0 + 2.0 * torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _init(module, C):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        module.weight.copy_(0.5 + torch.rand(C, generator=g, dtype=torch.float64))
        module.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))


def _sync_worker(rank, world, out_dir, sizes, shape, momentum):
    """Rank's slice of every global batch through bnlab's SyncBatchNorm; gradients of
    weight and bias summed by hand (as DDP would) before an SGD step."""
    torch.set_num_threads(1)
    C = shape[0]
    bn = bt.SyncBatchNorm(C, momentum=momentum, dtype=torch.float64)
    _init(bn, C)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    batches, x_eval = _data(sizes, shape, seed=1)
    record = []
    for x, dy in batches:
        xs = x[lo:hi].clone().requires_grad_()
        y = bn(xs)
        y.backward(dy[lo:hi])
        grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
        record.append(dict(y=y.detach(), dx=xs.grad, dw=grads[0], db=grads[1],
                           rm=bn.running_mean.clone(), rv=bn.running_var.clone(),
                           nbt=bn.num_batches_tracked.clone()))
        with torch.no_grad():
            for p in (bn.weight, bn.bias):
                dist.all_reduce(p.grad)
                p -= 0.1 * p.grad
                p.grad = None
    bn.eval()
    record.append(dict(y=bn(x_eval[lo:hi]).detach()))
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


def _reference(sizes, shape, momentum):
    C = shape[0]
    cls = torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d
    bn = cls(C, momentum=momentum, dtype=torch.float64)
    _init(bn, C)
    batches, x_eval = _data(sizes, shape, seed=1)
    record = []
    for x, dy in batches:
        x = x.clone().requires_grad_()
        y = bn(x)
        y.backward(dy)
        record.append(dict(y=y.detach(), dx=x.grad, dw=bn.weight.grad.clone(),
                           db=bn.bias.grad.clone(), rm=bn.running_mean.clone(),
                           rv=bn.running_var.clone(), nbt=bn.num_batches_tracked.clone()))
        with torch.no_grad():
            for p in (bn.weight, bn.bias):
                p -= 0.1 * p.grad
                p.grad = None
    bn.eval()
    record.append(dict(y=bn(x_eval).detach()))
    return record


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes,shape,momentum", [
    ([3, 0, 5], (4, 3, 5), 0.1),        # 4-D, uneven, an empty rank, 3 processes
    ([7, 2], (6,), None),               # 2-D, 2 processes, cumulative average
], ids=["4-D 3 ranks with an empty one", "2-D 2 ranks momentum None"])
def test_sync_batchnorm_equals_one_process_over_the_whole_batch(tmp_path, sizes, shape,
                                                               momentum):
    distributed.launch(_sync_worker, len(sizes), args=(str(tmp_path), sizes, shape, momentum),
                       deadline=DEADLINE)
    ref = _reference(sizes, shape, momentum)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    for step, want in enumerate(ref):
        for key in ("y", "dx"):
            if key in want:
                close(torch.cat([r[step][key] for r in ranks]), want[key])
        if "dw" in want:
            close(sum(r[step]["dw"] for r in ranks), want["dw"])
            close(sum(r[step]["db"] for r in ranks), want["db"])
            for r in ranks:  # identical on every rank, and torch's
                close(r[step]["rm"], want["rm"])
                close(r[step]["rv"], want["rv"])
                assert torch.equal(r[step]["nbt"], want["nbt"])


def _batches(B, steps, size=12):
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(B, 1, size, size, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (B,), generator=g)) for _ in range(steps)]


def _seed_cnn():
    return bt.models.seed_cnn(image_size=12, channels=(4, 6)).double()


def _train(model, batches, lo=0, hi=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, t in batches:
        loss = torch.nn.functional.cross_entropy(model(x[lo:hi]), t[lo:hi])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _ddp_worker(rank, world, out_dir, B, steps):
    torch.set_num_threads(1)
    model = bt.convert(_seed_cnn(), sync=True)
    assert sum(isinstance(m, bt.SyncBatchNorm) for m in model.modules()) == 2
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = B // world
    _train(ddp, _batches(B, steps), rank * per, (rank + 1) * per)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_with_sync_bn_equals_one_process_with_the_whole_batch(tmp_path):
    """2 processes x batch B/2 with DDP and convert(sync=True) end with the parameters and
    BN buffers of one process with plain BN on batch B (float64)."""
    B, steps = 8, 3
    distributed.launch(_ddp_worker, 2, args=(str(tmp_path), B, steps), deadline=DEADLINE)
    model = _seed_cnn()
    _train(model, _batches(B, steps))
    want = model.state_dict()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == list(want)
        for k in want:
            if want[k].is_floating_point():
                torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
            else:
                assert torch.equal(got[k], want[k]), k


def _subgroup_worker(rank, world, out_dir):
    """Ranks 0 and 2 synchronize in a subgroup; rank 1 is a group of its own (plain BN)."""
    torch.set_num_threads(1)
    pair, alone = dist.new_group([0, 2]), dist.new_group([1])
    bn = bt.SyncBatchNorm(3, dtype=torch.float64, process_group=alone if rank == 1 else pair)
    x = _data([4, 4, 4], (3,), seed=5)[1]
    y = bn(x[4 * rank:4 * rank + 4])
    torch.save(dict(y=y.detach(), rm=bn.running_mean), os.path.join(out_dir, f"rank{rank}.pt"))


def test_process_group_subgroups_are_honoured(tmp_path):
    distributed.launch(_subgroup_worker, 3, args=(str(tmp_path),), deadline=DEADLINE)
    x = _data([4, 4, 4], (3,), seed=5)[1]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    pair = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    want = pair(torch.cat([x[0:4], x[8:12]])).detach()
    close(torch.cat([got[0]["y"], got[2]["y"]]), want)
    close(got[0]["rm"], pair.running_mean)
    close(got[2]["rm"], pair.running_mean)
    alone = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    close(got[1]["y"], alone(x[4:8]).detach())


def _mismatch_worker(rank, world, what):
    C = 3 + rank if what == "channels" else 3
    dtype = torch.float64 if what == "dtype" and rank == 1 else torch.float32
    bn = bt.SyncBatchNorm(C, dtype=dtype)
    bn(torch.randn(4, C, 2, 2, dtype=dtype))


@pytest.mark.parametrize("what,message", [
    ("channels", r"rank 1: 4-D input, 4 channels, float32 \(ranks \[1\] differ"),
    ("dtype", r"rank 1: 4-D input, 3 channels, float64 \(ranks \[1\] differ")])
def test_mismatched_ranks_are_an_error_naming_the_rank(what, message):
    with pytest.raises(distributed.WorkerFailed, match=message):
        distributed.launch(_mismatch_worker, 2, args=(what,), deadline=DEADLINE)


def _later_mismatch_worker(rank, world, what, out_dir):
    """The first step agrees; at the second, rank 1 sends another input rank or dtype.
    Every rank records the error it gets."""
    bn = bt.SyncBatchNorm(3)
    bn(torch.randn(4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    if rank == 1:
        x = x.flatten(2) if what == "rank" else x.double()
    try:
        bn(x)
    except ValueError as e:
        (Path(out_dir) / f"{rank}.txt").write_text(str(e))


@pytest.mark.parametrize("what,message", [
    ("rank", r"rank 1: 3-D input, 3 channels, float32 \(ranks \[1\] differ"),
    ("dtype", r"rank 1: 4-D input, 3 channels, float64 \(ranks \[1\] differ")],
    ids=["rank", "dtype"])
def test_a_rank_that_changes_later_is_an_error_on_every_rank(tmp_path, what, message):
    """Checked at every call, not only at a rank's own change (which left the other ranks in
    a different collective: a hang or garbage)."""
    distributed.launch(_later_mismatch_worker, 2, args=(what, str(tmp_path)),
                       deadline=DEADLINE)
    for rank in range(2):
        assert re.search(message, (tmp_path / f"{rank}.txt").read_text())


def _dying_worker(rank, world):
    bn = bt.SyncBatchNorm(3)
    for step in range(1000):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-training
        bn(torch.randn(8, 3)).sum().backward()


def test_a_dead_worker_ends_the_job_with_an_error_naming_it():
    start = time.monotonic()
    with pytest.raises(distributed.WorkerFailed, match="rank 1 was killed by signal SIGKILL") as e:
        distributed.launch(_dying_worker, 2, timeout=30, deadline=DEADLINE)
    assert e.value.rank == 1
    assert time.monotonic() - start < 60  # well within the process group's timeout


def test_without_a_process_group_sync_bn_is_plain_bn():
    ours = bt.SyncBatchNorm(3, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    close(ours(x), theirs(x))
    close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(3))


def test_convert_sync_and_revert():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(12)))
    params = list(model.parameters())
    model = bt.convert(model, sync=True, process_group="group")
    assert [type(m).__name__ for m in model.modules()].count("SyncBatchNorm") == 2
    assert model[1].process_group == "group"
    assert list(model.parameters()) == params  # the same Parameter objects
    back = bt.revert(model)
    assert isinstance(back[1], torch.nn.SyncBatchNorm) and back[1].process_group == "group"
    assert isinstance(bt.convert(torch.nn.SyncBatchNorm(2)), bt.SyncBatchNorm)


# --- bnlab train --engine torch -------------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

TRAIN = ["train", "--engine", "torch", "--dataset", "digits", "--batch-size", "33", "--steps",
         "24", "--eval-every", "12", "--no-progress"]


def _bnlab(*args, timeout=DEADLINE, **kwargs):
    return subprocess.run([sys.executable, "-m", "bnlab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def test_train_nproc_2_reproduces_nproc_1(tmp_path):
    """Same seed: 2 processes (slices of 16 and 17) with SyncBN and DDP reach the one-process
    run's numbers, and rank 0 writes the NumPy engine's run folder."""
    runs = {}
    for n in (1, 2):
        out = _bnlab(*TRAIN, "--nproc", str(n), "--out", str(tmp_path / f"n{n}"))
        assert out.returncode == 0, out.stderr[-2000:]
        runs[n] = json.loads((tmp_path / f"n{n}" / "results.json").read_text())
        for name in ("learning_curves.png", "report.md", "checkpoint.npz"):
            assert (tmp_path / f"n{n}" / name).stat().st_size > 0
    assert runs[1]["world_size"] == 1 and runs[2]["world_size"] == 2
    one, two = runs[1]["runs"]["bn"], runs[2]["runs"]["bn"]
    assert one["eval_step"] == two["eval_step"] == [12, 24]
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1e-9)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)


def test_train_under_torchrun(tmp_path):
    """The same entry point as torchrun's ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(distributed.free_port()), "-m", "bnlab.cli",
                          *TRAIN, "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["world_size"] == 2


def test_train_on_two_nodes_with_c10d_rendezvous(tmp_path):
    """Two torchrun launches as two "nodes" on 127.0.0.1 (--nnodes 2, one process each, a
    c10d rendezvous), as a cluster runs it: the same numbers as --nproc 2."""
    torchrun = Path(sys.executable).with_name("torchrun")
    port = distributed.free_port()
    nodes = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bnlab-test",
                               "-m", "bnlab.cli", *TRAIN, "--out", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=DEADLINE)
        assert node.returncode == 0, err[-2000:]
    two_nodes = json.loads((tmp_path / "run" / "results.json").read_text())
    assert two_nodes["world_size"] == 2
    one = _bnlab(*TRAIN, "--nproc", "2", "--out", str(tmp_path / "local"))
    assert one.returncode == 0, one.stderr[-2000:]
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    # float32 training with other thread counts per process: as nproc 2 against nproc 1
    assert two_nodes["runs"]["bn"]["loss"] == pytest.approx(local["runs"]["bn"]["loss"],
                                                           rel=1e-4)
    assert two_nodes["runs"]["bn"]["test_accuracy"] == pytest.approx(
        local["runs"]["bn"]["test_accuracy"], abs=1e-9)


def _children(pid):
    """The worker processes started by ``pid`` (not multiprocessing's resource tracker)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_every_worker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bnlab.cli", *TRAIN[:-5], "--steps",
                             "100000", "--nproc", "2", "--no-progress", "--out",
                             str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the workers are training
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    deadline = time.monotonic() + 5  # the kernel may take a moment to reap them
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
