"""The package's shape: layers that import only downward, no cycles, no private names
across packages (tools/import_graph.py), every public name exported and documented, the
extras' errors, and the README as the front door."""

import ast
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPH = runpy.run_path(str(ROOT / "tools" / "import_graph.py"), run_name="import_graph")


def test_imports_go_downward_without_cycles_or_private_names():
    assert GRAPH["check"]() == []
    # and the check sees real edges (a broken parser would find nothing wrong)
    edges = GRAPH["edges"]()
    assert ("bnlab.functional.batchnorm", "bnlab.kernels") in edges
    assert ("bnlab.torch._ops", "bnlab.functional") in edges
    assert len(edges) > 100


def test_the_check_finds_an_upward_import_a_cycle_and_a_private_use(tmp_path, monkeypatch):
    """The same check on a made-up package: each kind of violation is reported."""
    pkg = tmp_path / "bnlab"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "nn").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("from ..nn import layers\n")
    (pkg / "nn" / "__init__.py").write_text("")
    (pkg / "nn" / "layers.py").write_text("from . import module\nfrom ..kernels import _x\n")
    (pkg / "nn" / "module.py").write_text("from . import layers\n")
    monkeypatch.setitem(GRAPH["check"].__globals__, "SRC", tmp_path)
    found = GRAPH["check"]()
    assert any(f.startswith("upward: bnlab.kernels ") for f in found), found
    assert any(f.startswith("cycle:") and "bnlab.nn.module" in f for f in found), found
    assert any(f.startswith("private: bnlab.nn.layers imports _x") for f in found), found


def test_the_architecture_page_draws_the_current_graph():
    svg = (ROOT / "docs" / "architecture-imports.svg").read_text()
    packages = {GRAPH["_package"](m) for m in GRAPH["modules"]()}
    for p in packages:
        assert f">{p.removeprefix('bnlab.')}<" in svg, p
    assert "architecture-imports.svg" in (ROOT / "docs" / "architecture.md").read_text()


def _public_defs(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and not n.name.startswith("_")}


def test_functional_exports_every_public_name_it_defines():
    import bnlab.functional as F

    defined = set()
    for path in (ROOT / "src" / "bnlab" / "functional").glob("[!_]*.py"):
        defined |= _public_defs(path)
    defined |= {"check_float"}  # from its private helpers module, on purpose
    assert defined <= set(F.__all__), defined - set(F.__all__)
    for name in F.__all__:
        assert getattr(F, name) is not None
    import bnlab.torch as bt

    for name in bt.__all__:
        assert hasattr(bt, name), name


def test_every_public_name_is_on_the_api_site():
    """Each module of bnlab.functional, bnlab.nn and bnlab.torch holding a public name of
    its package is rendered by a `::: module` directive (or the name's own)."""
    import bnlab.functional as F
    import bnlab.nn as nn
    import bnlab.torch as bt

    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = {line.split(":::", 1)[1].strip() for line in pages.splitlines()
                  if line.startswith(":::")}
    for package in (F, nn, bt):
        for name in package.__all__:
            obj = getattr(package, name)
            where = getattr(obj, "__module__", None) or package.__name__
            if isinstance(obj, type(sys)):  # a submodule (bnlab.torch.models)
                where = obj.__name__
            assert where in documented or f"{where}.{name}" in documented or \
                f"{package.__name__}.{name}" in documented, (name, where)


def test_a_missing_extra_names_it():
    """Without the lab's libraries: a lab command prints one line naming bnlab[lab] and
    exits 2; the core imports."""
    code = ("import sys\n"
            "for m in ('mlxtend', 'matplotlib', 'pooch', 'tqdm', 'sklearn'):\n"
            "    sys.modules[m] = None\n"
            "import bnlab, bnlab.nn\n"
            "from bnlab.cli import main\n"
            "sys.exit(main(['steps', '--batch-size', '4']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'bnlab[lab]'" in lines[0], lines
    from bnlab.extras import MissingExtra, need

    with pytest.raises(MissingExtra, match=r"pip install 'bnlab\[lab\]'"):
        need("sklearn.not_a_module_anywhere_x", "this")  # a missing submodule of an extra
    assert need("numpy").__name__ == "numpy"


def test_the_readme_is_the_front_door():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert text.index("make demo") < text.index("## ")  # before any section
    for page in ("docs/architecture.md", "docs/performance.md", "CHANGELOG.md"):
        assert page in text, page
    version = __import__("bnlab").__version__
    assert f'version = {{ attr = "bnlab.__version__" }}' in (ROOT / "pyproject.toml").read_text()
    assert version.count(".") == 2
