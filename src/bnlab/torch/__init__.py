"""bnlab's batch norm inside PyTorch models (torch is optional: ``pip install bnlab[torch]``).

    model = bnlab.torch.convert(model)      # torch's BN layers -> bnlab's, same tensors

* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of torch's.
* :class:`SyncBatchNorm`: statistics over every process of a torch.distributed group.
* the BN family (:mod:`bnlab.torch.variants`): :class:`GhostBatchNorm1d`/``2d``,
  :class:`BatchRenorm1d`/``2d``, :class:`BatchNormAct2d`, :class:`BatchNormAddAct2d`,
  :class:`FrozenBatchNorm2d` and :func:`freeze`, :func:`fold_batchnorm`, :func:`recalibrate`.
* :func:`batch_norm`: ``torch.nn.functional.batch_norm`` with ``backend=``.
* :func:`accumulating`: gradient accumulation's running statistics; :func:`recalibrate`
  across ranks (:mod:`bnlab.torch.pooling`).
* :func:`convert` / :func:`revert`; :func:`fuse` (BN -> ReLU, BN -> add -> ReLU into one
  module each); :mod:`bnlab.torch.models`.

What runs where (numba, Triton, the reference in torch operations, torch's own kernel):
:mod:`bnlab.torch.engine`, one rule table for every module and function. The one
deliberate difference from torch (a NaN/inf batch does not poison the running
statistics): :mod:`bnlab.torch.functional`.
"""

from ..extras import need

need("torch", "bnlab.torch")  # without it: an ImportError naming bnlab[torch]

from . import models
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert, revert
from .doctor import doctor
from .functional import BACKENDS, batch_norm
from .fuse import fuse
from .join import joinables
from .pooling import accumulating
from .sync import SyncBatchNorm
from .variants import (
    BatchNormAct2d,
    BatchNormAddAct2d,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    fold_batchnorm,
    freeze,
    recalibrate,
)

__all__ = [
    "BACKENDS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BatchNormAddAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "SyncBatchNorm",
    "accumulating",
    "batch_norm",
    "convert",
    "doctor",
    "fold_batchnorm",
    "freeze",
    "fuse",
    "joinables",
    "models",
    "recalibrate",
    "revert",
]
