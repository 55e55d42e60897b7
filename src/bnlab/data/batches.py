"""A seeded mini-batch iterator."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def iterate_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    rng: np.random.Generator | int | None = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of ``(images[idx], labels[idx])`` mini-batches.

    Args:
        images: (N, ...) array; labels: (N,) array.
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: visit samples in a random order drawn from ``rng``; default True.
        drop_last: skip a final incomplete batch (useful with BN: a batch of one sample
            has no batch statistics); default False.
        rng: a Generator (advanced in place, so successive epochs differ) or a seed.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(images)
    if shuffle:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]
