"""bnlab's import graph, from the source: which module imports which, by layer.

Every ``import`` and ``from ... import`` of a bnlab module anywhere in a module's source
(inside functions too) is an edge. Layers, lowest first (a module may import its own layer
and the ones below it, never one above):

    kernels      bnlab.kernels (the fused CPU kernels), bnlab.extras
    functional   bnlab.functional (the math, dispatching to the kernels)
    nn           bnlab.nn, bnlab.models, bnlab.doctor (NumPy layers, models, the doctor's rules)
    torch        bnlab.torch (torch modules on the same math and kernels), and
                 bnlab.kernels.triton_bn (the GPU kernels, which take torch tensors)
    lab          bnlab.data, bnlab.train, bnlab.report, bnlab.bench, bnlab.bench_gpu,
                 bnlab.experiments, bnlab.explain, bnlab.exercises (data, training, plots,
                 experiments, the lesson's grader)
    cli          bnlab.cli, bnlab.__main__ (the command), bnlab (the package's front door)

    .venv/bin/python tools/import_graph.py --svg docs/architecture-imports.svg

``check()`` returns the violations (an edge upward, a cycle); tests/test_layout.py requires
none. ``--svg`` draws the graph (modules in their layer's row, edges between packages) with
matplotlib, for docs/architecture.md.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LAYERS = ("kernels", "functional", "nn", "torch", "lab", "cli")
_PREFIXES = (  # (module prefix, layer), longest prefix first
    # the Triton kernels take torch tensors: they sit in bnlab/kernels/ (the design's file
    # layout) but belong to the torch layer, and only bnlab.torch loads them
    ("bnlab.kernels.triton_bn", "torch"),
    ("bnlab.kernels", "kernels"), ("bnlab.extras", "kernels"),
    ("bnlab.functional", "functional"),
    ("bnlab.nn", "nn"), ("bnlab.models", "nn"), ("bnlab.doctor", "nn"),
    ("bnlab.torch", "torch"),
    ("bnlab.data", "lab"), ("bnlab.train", "lab"), ("bnlab.report", "lab"),
    ("bnlab.bench_gpu", "lab"), ("bnlab.bench", "lab"), ("bnlab.experiments", "lab"),
    ("bnlab.explain", "lab"), ("bnlab.exercises", "lab"),
    ("bnlab.cli", "cli"), ("bnlab.__main__", "cli"),
)


def layer_of(module: str) -> str:
    for prefix, layer in _PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module == "bnlab":
        return "cli"
    raise ValueError(f"{module}: in no layer (tools/import_graph.py's table)")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "bnlab").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, level: int, here: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def edges() -> set[tuple[str, str]]:
    """(importer, imported) for every import of a bnlab module, to the deepest module that
    exists (``from . import functional as F`` is an edge to bnlab.functional)."""
    mods = modules()
    out = set()
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, mod, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t.startswith("bnlab") and t != mod and not mod.startswith(t + "."):
                    out.add((mod, t))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check() -> list[str]:
    """Violations: an import from a lower layer to a higher one, a cycle of modules (a
    package's ``__init__`` importing its own modules is not one: it is the package), or a
    private name of one package used from another."""
    found = []
    es = edges()
    for a, b in sorted(es):
        if LAYERS.index(layer_of(a)) < LAYERS.index(layer_of(b)):
            found.append(f"upward: {a} ({layer_of(a)}) imports {b} ({layer_of(b)})")
    graph: dict[str, set[str]] = {}
    for a, b in es:
        graph.setdefault(a, set()).add(b)
    found += [f"cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return found + private_uses()


def _package(module: str) -> str:
    if module.startswith("bnlab.kernels.triton_bn"):
        return "bnlab.kernels.triton_bn"  # drawn in its own layer (see _PREFIXES)
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def private_uses() -> list[str]:
    """Private names (``_x``) of one bnlab package used from another: ``from P import _x``
    and ``alias._x`` with ``alias`` a module of P."""
    mods = modules()
    found = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, mod, is_package)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__") and \
                            base.startswith("bnlab") and _package(base) != _package(mod):
                        found.append(f"private: {mod} imports {a.name} from {base}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.attr.startswith("_") and not node.attr.startswith("__"):
                target = aliases.get(node.value.id)
                if target and _package(target) != _package(mod):
                    found.append(f"private: {mod} uses {node.value.id}.{node.attr} of {target}")
    return sorted(set(found))


def draw(path: Path) -> None:
    """Packages in their layer's row (lowest at the bottom), an arrow per package pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: small, searchable
    matplotlib.rcParams["svg.hashsalt"] = "bnlab"  # the same file for the same graph
    es = {(_package(a), _package(b)) for a, b in edges()}
    es = {(a, b) for a, b in es if a != b}
    nodes = sorted({n for e in es for n in e} | {_package(m) for m in modules()})
    rows: dict[str, list[str]] = {layer: [] for layer in LAYERS}
    for n in nodes:
        rows[layer_of(n)].append(n)
    pos = {}
    for y, layer in enumerate(LAYERS):
        names = rows[layer]
        for i, n in enumerate(names):
            pos[n] = ((i + 1) / (len(names) + 1), y)
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for a, b in sorted(es):
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", xy=(x1, y1 + 0.12), xytext=(x0, y0 - 0.12),
                    arrowprops=dict(arrowstyle="->", color="#8899aa", lw=0.8,
                                    connectionstyle="arc3,rad=0.08"))
    for n, (x, y) in pos.items():
        ax.text(x, y, n.removeprefix("bnlab."), ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round,pad=0.3", fc="#eef3fb", ec="#1f77b4"))
    for y, layer in enumerate(LAYERS):
        ax.text(-0.02, y, layer, ha="right", va="center", fontsize=10, weight="bold")
    ax.set_xlim(-0.15, 1.02)
    ax.set_ylim(-0.5, len(LAYERS) - 0.5)
    ax.axis("off")
    ax.set_title("bnlab's import graph (generated by tools/import_graph.py): arrows point "
                 "from importer to imported, always downward", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="svg", metadata={"Date": None})
    plt.close(fig)
    tmp.replace(path)  # atomically


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--svg", help="draw the graph into this SVG file")
    args = p.parse_args(argv)
    problems = check()
    for line in problems:
        print(line)
    if args.svg:
        draw(Path(args.svg))
    print(f"{len(edges())} imports between bnlab modules; {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
