# The two commands: `make demo` and `make test`. Both create and reuse .venv.
# The demo installs bnlab with its lab extra (data, plots, progress bars); the tests add the
# test extra (pytest, hypothesis, the pinned PyTorch reference, Triton, Selenium) and the dev
# extra (build, ruff, mypy, MkDocs), and check the wheel, the docs site, lint and types.
# Each stamp remembers what was installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lesson check lint types docs docs-strict check-wheel clean

$(VENV)/.installed-demo: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[lab]"
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(VENV)/bin/bnlab compare --out runs/demo

# the lesson's notebooks into ./lesson, with Jupyter and PyTorch (notebook 5) in .venv
lesson: $(VENV)/.installed-demo
	$(PY) -m pip install --quiet jupyterlab "torch==2.13.0"
	$(VENV)/bin/bnlab lesson --out lesson
	@echo "open them: $(VENV)/bin/jupyter lab lesson"

test: $(VENV)/.installed-test
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory check

# what `make test` checks besides the tests (each also runs alone)
check: lint types docs-strict check-wheel

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src
	$(VENV)/bin/ruff format --check src

types: $(VENV)/.installed-test
	$(VENV)/bin/mypy

# the API site, offline, into site/ (open site/index.html)
docs: $(VENV)/.installed-test
	$(PY) tools/import_graph.py --svg docs/architecture-imports.svg
	$(PY) tools/build_notebooks.py --pages docs/lesson
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --quiet

# the same, failing on any warning (a broken reference, a missing page): what CI runs
docs-strict: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

check-wheel: $(VENV)/.installed-test
	$(PY) tools/check_wheel.py --work build/wheel-check

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache .mypy_cache .cache
