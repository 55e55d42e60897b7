"""Processes for data-parallel training: start them, join them, never hang.

* :func:`launch` starts N local worker processes (spawned: a fresh interpreter each, as
  CUDA needs), joins a torch.distributed process group over TCP in each (gloo on CPU,
  NCCL on CUDA), runs ``fn(rank, world_size, *args)`` and waits. A worker that raises or
  dies ends the whole job: the others are stopped and a :class:`WorkerFailed` names the
  rank, within about a second of the failure (or, for a rank that hangs, when the
  process group's ``timeout`` makes its peers' collectives fail). Ctrl-C stops every
  worker.
* :func:`init_from_env` is the same process group for a process started by ``torchrun``
  (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and LOCAL_RANK for the GPU), so several
  machines work the same way.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait for a peer before failing


class WorkerFailed(RuntimeError):
    """A worker process raised or died; ``rank`` says which."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def init(
    rank: int,
    world_size: int,
    addr: str,
    port: int,
    backend: str = "gloo",
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Join the process group of ``world_size`` processes rendezvousing at addr:port."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )


def init_from_env(backend: str = "gloo", timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Join the process group described by torchrun's variables; returns (rank, world size)."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(f"not started by torchrun: {', '.join(missing)} not set")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store and keeps it across restarts (--max-restarts):
        # each attempt's process group gets keys of its own, so a restarted group never
        # reads the addresses of the processes it replaces
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timedelta(seconds=timeout),
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"bnlab/attempt_{attempt}/", store),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
    else:
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def _entry(rank, fn, world_size, addr, port, backend, timeout, threads, args):
    if threads is not None:
        torch.set_num_threads(threads)
    init(rank, world_size, addr, port, backend, timeout)
    try:
        fn(rank, world_size, *args)
        # what fn built (DDP's reducer, its hooks) goes before the group does, and nobody
        # leaves while a peer still talks: gloo aborts a process whose threads outlive it
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def _worker_environment(threads: int | None):
    """Thread counts for the spawned workers, set in the environment they inherit: numba's
    pool (read when numba starts) and OpenMP's. With 2 workers on 2 cores, numba's default
    pool of one thread per core made each worker's BN wait for the other's threads: a torch
    seed-CNN forward took 14 ms instead of 5 (measured with tools/scaling.py's worker)."""
    if threads is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    os.environ.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(
    fn,
    nproc: int,
    args=(),
    backend: str = "gloo",
    timeout: float = DEFAULT_TIMEOUT,
    deadline: float | None = None,
    threads: int | None = None,
    addr: str = "127.0.0.1",
) -> None:
    """Run ``fn(rank, nproc, *args)`` in ``nproc`` spawned processes in one process group.

    ``fn`` must be importable by name (a module-level function). ``timeout``: the process
    group's, for every collective. ``deadline``: seconds for the whole job (None: no
    limit), after which every worker is stopped and TimeoutError raised. ``threads``:
    threads per worker for torch, numba and OpenMP (None: their defaults, one per core
    each: oversubscribed when several workers share the cores).

    Raises :class:`WorkerFailed` naming the first rank that raised or died.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    port = free_port(addr)
    with _worker_environment(threads):
        context = mp.start_processes(
            _entry,
            args=(fn, nproc, addr, port, backend, timeout, threads, args),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
    start = time.monotonic()
    try:
        while not context.join(timeout=0.5):
            if deadline is not None and time.monotonic() - start > deadline:
                raise TimeoutError(f"the {nproc} workers did not finish within {deadline:g} s")
    except mp.ProcessRaisedException as e:
        raise WorkerFailed(
            e.error_index, f"worker rank {e.error_index} failed:\n{_last_lines(str(e))}"
        ) from None
    except mp.ProcessExitedException as e:
        how = (
            f"was killed by signal {e.signal_name}"
            if e.signal_name
            else f"exited with code {e.exit_code}"
        )
        raise WorkerFailed(
            e.error_index, f"worker rank {e.error_index} {how}; the other workers were stopped"
        ) from None
    finally:
        for p in context.processes:  # Ctrl-C, a deadline, a failure: nobody left behind
            if p.is_alive():
                p.terminate()
        for p in context.processes:
            p.join(5)
            if p.is_alive():
                p.kill()


def _last_lines(text: str, n: int = 12) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[-n:])
