# The two commands of the README. Each sets itself up first (scripts/setup.sh is idempotent) with
# what it needs: `make audit` the package alone, `make test` every extra (the test suite's).
VENV ?= .venv
.PHONY: setup audit test docs bench reports clean

setup:
	@bash scripts/setup.sh

# The main job: the audit on the default dataset (docs/audit.md).
audit:
	@bash scripts/setup.sh
	$(VENV)/bin/creditaudit audit $(ARGS)

test:
	@bash scripts/setup.sh test
	$(VENV)/bin/python -m pytest $(ARGS)

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
	rm -rf $(VENV) .pytest_cache site
