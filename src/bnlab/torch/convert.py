"""``convert`` and ``revert``: swap torch's BN layers for bnlab's and back, in place.

The swap keeps the module object's state (the same Parameter objects and buffer tensors,
so an optimizer built before keeps working; hooks; the train/eval flag) and only changes
its class, between classes that share every attribute. Only the exact torch classes are
swapped: a user's subclass of ``torch.nn.BatchNorm2d`` may have its own ``forward``.
"""

from __future__ import annotations

import torch

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

_TO_BNLAB: dict[type, type] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH = {v: k for k, v in _TO_BNLAB.items()}
# sync=True: every BN layer, torch's or bnlab's, becomes bnlab's SyncBatchNorm
_TO_SYNC = {cls: SyncBatchNorm for cls in (*_TO_BNLAB, BatchNorm1d, BatchNorm2d, BatchNorm3d)}


def _retyped(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """A new ``cls`` instance holding ``module``'s state: its tensors, not copies of them."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in module.__dict__:  # own containers, same tensors
            new.__dict__[key] = module.__dict__[key].copy()
    return new


def _swap(module: torch.nn.Module, table: dict, process_group=None) -> torch.nn.Module:
    out = _retyped(module, table[type(module)]) if type(module) in table else module
    if isinstance(out, (SyncBatchNorm, torch.nn.SyncBatchNorm)) and (
        process_group is not None or "process_group" not in out.__dict__
    ):
        out.process_group = process_group
    for name, child in list(out.named_children()):
        new = _swap(child, table, process_group)
        if new is not child:
            setattr(out, name, new)
    return out


def convert(module: torch.nn.Module, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by bnlab's, in place.

    Args:
        module: any torch model (nested Sequentials, residual blocks, a BN at the root).
        sync: convert every BN layer (torch's or bnlab's) to bnlab's
            :class:`~bnlab.torch.SyncBatchNorm` instead: statistics over all processes. A
            ``torch.nn.SyncBatchNorm`` becomes bnlab's ``SyncBatchNorm`` either way.
        process_group: the group SyncBatchNorm layers synchronize over (None: the default
            group, or what a converted ``torch.nn.SyncBatchNorm`` had).

    Returns:
        ``module``, or the new root if the root itself was a BN layer (as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).

    Example:
        >>> model = bnlab.torch.convert(model)   # optimizer, state dict, mode: unchanged
        >>> model = bnlab.torch.convert(model, sync=True)   # before DistributedDataParallel
    """
    return _swap(module, _TO_SYNC if sync else _TO_BNLAB, process_group)


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`convert`: torch's own BN classes back, same tensors (bnlab's
    ``SyncBatchNorm`` becomes ``torch.nn.SyncBatchNorm``)."""
    return _swap(module, _TO_TORCH)
