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


class BatchStream:
    """Full mini-batches epoch after epoch (shuffled by ``rng``, ``drop_last``), resumable:
    :meth:`state` says where the stream is (the generator's state when this epoch's order
    was drawn, and how many of its batches were taken), :meth:`restore` goes back there, so
    a resumed run draws exactly the batches an uninterrupted one would.

    Example:
        >>> stream = BatchStream(images, labels, 64, np.random.default_rng(0))
        >>> xb, yb = next(stream)
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator
    ):
        self.images, self.labels, self.batch_size, self.rng = images, labels, batch_size, rng
        self._epoch: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self._start: dict = {}  # the generator's state when this epoch's order was drawn
        self._taken = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        while True:
            if self._epoch is None:
                self._start = dict(self.rng.bit_generator.state)
                self._epoch = iterate_batches(
                    self.images,
                    self.labels,
                    self.batch_size,
                    shuffle=True,
                    drop_last=True,
                    rng=self.rng,
                )
                self._taken = 0
            try:
                batch = next(self._epoch)
            except StopIteration:
                self._epoch = None
                continue
            self._taken += 1
            return batch

    def state(self) -> dict:
        """JSON-able: the epoch's starting generator state and the batches taken."""
        return {
            "epoch_start": self._start,
            "taken": self._taken,
            "in_epoch": self._epoch is not None,
        }

    def restore(self, state: dict) -> None:
        if not state.get("in_epoch"):
            self._epoch = None
            return
        self.rng.bit_generator.state = state["epoch_start"]
        self._epoch = None
        for _ in range(int(state["taken"])):
            next(self)
