"""Fast paths with the reference's semantics (see :mod:`bnlab.functional`).

``backend`` arguments take "auto" (numba when it imports, else NumPy), "numpy" (the
reference) or "numba". The environment variable ``BNLAB_BACKEND`` changes what "auto"
means. Kernels receive validated, contiguous float32/float64 arrays and return arrays;
all checks and conventions stay in :mod:`bnlab.functional`.

Threads: large tensors use all of numba's threads (``NUMBA_NUM_THREADS``), small ones one;
``num_threads(n)`` caps them for a block of code (``bnlab.train`` uses ``num_threads(1)``
because BN there sits between multi-threaded GEMMs), and ``BNLAB_NUM_THREADS`` sets the
cap for a whole process.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import numpy as np

BACKENDS = ("auto", "numpy", "numba")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # compute dtypes the kernels take
_loaded: dict[str, object] = {}


def numba_module():
    if "numba" not in _loaded:
        try:
            from . import numba_bn
        except ImportError as e:  # numba missing or broken: the reference still works
            _loaded["numba"] = e
        else:
            _loaded["numba"] = numba_bn
    return _loaded["numba"]


def missing_numba_message() -> str:
    """What a missing numba costs, said once (by :func:`resolve` and bnlab.torch's engine
    layer)."""
    return (
        f"bnlab: numba failed to import ({numba_module()}), so bnlab's fused CPU kernels "
        "are unavailable: NumPy calls run the NumPy reference instead (a training "
        "forward+backward about 9x slower in docs/bench/run-7.json, one run) and "
        "bnlab.torch runs torch's own kernel on CPU; pip install numba"
    )


_said: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its interpreter, on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str = "auto", dtype=None):
    """The kernel module for ``backend``, or None for the NumPy reference.

    ``dtype`` is the compute dtype of the call: "auto" takes the reference for a dtype the
    kernels lack (longdouble), an explicit "numba" refuses it with a TypeError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("BNLAB_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"BNLAB_BACKEND must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            mod = numba_module()
            if isinstance(mod, ImportError):
                warn_once("numba", missing_numba_message())
                return None
            if dtype is not None and dtype not in DTYPES:
                return None
            return mod
    if backend == "numpy":
        return None
    mod = numba_module()
    if isinstance(mod, ImportError):
        raise ImportError(f'backend="numba" needs numba, which failed to import: {mod}')
    if dtype is not None and dtype not in DTYPES:
        raise TypeError(
            f'backend="numba" computes in float32 or float64 (float16 through '
            f'float32), got {np.dtype(dtype)}; use backend="numpy" for it'
        )
    return mod


@contextmanager
def num_threads(n: int | None):
    """Cap the fused kernels at ``n`` threads inside the block (None: no cap)."""
    if n is not None and (int(n) != n or n < 1):
        raise ValueError(f"num_threads must be a positive integer or None, got {n!r}")
    mod = numba_module()
    if isinstance(mod, ImportError):
        yield
        return
    previous = mod.max_threads
    mod.max_threads = None if n is None else int(n)
    try:
        yield
    finally:
        mod.max_threads = previous
