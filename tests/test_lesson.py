"""The lesson's notebooks: built from notebooks/*.py with blanks for the learner
(src/bnlab/lesson/, what `bnlab lesson` copies), executed here with the solutions filled in
(each exercise's grader must say it passed), the documentation's executed pages in sync
with the sources, and `bnlab lesson` itself."""

import json
import runpy
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
TOOL = runpy.run_path(str(ROOT / "tools" / "build_notebooks.py"), run_name="build_notebooks")
SOURCES = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


def code(nb) -> list[str]:
    return [c.source for c in nb.cells]


def test_five_notebooks_in_the_lessons_order():
    assert [s.stem for s in SOURCES] == ["01_why_normalize", "02_four_steps", "03_backward",
                                         "04_where_bn_goes", "05_bn_in_pytorch"]


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_the_learners_notebooks_are_the_build_with_blanks(source):
    committed = nbformat.read(ROOT / "src" / "bnlab" / "lesson" / f"{source.stem}.ipynb", 4)
    assert code(committed) == code(TOOL["build"](source, False))
    exercises = [c for c in committed.cells if "solution" in c.metadata.get("tags", [])]
    assert exercises, "every notebook has an exercise"
    solved = TOOL["build"](source, True)
    solutions = [c for c in solved.cells if "solution" in c.metadata.get("tags", [])]
    for blank, full in zip(exercises, solutions):
        assert "raise NotImplementedError" in blank.source
        assert "BEGIN SOLUTION" not in blank.source and "BEGIN SOLUTION" not in full.source
        # the solution's own lines are not in the learner's notebook
        hidden = set(full.source.splitlines()) - set(blank.source.splitlines())
        assert hidden and not any(line.strip() and line in blank.source for line in hidden)
    # the pages' sources are the solved build (their outputs come from running it)
    page = nbformat.read(ROOT / "docs" / "lesson" / f"{source.stem}.ipynb", 4)
    assert code(page) == code(solved)
    assert any(o.get("output_type") for c in page.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_the_solved_notebook_runs_and_its_exercises_pass(source):
    nb = TOOL["execute"](TOOL["build"](source, True), timeout=300)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    # every grader call prints its verdict: each one a pass
    checks = source.read_text().count("print(check_")
    verdicts = [line for line in text.splitlines()
                if line.startswith(("forward:", "backward:", "train and eval:",
                                    "autograd Function:"))]
    assert len(verdicts) == checks, verdicts
    assert all("correct" in v for v in verdicts), verdicts


def test_a_blank_notebook_says_what_to_do():
    """The learner's notebook runs until its first exercise, which asks for code."""
    source = ROOT / "src" / "bnlab" / "lesson" / "02_four_steps.ipynb"
    nb = nbformat.read(source, 4)
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        TOOL["execute"](nb, timeout=120)


def test_bnlab_lesson_copies_them(tmp_path, capsys):
    from bnlab.cli import main

    out = tmp_path / "my-lesson"
    assert main(["lesson", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"jupyter lab {out}" in said
    names = sorted(p.name for p in out.glob("*.ipynb"))
    assert len(names) == 5
    assert json.loads((out / names[0]).read_text())["nbformat"] == 4
    (out / names[0]).write_text("my work")
    assert main(["lesson", "--out", str(out)]) == 2  # never over a learner's work
    assert "exists" in capsys.readouterr().err
    assert (out / names[0]).read_text() == "my work"
    assert main(["lesson", "--out", str(out), "--force"]) == 0
