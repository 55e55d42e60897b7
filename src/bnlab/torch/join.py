"""Uneven inputs: bnlab's SyncBatchNorm in ``torch.distributed.algorithms.Join``.

    with Join(bnlab.torch.joinables(ddp_model)):
        for x, y in my_shard:                  # shards of different lengths
            loss_fn(ddp_model(x), y).backward(); opt.step(); opt.zero_grad()

A rank that has run out of data keeps *shadowing* the collectives of the ranks that have
not, so they continue: DDP's (buffer sync and gradient all-reduce, with zero gradients:
DDP's own join hook) and every SyncBatchNorm layer's (the forward's statistics all-reduce
and the backward's, with an empty contribution: the statistics of each step are those of
the ranks that still have data; every rank's running statistics stay identical).

Why the order cannot deadlock. An active rank's step issues, in order: Join's count of
active ranks and DDP's buffer sync (DDP's forward starts), the SyncBatchNorm layers'
forward all-reduces, then in the backward their all-reduces and DDP's gradient buckets.
DDP's join hook waits for its gradient all-reduces; a BN shadow run after it (the naive
``Join([ddp_model, bn_joinable])``) waits forever, because the active ranks reach their
gradient all-reduces only after the BN collectives of their forward. So :func:`joinables`
gives Join one joinable for both, whose hook runs DDP's hook with the BN shadows inserted
just before DDP's gradient all-reduces: forwards in call order, then backwards in reverse.
The SyncBatchNorm layers move to a process group of their own, so the backward's BN
all-reduces and DDP's asynchronous buckets cannot be paired with each other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable, JoinHook

from .sync import SyncBatchNorm


def _shadow(layers: list[SyncBatchNorm], device) -> None:
    """One training step of every SyncBatchNorm layer with an empty batch (0 samples):
    forwards in call order, backwards in reverse, as an active rank's step runs them."""
    with torch.enable_grad():
        steps = []
        for bn in layers:
            dtype = bn.weight.dtype if bn.weight is not None else torch.float32
            x = torch.zeros((0, bn.num_features), dtype=dtype, device=device, requires_grad=True)
            was_training = bn.training
            bn.train()
            steps.append((bn(x), was_training, bn))
        for y, was_training, bn in reversed(steps):
            y.backward(torch.zeros_like(y))
            bn.train(was_training)


class _JoinHook(JoinHook):
    """DDP's join hook with the BN shadows before its gradient all-reduces."""

    def __init__(self, joinable: DDPWithSyncBN, ddp_hook: JoinHook):
        self.joinable, self.ddp_hook = joinable, ddp_hook

    def main_hook(self) -> None:
        ddp, done = self.joinable.ddp, []
        real = ddp._match_all_reduce_for_bwd_pass

        def bn_then_gradients():
            _shadow(self.joinable.order(), self.joinable.join_device)
            done.append(True)
            real()

        ddp._match_all_reduce_for_bwd_pass = bn_then_gradients  # this step only
        try:
            self.ddp_hook.main_hook()
        finally:
            del ddp._match_all_reduce_for_bwd_pass
        if not done:  # a step without gradient sync (no_sync): the BN collectives still run
            _shadow(self.joinable.order(), self.joinable.join_device)

    def post_hook(self, is_last_joiner: bool) -> None:
        self.ddp_hook.post_hook(is_last_joiner)


class DDPWithSyncBN(Joinable):
    """A DDP model and its SyncBatchNorm layers as one Joinable (:func:`joinables`). Join's
    configuration of it is DDP's too, so DDP's forward takes part as it does alone."""

    def __init__(self, ddp, layers: list[SyncBatchNorm]):
        self.ddp, self.layers = ddp, layers
        self.called: list[SyncBatchNorm] = []  # call order, learnt from the forwards
        super().__init__()

    @property
    def _join_config(self):
        return self.ddp._join_config

    @_join_config.setter
    def _join_config(self, config) -> None:
        if hasattr(self, "ddp"):
            self.ddp._join_config = config

    def notify(self, bn: SyncBatchNorm) -> None:
        """Each layer's training forward: learn the order the layers are called in."""
        if bn not in self.called:
            self.called.append(bn)

    def order(self) -> list[SyncBatchNorm]:
        """The layers in the order a step calls them (the model's order until a forward
        has run on this rank: a rank with no data at all)."""
        return self.called if len(self.called) == len(self.layers) else self.layers

    def join_hook(self, **kwargs) -> JoinHook:
        return _JoinHook(self, self.ddp.join_hook(**kwargs))

    @property
    def join_device(self) -> torch.device:
        return self.ddp.join_device

    @property
    def join_process_group(self):
        return self.ddp.join_process_group


def joinables(ddp_model: torch.nn.parallel.DistributedDataParallel) -> list[Joinable]:
    """The Joinables for ``torch.distributed.algorithms.Join`` of a DDP model holding bnlab
    SyncBatchNorm layers: one, for DDP and the layers together (module docstring: why).
    Moves the layers that use the default group onto a new group of all ranks (a
    collective: call it on every rank, once, before training). A model without
    SyncBatchNorm: ``[ddp_model]``."""
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "joinables takes the DistributedDataParallel model (its join hook shadows the "
            f"gradient all-reduce), got {type(ddp_model).__name__}"
        )
    layers = [m for m in ddp_model.module.modules() if isinstance(m, SyncBatchNorm)]
    if not layers:
        return [ddp_model]
    groups = {id(m.process_group): m.process_group for m in layers}
    if len(groups) > 1:
        raise ValueError("joinables needs every SyncBatchNorm layer on the same process group")
    group = layers[0].process_group
    if group is None:
        group = dist.new_group(backend=dist.get_backend())  # BN's own: apart from DDP's
        for m in layers:
            m.process_group = group
    if not hasattr(ddp_model, "_match_all_reduce_for_bwd_pass"):
        raise RuntimeError(
            f"this torch ({torch.__version__}) has no DistributedDataParallel."
            "_match_all_reduce_for_bwd_pass, where bnlab inserts the BN shadows: Join with "
            "SyncBatchNorm is not available"
        )
    joinable = DDPWithSyncBN(ddp_model, layers)
    for m in layers:
        m.__dict__["_joinable"] = joinable
    return [joinable]
