"""Running statistics from pooled batch statistics: gradient accumulation and precise BN
across ranks.

Both work the same way: while active, each BN layer of bnlab's (``BatchNorm1d/2d/3d``,
``SyncBatchNorm`` outside a process group, ``BatchNormAct2d``, ``BatchNormAddAct2d``) still
normalizes every training batch with that batch's own statistics, but hands them (count,
mean and M2 in float64, two-pass) to a *pool* instead of updating its running statistics;
the pool updates them through :func:`bnlab.torch.engine.update_running` (or
:func:`~bnlab.torch.engine.commit`), the one update every path uses, NaN guard included.

* :func:`accumulating` pools the K micro-batches of an optimizer step by Chan's merge of
  (count, mean, M2): one update per K forwards, equal to one batch of K*b.
* :func:`recalibrate` with a process group averages each batch's mean and unbiased
  variance over every batch of every rank (``torch.optim.swa_utils.update_bn``'s
  average, each batch weighted equally), in one all-reduce.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from . import engine, reference
from .batchnorm import _BatchNorm


def _moments(x: torch.Tensor, mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """count, mean and M2 = count * biased var of one batch, float64 (C,), two-pass."""
    mean, var, count = reference.statistics(x.detach().to(torch.float64), mask)
    return count, mean, var * count


class _Accumulate:
    """Chan's merge of the micro-batches' (count, mean, M2); one update per ``steps``."""

    def __init__(self, steps: int):
        self.steps = steps
        self.calls = 0
        self.state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def add(self, module, x: torch.Tensor, mask=None) -> None:
        n_b, mean_b, m2_b = _moments(x, mask)
        if self.state is None:
            self.state = n_b, mean_b, m2_b
        else:
            n_a, mean_a, m2_a = self.state
            n = n_a + n_b
            delta = mean_b - mean_a
            self.state = (
                n,
                mean_a + delta * (n_b / n),
                m2_a + m2_b + delta * delta * (n_a * n_b / n),
            )
        self.calls += 1
        if self.calls == self.steps:
            self.commit(module)

    def commit(self, module) -> None:
        """The pooled statistics into the running ones (nothing if nothing was pooled)."""
        if self.state is not None:
            n, mean, m2 = self.state
            engine.update_running(
                module.running_mean,
                module.running_var,
                module.num_batches_tracked,
                mean,
                m2 / n,
                n,
                module.momentum,
            )
        self.calls, self.state = 0, None


class _BatchAverage:
    """Each batch's mean and unbiased variance, summed (update_bn's average, later)."""

    def __init__(self):
        self.sums: tuple[torch.Tensor, torch.Tensor] | None = None
        self.batches = 0

    def add(self, module, x: torch.Tensor, mask=None) -> None:
        n, mean, m2 = _moments(x, mask)
        var = m2 / (n - 1)
        self.sums = (mean, var) if self.sums is None else (self.sums[0] + mean, self.sums[1] + var)
        self.batches += 1


def pooled_layers(model: torch.nn.Module, what: str) -> list[tuple[str, Any]]:
    """bnlab's BN layers of ``model`` that keep running statistics; a TypeError naming a BN
    layer that cannot pool (torch's own class: convert first; ghost batches and batch
    renormalization, whose statistics are not one batch's)."""
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
            continue
        if not getattr(m, "pools_statistics", False):  # bnlab's own, one batch's statistics
            raise TypeError(
                f"{what} pools BN statistics in bnlab's BatchNorm1d/2d/3d, SyncBatchNorm, "
                f"BatchNormAct2d and BatchNormAddAct2d; {name or 'the model'} is "
                f"{type(m).__module__}.{type(m).__name__}"
                + (" (bnlab.torch.convert(model) first)" if not isinstance(m, _BatchNorm) else "")
            )
        layers.append((name, m))
    return layers


@contextmanager
def accumulating(model: torch.nn.Module, steps: int):
    """Gradient accumulation's BN: inside the block, every BN layer of ``model`` updates its
    running statistics once per ``steps`` training forwards, with the pooled statistics of
    those micro-batches: the running_mean and running_var (unbiased with the pooled count)
    that one batch of ``steps * b`` would give, ``num_batches_tracked`` +1 per update.
    Micro-batches left over at exit are pooled into one last update. Each micro-batch is
    still *normalized* with its own statistics, as without accumulation: only the running
    statistics change.

    Example:
        >>> with bnlab.torch.accumulating(model, steps=4):
        ...     for i, (x, y) in enumerate(micro_batches):
        ...         loss_fn(model(x), y).div(4).backward()
        ...         if (i + 1) % 4 == 0:
        ...             opt.step(); opt.zero_grad()
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    layers = pooled_layers(model, "accumulating")
    for name, m in layers:
        if getattr(m, "process_group", None) is not None or (
            type(m).__name__ == "SyncBatchNorm"
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            raise TypeError(
                f"accumulating with SyncBatchNorm across processes ({name}) is not supported: "
                "its statistics are the global batch's, pooled across ranks in the forward"
            )
    pools = {m: _Accumulate(int(steps)) for _, m in layers}
    for m, pool in pools.items():
        m.__dict__["_bn_pool"] = pool  # read by the layers' forward (None on the class)
    try:
        yield model
    finally:
        for m, pool in pools.items():
            del m.__dict__["_bn_pool"]
            pool.commit(m)


def recalibrate_across(model: torch.nn.Module, batches, process_group=None) -> torch.nn.Module:
    """Precise BN over every rank's batches (:func:`bnlab.torch.recalibrate` with a process
    group): each rank runs its own ``batches`` (any number, 0 too) in train mode with each
    BN layer normalizing locally, then one all-reduce sums every layer's batch means,
    unbiased variances and batch count, and every rank sets the same running statistics:
    the averages over all batches (``num_batches_tracked`` = their number). Momenta and the
    model's mode are restored."""
    import torch.distributed as dist

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # its forward would broadcast buffers: ranks' counts differ
    layers = pooled_layers(model, "recalibrate")
    pools = {m: _BatchAverage() for _, m in layers}
    was_training = model.training
    for m, pool in pools.items():
        m.__dict__["_bn_pool"] = pool  # read by the layers' forward (None on the class)
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for m in pools:
            del m.__dict__["_bn_pool"]
        model.train(was_training)
    if not layers:
        return model
    device = layers[0][1].running_mean.device
    parts = []
    for m, pool in pools.items():
        zero = torch.zeros(m.num_features, dtype=torch.float64, device=device)
        parts += [zero, zero] if pool.sums is None else [t.to(device) for t in pool.sums]
    counts = torch.tensor(
        [float(p.batches) for p in pools.values()], dtype=torch.float64, device=device
    )
    flat = torch.cat([*parts, counts])
    dist.all_reduce(flat, group=process_group)  # one collective for every layer
    offset, total = 0, flat[-len(pools) :]
    for k, m in enumerate(pools):
        C = m.num_features
        s_mean, s_var = flat[offset : offset + C], flat[offset + C : offset + 2 * C]
        offset += 2 * C
        batches = total[k]
        if batches == 0:
            continue  # no batch anywhere: the layer keeps what it had
        m.reset_running_stats()
        engine.commit(((m.running_mean, s_mean / batches), (m.running_var, s_var / batches)))
        m.num_batches_tracked.fill_(int(batches))
    return model
