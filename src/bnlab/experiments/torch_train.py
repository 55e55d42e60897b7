"""``bnlab train --engine torch``: the seed CNN or the paper's MLP in PyTorch, on CPU or
CUDA, in one process or data-parallel over N (``--nproc N``, or under ``torchrun``).

Every process draws the same global batch (the NumPy engine's shuffling: same seed, same
order, ``drop_last``) and takes its slice ``[r*B/N, (r+1)*B/N)``. The model is the torch
twin of bnlab's (same initial weights), its BN layers bnlab's: plain in one process,
:class:`~bnlab.torch.SyncBatchNorm` (global batch statistics) under
``DistributedDataParallel`` in several. Each rank's loss is its slice's summed
cross-entropy times N / B, so DDP's gradient average is the global batch's mean gradient:
N processes compute the one-process run's steps, up to rounding.

Rank 0 evaluates (running statistics, the test split) and writes the NumPy engine's run
folder: results.json (with the engine, device and world size), learning_curves.png,
report.md and checkpoint.npz (loadable by ``bnlab.models``), with a progress bar on the way.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import data as datasets
from .. import report
from ..extras import need
from ..train import (
    CHECKPOINT_SECONDS,
    History,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from .runs import environment, run_dir, write_json
from .single import TrainConfig, build_model

RESUME = "resume.pt"  # the torch engine's resumable checkpoint in a run folder


def _torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run(
    config: TrainConfig,
    out=None,
    device: str = "cpu",
    nproc: int = 1,
    init_from=None,
    progress: bool = True,
    print_fn=print,
    timeout: float | None = None,
    checkpoint_every: int | None = None,
    resume=None,
) -> dict:
    """Train with ``nproc`` local processes (or as one rank under torchrun); rank 0's
    results (the dict written to results.json, with ``run_dir``) come back.

    Rank 0 writes a resumable checkpoint (``RUN_DIR/resume.pt``, atomically) every
    ``checkpoint_every`` steps (default: about once a minute); ``resume=RUN_DIR`` continues
    that run on every rank, with its configuration. Under torchrun, a restarted job
    (``--max-restarts``, ``TORCHELASTIC_RESTART_COUNT`` > 0) with ``out`` holding a
    checkpoint resumes by itself."""
    import torch

    from ..torch import distributed

    if device not in ("cpu", "cuda"):
        raise ValueError(f'device must be "cpu" or "cuda", got {device!r}')
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA GPU, and torch sees none")
    timeout = distributed.DEFAULT_TIMEOUT if timeout is None else timeout
    backend = distributed.backend_for(device)
    restarted = _torchrun() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if resume is None and restarted and out is not None and (Path(out) / RESUME).exists():
        resume = out  # torchrun restarted the job: go on from the last checkpoint
    state_file = None
    if resume is not None:
        state_file = str(Path(resume) / RESUME)
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        config = TrainConfig(**json.loads(saved["config"]))
        out = resume
        print_fn(f"resuming {resume} after step {int(saved['step'])}")

    def job(folder):
        """_train's arguments after (rank, world), the same on every path."""
        return (config, str(folder), device, init_from, progress, checkpoint_every, state_file)

    if _torchrun():
        if nproc != 1:
            raise ValueError(
                "under torchrun the process count is torchrun's "
                "(--nproc-per-node, --nnodes); leave --nproc out"
            )
        rank, world = distributed.init_from_env(backend, timeout)
        folder = run_dir(out, "train") if rank == 0 or out is not None else None
        try:
            results = _train(rank, world, *job(folder))
        finally:
            distributed.dist.destroy_process_group()
        if rank != 0:
            return {}
    else:
        folder = run_dir(out, "train")
        if nproc == 1:
            results = _train(0, 1, *job(folder))
        else:
            if device == "cuda" and nproc > torch.cuda.device_count():
                raise ValueError(
                    f"--nproc {nproc} needs {nproc} GPUs, torch sees {torch.cuda.device_count()}"
                )
            threads = max(1, (os.cpu_count() or 1) // nproc)
            distributed.launch(
                _worker,
                nproc,
                args=job(folder),
                backend=backend,
                timeout=timeout,
                threads=threads,
            )
            results = json.loads((folder / "results.json").read_text())
    hist = results["runs"][next(iter(results["runs"]))]
    print_fn(
        f"{'diverged at' if hist['diverged'] else 'finished'} step {hist['step'][-1]} "
        f"on {results['world_size']} process(es): test accuracy "
        f"{hist['test_accuracy'][-1]:.4f}, test loss {hist['test_loss'][-1]:.4f} "
        f"({hist['seconds']:.1f} s)"
    )
    print_fn(
        f"wrote {Path(results['run_dir']) / 'results.json'}, learning_curves.png, "
        f"report.md, checkpoint.npz"
    )
    return results


def _worker(
    rank, world, config, folder, device, init_from, progress, checkpoint_every=None, resume=None
):
    _train(rank, world, config, folder, device, init_from, progress, checkpoint_every, resume)


def _torch_model(config: TrainConfig, data, init_from):
    """bnlab's model (from ``init_from`` if given) and its torch twin."""
    from ..torch.models import twin

    ref = build_model(config, data)
    if init_from is not None:
        load_checkpoint(init_from, ref)
    return ref, twin(ref)


def _optimizer(config: TrainConfig, params):
    import torch

    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _evaluate(model, images, labels, device, batch_size=1000) -> dict:
    import torch

    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).to(device)
            y = torch.from_numpy(labels[i : i + batch_size]).long().to(device)
            logits = model(x)
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return {"loss": total / len(labels), "accuracy": correct / len(labels)}


def _train(
    rank,
    world,
    config: TrainConfig,
    folder,
    device,
    init_from,
    progress,
    checkpoint_every=None,
    resume=None,
) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from .. import torch as bt
    from ..data import BatchStream

    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    data = datasets.load(config.dataset)
    ref, net = _torch_model(config, data, init_from)
    net = bt.convert(net.to(device), sync=world > 1)
    model = (
        torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[torch.device(device).index] if device != "cpu" else None
        )
        if world > 1
        else net
    )
    opt = _optimizer(config, model.parameters())
    images, labels = data.train
    B = config.batch_size
    if B > len(labels):
        raise ValueError(f"batch_size {B} is larger than the training split ({len(labels)})")
    if B < world:
        raise ValueError(f"batch_size {B} cannot be cut into {world} slices")
    K = config.accumulate
    if K > 1 and world > 1:
        raise ValueError(
            "--accumulate with more than one process is not supported: SyncBatchNorm's "
            "statistics are pooled across ranks in its forward"
        )
    if B % K:
        raise ValueError(f"--batch-size {B} is not a multiple of --accumulate {K}")
    per_epoch = len(labels) // B
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    eval_every = config.eval_every or per_epoch
    rng = np.random.default_rng(config.seed)  # the NumPy engine's batches, on every rank
    lo, hi = rank * B // world, (rank + 1) * B // world
    stream = BatchStream(images, labels, B, rng)
    hist = History()
    first = 1
    resumed_from: list[int] = []
    if resume is not None:  # every rank loads the same state
        state = torch.load(resume, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        stream.restore(json.loads(state["stream"]))
        hist = History(**json.loads(state["history"]))
        torch.set_rng_state(state["torch_rng"])
        first = int(state["step"]) + 1
        resumed_from = [*json.loads(state["resumed_from"]), first - 1]
    last_save = time.perf_counter()
    elapsed = hist.seconds

    def save(step: int) -> None:
        """Rank 0: the resumable checkpoint, atomically (model, optimizer, step, history,
        batch stream, torch's generator)."""
        hist.seconds = elapsed + time.perf_counter() - start
        state = {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "history": json.dumps(hist.to_dict()),
            "stream": json.dumps(stream.state()),
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(asdict(config)),
            "resumed_from": json.dumps(resumed_from),
        }
        atomic_write(Path(folder) / RESUME, lambda f: torch.save(state, f))

    tqdm = need("tqdm.auto", "the progress bar").tqdm

    bar = tqdm(
        initial=first - 1,
        total=total,
        desc=f"{config.model} (torch, {world} process{'es' if world > 1 else ''})",
        disable=not progress or rank != 0,
        unit="step",
        leave=False,
    )
    net.train()
    start = time.perf_counter()
    pooled = bt.accumulating(net, K) if K > 1 else contextlib.nullcontext()
    with pooled:
        for step, (xb, yb) in zip(range(first, total + 1), stream):
            x = torch.from_numpy(xb[lo:hi]).to(device)
            y = torch.from_numpy(yb[lo:hi]).long().to(device)
            opt.zero_grad()
            stats = torch.zeros(2, dtype=torch.float64)
            for xm, ym in zip(x.chunk(K), y.chunk(K)):  # micro-batches (K = 1: the batch)
                logits = model(xm)
                loss_sum = F.cross_entropy(logits, ym, reduction="sum")
                (loss_sum * (world / B)).backward()  # DDP averages: the global batch's mean
                stats += torch.stack(
                    [
                        loss_sum.detach().double().cpu(),
                        (logits.argmax(1) == ym).sum().double().cpu(),
                    ]
                )
            opt.step()
            if not _record(hist, step, stats, world, B, dist):
                break
            if rank == 0 and (step % eval_every == 0 or step == total):
                ev = _evaluate(net, *data.test, device)
                hist.record_eval(step, ev)
                bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", test_acc=f"{ev['accuracy']:.3f}")
            due = (
                (step % checkpoint_every == 0)
                if checkpoint_every
                else time.perf_counter() - last_save >= CHECKPOINT_SECONDS
            )
            if rank == 0 and due and step < total:
                save(step)
                last_save = time.perf_counter()
            bar.update(1)
    bar.close()
    hist.seconds = elapsed + time.perf_counter() - start
    results = _write_run(rank, world, config, folder, device, data, ref, net, hist, resumed_from)
    if world > 1:
        dist.barrier()  # nobody leaves the process group while rank 0 still writes
    return results


def _record(hist, step, stats, world, B, dist) -> bool:
    """The step's global loss and accuracy into ``hist``; False when the loss is not
    finite (the same global value on every rank: all stop)."""
    if world > 1:
        dist.all_reduce(stats)
    loss, accuracy = float(stats[0]) / B, float(stats[1]) / B
    hist.step.append(step)
    hist.loss.append(loss if np.isfinite(loss) else float("nan"))
    hist.accuracy.append(accuracy)
    if not np.isfinite(loss):
        hist.diverged = True
        return False
    return True


def _write_run(rank, world, config, folder, device, data, ref, net, hist, resumed_from) -> dict:
    """Rank 0: the final evaluation of a diverged run, and the run folder."""
    import torch

    if rank != 0:
        return {}
    if hist.diverged:
        images, labels = data.test
        hist.record_eval(hist.step[-1], _evaluate(net, images, labels, device))
    folder = Path(folder)
    name = "bn" if config.bn else "plain"
    results = {
        "experiment": "train",
        "engine": "torch",
        "device": device,
        "world_size": world,
        "dataset": data.name,
        "config": asdict(config),
        "title": f"{config.model.upper()} on {data.name} (PyTorch, {world} process"
        f"{'es' if world > 1 else ''})",
        "runs": {name: hist.to_dict()},
        "environment": {**environment(), "torch": torch.__version__},
        "run_dir": str(folder),
        "resumed_from": resumed_from,
    }
    write_json(folder / "results.json", results)
    report.write_report(results, folder)
    if not hist.diverged:  # a checkpoint holds finite weights only
        ref.load_state_dict({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
        save_checkpoint(
            folder / "checkpoint.npz",
            ref,
            config=asdict(config),
            step=hist.step[-1],
            test_accuracy=hist.test_accuracy[-1],
        )
    return results
