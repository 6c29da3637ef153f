# The two commands of the README. Each sets itself up first (scripts/setup.sh is idempotent) with
# what it needs: `make audit` the package alone, `make test` every extra (the test suite's).
VENV ?= .venv
.PHONY: setup audit test lint docs bench reports clean

setup:
	@bash scripts/setup.sh

# The main job: the audit on the default dataset (docs/audit.md).
audit:
	@bash scripts/setup.sh
	$(VENV)/bin/creditaudit audit $(ARGS)

# The checks CI runs: lint, format and types first (`make lint`), then the test suite. One test file
# alone: .venv/bin/python -m pytest tests/test_x.py
test:
	@bash scripts/setup.sh test
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/python -m pytest $(ARGS)

# ruff (lint, then format) and mypy, configured in pyproject.toml; the pre-commit hooks run the same.
# `.venv/bin/ruff format .` and `.venv/bin/ruff check --fix .` mend most of what they report.
lint:
	@CREDITAUDIT_SKIP_DATA=1 bash scripts/setup.sh lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml) into site/: open site/index.html. Built strictly, as the test suite does.
docs:
	@CREDITAUDIT_SKIP_DATA=1 bash scripts/setup.sh docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Every table and figure from a results folder (ARGS=path; default results/), via reproduce_all.ipynb.
reports:
	@bash scripts/setup.sh notebook
	$(VENV)/bin/python scripts/run_notebook.py $(ARGS)

bench:
	@bash scripts/setup.sh
	$(VENV)/bin/python bench/bench_diagnostics.py
	$(VENV)/bin/python bench/bench_epoch.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
