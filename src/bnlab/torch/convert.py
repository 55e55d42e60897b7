"""``convert`` and ``revert``: swap torch's BN layers for bnlab's and back, in place.

The swap keeps the module object's state (the same Parameter objects and buffer tensors,
so an optimizer built before keeps working; hooks; the train/eval flag) and only changes
its class, between classes that share every attribute. Only the exact torch classes are
swapped: a user's subclass of ``torch.nn.BatchNorm2d`` may have its own ``forward``.
"""

from __future__ import annotations

import torch

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

_TO_BNLAB = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
             torch.nn.BatchNorm3d: BatchNorm3d}
_TO_TORCH = {v: k for k, v in _TO_BNLAB.items()}


def _retyped(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new ``cls`` instance holding ``module``'s state: its tensors, not copies of them."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in module.__dict__:  # own containers, same tensors
            new.__dict__[key] = module.__dict__[key].copy()
    return new


def _swap(module: torch.nn.Module, table: dict) -> torch.nn.Module:
    out = _retyped(module, table[type(module)]) if type(module) in table else module
    for name, child in list(out.named_children()):
        new = _swap(child, table)
        if new is not child:
            setattr(out, name, new)
    return out


def convert(module: torch.nn.Module, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` by bnlab's, in place.

    Args:
        module: any torch model (nested Sequentials, residual blocks, a BN at the root).
        sync: convert to bnlab's ``SyncBatchNorm`` instead. Not available yet: bnlab has no
            SyncBatchNorm so far, and ``sync=True`` (or a ``torch.nn.SyncBatchNorm`` in the
            model) is a NotImplementedError rather than a silent non-synced model.
        process_group: for ``sync=True``.

    Returns:
        ``module``, or the new root if the root itself was a BN layer (as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).

    Example:
        >>> model = bnlab.torch.convert(model)   # optimizer, state dict, mode: unchanged
    """
    del process_group
    if sync or any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
        raise NotImplementedError(
            "bnlab has no SyncBatchNorm yet: convert(sync=True) and models holding "
            "torch.nn.SyncBatchNorm cannot be converted; use sync=False on a model without it")
    return _swap(module, _TO_BNLAB)


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`convert`: torch's own BN classes back, same tensors."""
    return _swap(module, _TO_TORCH)
