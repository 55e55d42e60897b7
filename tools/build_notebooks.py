"""Build the lesson's notebooks from their sources (notebooks/*.py, percent format).

A source is Python with ``# %%`` code cells and ``# %% [markdown]`` text cells. Between
``# BEGIN SOLUTION`` and ``# END SOLUTION`` is the exercise's solution: the learner's
notebooks get a blank there (``# YOUR CODE HERE`` and ``raise NotImplementedError``);
``--solutions DIR`` writes the notebooks with the solutions in, which ``make test`` runs.

    .venv/bin/python tools/build_notebooks.py                    # src/bnlab/lesson/*.ipynb
    .venv/bin/python tools/build_notebooks.py --solutions DIR    # the solved ones, into DIR
    .venv/bin/python tools/build_notebooks.py --pages docs/lesson   # solved and executed:
                                                     # the documentation's pages (`make docs`)

The pages hide the solutions' code (cells tagged "solution": mkdocs-jupyter's
``remove_input_tags``) and show every output, made by the notebooks' own runs.

The learner's notebooks are package data (``bnlab lesson --out DIR`` copies them);
tests/test_lesson.py checks that the committed ones are what this tool builds.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks"
LESSON = ROOT / "src" / "bnlab" / "lesson"
BLANK = "# YOUR CODE HERE\nraise NotImplementedError(\"fill this in\")"


def cells(text: str, solutions: bool) -> list[tuple[str, str, list[str]]]:
    """(kind, source, tags) per cell: "markdown" or "code"."""
    out = []
    for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
        header, _, body = chunk.partition("\n")
        kind = "markdown" if "[markdown]" in header else "code"
        body = body.strip("\n")
        tags = []
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                             for line in body.splitlines())
        elif "# BEGIN SOLUTION" in body:
            tags = ["solution"]
            pattern = re.compile(r"^( *)# BEGIN SOLUTION\n.*?^ *# END SOLUTION\n?",
                                 re.M | re.S)
            if solutions:
                body = re.sub(r"^ *# (BEGIN|END) SOLUTION\n?", "", body, flags=re.M)
            else:
                body = pattern.sub(lambda m: "\n".join(m.group(1) + line
                                                       for line in BLANK.splitlines()) + "\n",
                                   body)
            body = body.rstrip("\n")
        out.append((kind, body, tags))
    return out


def build(source: Path, solutions: bool):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    for kind, body, tags in cells(source.read_text(), solutions):
        cell = (nbformat.v4.new_markdown_cell(body) if kind == "markdown"
                else nbformat.v4.new_code_cell(body))
        cell.pop("id", None)  # stable files: no random cell ids
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.nbformat_minor = 4  # ids are optional before 4.5
    return nb


def write(nb, path: Path) -> None:
    import nbformat

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(nbformat.writes(nb) + "\n")
    tmp.replace(path)  # atomically


def execute(nb, timeout: int = 600):
    """Run every cell (a fresh kernel, in a temporary folder), outputs kept."""
    import tempfile

    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as cwd:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": cwd}}).execute()
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--solutions", metavar="DIR", help="write the solved notebooks into DIR")
    p.add_argument("--pages", metavar="DIR", help="write them solved and executed into DIR")
    args = p.parse_args(argv)
    out = Path(args.pages or args.solutions or LESSON)
    solved = bool(args.solutions or args.pages)
    for source in sorted(SOURCES.glob("[0-9]*.py")):
        nb = build(source, solved)
        if args.pages:
            nb = execute(nb)
        write(nb, out / f"{source.stem}.ipynb")
        print(out / f"{source.stem}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
