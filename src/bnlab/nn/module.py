"""``Parameter`` and ``Module``: the bookkeeping under every bnlab layer.

A ``Module`` owns parameters, buffers (non-learned state such as running statistics) and
child modules, in the order they were assigned, exactly like ``torch.nn.Module``, so that
``named_parameters()`` and ``state_dict()`` produce PyTorch's names and order
(``0.weight``, ``1.running_mean``, ...). Layers do the math with functions from
``bnlab.functional``; their ``backward(dy)`` returns ``dx`` and *accumulates* into each
parameter's ``.grad`` (call ``zero_grad()`` between steps).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np


class Parameter:
    """A learned array ``data`` with its gradient ``grad`` (same shape and dtype, zeros at start)."""

    def __init__(self, data):
        self.data = np.array(data)
        if not np.issubdtype(self.data.dtype, np.floating):
            raise TypeError(f"a Parameter must be floating point, got dtype {self.data.dtype}")
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class of every layer: parameters, buffers, children, train/eval, state dicts."""

    _parameters: OrderedDict[str, Parameter]
    _buffers: list[str]
    _modules: OrderedDict[str, Module]

    if TYPE_CHECKING:  # attributes are assigned freely (layers, parameters, buffers)

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", [])  # names, in registration order
        object.__setattr__(self, "_modules", OrderedDict())
        self.training = True

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value) -> None:
        """Non-learned state saved in the state dict (None buffers are left out of it)."""
        if name not in self._buffers:
            self._buffers.append(name)
        object.__setattr__(self, name, value)

    # --- forward / backward -------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    # --- traversal ----------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(name, Parameter) pairs with PyTorch's names and order."""
        for prefix, mod in self.named_modules():
            for name, p in mod._parameters.items():
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    def train(self, mode: bool = True) -> Module:
        for _, mod in self.named_modules():
            object.__setattr__(mod, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    # --- dtype conversion ---------------------------------------------------------------
    def to(self, dtype) -> Module:
        """Cast every parameter (``data`` and ``grad``) and floating buffer to ``dtype``, in
        place, and return the module (as ``torch.nn.Module.to(dtype)``). The Parameter
        objects stay the same, so an optimizer built before still holds them; integer
        buffers (``num_batches_tracked``) are left alone.
        """
        dt = np.dtype(dtype)
        if not np.issubdtype(dt, np.floating):
            raise TypeError(f"Module.to() takes a floating-point dtype, got {dt}")
        for _, mod in self.named_modules():
            for p in mod._parameters.values():
                p.data = p.data.astype(dt)
                p.grad = p.grad.astype(dt)
            for name in mod._buffers:
                value = getattr(mod, name)
                if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
                    object.__setattr__(mod, name, value.astype(dt))
        return self

    def double(self) -> Module:
        """``self.to(np.float64)``."""
        return self.to(np.float64)

    def float(self) -> Module:
        """``self.to(np.float32)``."""
        return self.to(np.float32)

    # --- state dicts --------------------------------------------------------------------
    def _state_items(self) -> Iterator[tuple[str, Module, str, str]]:
        """(key, owning module, attribute, kind) for every saved entry, in PyTorch's order."""
        for prefix, mod in self.named_modules():
            pre = f"{prefix}." if prefix else ""
            for name in mod._parameters:
                yield pre + name, mod, name, "parameter"
            for name in mod._buffers:
                if getattr(mod, name) is not None:
                    yield pre + name, mod, name, "buffer"

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Copies of every parameter and buffer as NumPy arrays, under PyTorch's keys.

        Integer buffers (``num_batches_tracked``) become 0-d int64 arrays, so
        ``{k: torch.from_numpy(v) for k, v in sd.items()}`` loads into the PyTorch twin.
        """
        out = OrderedDict()
        for key, mod, name, kind in self._state_items():
            value = getattr(mod, name)
            out[key] = value.data.copy() if kind == "parameter" else np.array(value, copy=True)
        return out

    def load_state_dict(self, state_dict) -> None:
        """Load arrays saved by :meth:`state_dict` (or a PyTorch state dict converted with
        ``.numpy()``). Keys must match exactly; shapes must match; floating values must be
        finite. Nothing is changed unless every entry is valid."""
        items = {key: (mod, name, kind) for key, mod, name, kind in self._state_items()}
        missing = [k for k in items if k not in state_dict]
        unexpected = [k for k in state_dict if k not in items]
        if missing or unexpected:
            raise KeyError(
                f"error loading state dict into {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        staged = []
        for key, (mod, name, kind) in items.items():
            new = np.asarray(state_dict[key])
            old = getattr(mod, name)
            old_arr = old.data if kind == "parameter" else np.asarray(old)
            if new.shape != old_arr.shape:
                raise ValueError(
                    f"size mismatch for {key}: expected shape {old_arr.shape}, got {new.shape}"
                )
            if np.issubdtype(new.dtype, np.floating) and not np.isfinite(new).all():
                raise ValueError(f"{key} contains NaN or inf")
            if np.issubdtype(old_arr.dtype, np.integer) and not np.issubdtype(
                new.dtype, np.integer
            ):
                raise TypeError(f"{key} must be an integer array, got dtype {new.dtype}")
            staged.append((mod, name, kind, new.astype(old_arr.dtype)))
        for mod, name, kind, value in staged:
            if kind == "parameter":
                getattr(mod, name).data = value
            elif isinstance(getattr(mod, name), (int, np.integer)):
                object.__setattr__(mod, name, int(value))
            else:
                object.__setattr__(mod, name, value)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            lines.append(f"  ({name}): " + repr(child).replace("\n", "\n  "))
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"
