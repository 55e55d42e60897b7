"""Fast paths with the reference's semantics (see :mod:`bnlab.functional`).

``backend`` arguments take "auto" (numba when it imports, else NumPy), "numpy" (the
reference) or "numba". The environment variable ``BNLAB_BACKEND`` changes what "auto"
means. Kernels receive validated, contiguous float32/float64 arrays and return arrays;
all checks and conventions stay in ``functional.py``.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "numpy", "numba")
_loaded = {}


def _numba_module():
    if "numba" not in _loaded:
        try:
            from . import numba_bn
        except ImportError as e:  # numba missing or broken: the reference still works
            _loaded["numba"] = e
        else:
            _loaded["numba"] = numba_bn
    return _loaded["numba"]


def resolve(backend: str = "auto"):
    """The kernel module for ``backend``, or None for the NumPy reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("BNLAB_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"BNLAB_BACKEND must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            mod = _numba_module()
            return None if isinstance(mod, ImportError) else mod
    if backend == "numpy":
        return None
    mod = _numba_module()
    if isinstance(mod, ImportError):
        raise ImportError(f'backend="numba" needs numba, which failed to import: {mod}')
    return mod
