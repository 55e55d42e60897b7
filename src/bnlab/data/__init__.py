"""Datasets and batching.

``load(name, root=None)`` returns a :class:`Dataset` with fixed ``train`` and ``test``
splits of ``(images, labels)``: images float32 NCHW scaled to [0, 1], labels int64.
"""

from .batches import BatchStream, iterate_batches
from .datasets import DATASETS, Dataset, DatasetError, load
from .files import read_cifar10_tarball, read_idx

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "BatchStream",
    "iterate_batches",
    "load",
    "read_cifar10_tarball",
    "read_idx",
]
