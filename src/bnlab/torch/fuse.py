"""``fuse``: BN -> ReLU and BN -> add -> ReLU in a traced model become one module each.

    model = bnlab.torch.fuse(bnlab.torch.convert(resnet50()))

The model is traced with ``torch.fx`` (BN layers and bnlab's modules stay leaves), and two
patterns are rewritten where the intermediate results have no other use:

* ``relu(bn(x))``                 -> :class:`~bnlab.torch.BatchNormAct2d` ``(x)``
* ``relu(bn(x) + r)`` (either operand order, ``+=`` too)
                                  -> :class:`~bnlab.torch.BatchNormAddAct2d` ``(x, r)``

``bn`` is a ``torch.nn.BatchNorm2d`` or bnlab's ``BatchNorm2d`` (exactly those classes: a
variant or a user's subclass has its own forward); ``relu`` is ``torch.nn.ReLU``,
``torch.relu``, ``torch.nn.functional.relu`` or ``Tensor.relu`` (in place or not); ``+`` is
``operator.add``/``iadd``, ``torch.add`` or ``Tensor.add``/``add_`` without ``alpha``. The
fused module takes the BN's place and name, so it holds the same Parameter objects and
buffer tensors under the same state-dict keys (an optimizer built before still works), in
the same train/eval mode.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from . import batchnorm
from .convert import _retyped
from .variants import BatchNormAct2d, BatchNormAddAct2d, FrozenBatchNorm2d

_BN = (torch.nn.BatchNorm2d, batchnorm.BatchNorm2d)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _Tracer(torch.fx.Tracer):
    """torch's leaves, and every BN layer, torch's or bnlab's (their forwards pick engines,
    which tracing must not see)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(
            m, (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
        ) or super().is_leaf_module(m, qualname)


def _module(node: torch.fx.Node, modules: dict):
    return modules.get(node.target) if node.op == "call_module" else None


def _is_bn(node: torch.fx.Node, modules: dict) -> bool:
    return type(_module(node, modules)) in _BN and len(node.args) == 1 and not node.kwargs


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(_module(node, modules)) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _added(node: torch.fx.Node, operand: torch.fx.Node):
    """The other operand if ``node`` is ``operand + other`` (other a tensor node), else None."""
    plain = node.op == "call_function" and node.target in _ADD_FUNCTIONS
    method = node.op == "call_method" and node.target in ("add", "add_")
    if not (plain or method) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is operand else a if b is operand else None
    if not isinstance(other, torch.fx.Node) or other is operand:
        return None
    if method and node.target == "add_" and a is not operand:
        return None  # r.add_(bn(x)) writes into r: keep it as it is
    return other


def _only_user(node: torch.fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _replace(gm: torch.fx.GraphModule, target: str, cls: type) -> None:
    """The BN at ``target`` becomes a ``cls`` holding its tensors, under the same name."""
    new = _retyped(gm.get_submodule(target), cls)
    new.act = "relu"  # type: ignore[assignment]  # a plain attribute of the fused modules
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def fuse(model: torch.nn.Module) -> torch.fx.GraphModule:
    """``model`` traced (``torch.fx``) with BN -> ReLU and BN -> add -> ReLU rewritten into
    :class:`~bnlab.torch.BatchNormAct2d` and :class:`~bnlab.torch.BatchNormAddAct2d` (module
    docstring: which patterns).

    Args:
        model: a torch model that ``torch.fx`` can trace (no data-dependent control flow
            outside its leaf modules), with torch's or bnlab's ``BatchNorm2d`` layers; use
            :func:`bnlab.torch.convert` first for bnlab's kernels everywhere.

    Returns:
        A ``torch.fx.GraphModule`` computing the same function: training and evaluation
        outputs, gradients and running statistics equal the model's. It shares the model's
        Parameter objects and buffer tensors under the same state-dict keys (the model
        itself is not changed; its ReLU modules go unused where they were fused).

    Example:
        >>> fused = bnlab.torch.fuse(bnlab.torch.models.resnet18())
        >>> fused.get_submodule("layer1.0.bn2")    # BatchNormAddAct2d(64, ..., act='relu')
    """
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if not _is_bn(node, modules):
            continue
        user = _only_user(node)
        if user is None:
            continue
        if _is_relu(user, modules):
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            _replace(gm, node.target, BatchNormAct2d)
            continue
        other = _added(user, node)
        if (
            other is not None
            and other is user.args[0]
            and _is_bn(other, modules)
            and _only_user(other) is user
        ):
            continue  # bn_a(x) + bn_b(r): the first operand's BN takes the add (`out += r`)
        relu = _only_user(user) if other is not None else None
        if relu is None or not _is_relu(relu, modules):
            continue
        with gm.graph.inserting_before(user):  # where both x and the residual exist
            fused = gm.graph.call_module(node.target, (node.args[0], other))
        relu.replace_all_uses_with(fused)
        for dead in (relu, user, node):
            gm.graph.erase_node(dead)
        _replace(gm, node.target, BatchNormAddAct2d)
    gm.graph.lint()
    gm.recompile()
    _same_order(gm, model)
    return gm


def _same_order(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """gm's submodules registered in the model's order (GraphModule registers them in the
    order the graph uses them), so ``state_dict()`` lists the keys as the model does."""
    for name, original in model.named_modules():
        try:
            mine = gm.get_submodule(name) if name else gm
        except AttributeError:
            continue
        if mine is original:
            continue  # a shared leaf: its children are the model's own
        first = [k for k in original._modules if k in mine._modules]
        mine._modules = {
            k: mine._modules[k]
            for k in first + [k for k in mine._modules if k not in original._modules]
        }
