"""Memory for large outputs, reused once nothing holds it (the NumPy kernels' and
bnlab.torch's).

Why: a fresh 16 MiB output is 4096 newly mapped 4 KiB pages, each a page fault and a page
the kernel zeroes on first write, and glibc hands out fresh mappings again and again when a
step allocates two large outputs at once (y kept for later layers while dx is allocated:
the heap grows by both, then is trimmed on free; tools/output_alloc.py measures what this
costs a bnlab.torch training step). So buffers of large outputs (``LARGE`` bytes
and more) are kept, at most ``KEEP`` bytes of them (the most recently used), and handed out
again once nothing else holds them. New ones start on a 2 MiB boundary and are advised to
use transparent huge pages.

:class:`Reuse` is the bookkeeping, once; a subclass says what a buffer is (its allocation,
address, size) and when something still holds it: :class:`NumpyOutputs` here (the
buffer's reference count: every view of an output refers to it) and bnlab.torch's outputs
(a torch storage's use count).
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from typing import Any

import numpy as np

LARGE = 4 << 20  # bytes: outputs from here on are reused (NumPy's huge-page threshold)
HUGE = 2 << 20  # a transparent huge page
_PAGE = 4096
_MADV_HUGEPAGE = 14


def _madvise():
    """libc's madvise, or None where there is none (then buffers take the kernel's default)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()


class Reuse:
    """Kept buffers for outputs of ``LARGE`` bytes and more (:meth:`take`)."""

    KEEP = 256 << 20

    def __init__(self) -> None:
        self._kept: list[tuple[Any, int]] = []  # (buffer, byte offset), most recent last
        self._lock = threading.Lock()

    # what a buffer is: a subclass's
    def allocate(self, nbytes: int) -> Any:
        raise NotImplementedError

    def address(self, buf: Any) -> int:
        raise NotImplementedError

    def nbytes(self, buf: Any) -> int:
        raise NotImplementedError

    def held(self, buf: Any) -> bool:
        """True while anything besides this bookkeeping refers to ``buf``."""
        raise NotImplementedError

    def take(self, n: int, make):
        """``make(buffer, offset)``, the output on a buffer with ``n`` bytes free from a 2 MiB
        boundary at ``offset``: a free kept buffer of that size, else a new one. ``make``
        runs under the lock, so the buffer is claimed (:meth:`held`) before another thread
        looks."""
        with self._lock:
            buf, offset = self._free(n) or self._new(n)
            return make(buf, offset)

    def _free(self, n: int):
        for i, (buf, offset) in enumerate(self._kept):
            if self.nbytes(buf) == n + HUGE and not self.held(buf):
                self._kept.append(self._kept.pop(i))
                return buf, offset
        return None

    def _new(self, n: int):
        buf = self.allocate(n + HUGE)
        base = self.address(buf)
        start = (base + HUGE - 1) & ~(HUGE - 1)
        if _MADVISE is not None:
            _MADVISE(start, (base + n + HUGE - start) & ~(_PAGE - 1), _MADV_HUGEPAGE)
        self._kept.append((buf, start - base))
        while sum(self.nbytes(b) for b, _ in self._kept) > self.KEEP and len(self._kept) > 1:
            self._kept.pop(0)  # forget the oldest (still in use or not)
        return self._kept[-1]

    def clear(self) -> None:
        """Forget every kept buffer (its memory is freed once no output uses it)."""
        with self._lock:
            self._kept.clear()


class NumpyOutputs(Reuse):
    """Outputs of the NumPy kernels: views of kept uint8 buffers. An output, and any view of
    it (NumPy collapses a view's ``base`` to the owning buffer), holds a reference to its
    buffer, so the buffer is free when its reference count is back to this class's own."""

    # references while _free checks one: the kept tuple, _free's loop variable, held's
    # argument and getrefcount's own
    _IDLE = 4

    def allocate(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def address(self, buf: np.ndarray) -> int:
        return buf.ctypes.data

    def nbytes(self, buf: np.ndarray) -> int:
        return buf.nbytes

    def held(self, buf: np.ndarray) -> bool:
        return sys.getrefcount(buf) > self._IDLE

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialized C-contiguous array (a reused buffer's view when large)."""
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        if n < LARGE:
            return np.empty(shape, dtype)
        return self.take(n, lambda buf, at: buf[at : at + n].view(dtype).reshape(shape))


OUTPUTS = NumpyOutputs()
