# The two commands of the README. Each sets itself up first (scripts/setup.sh is idempotent).
VENV ?= .venv
.PHONY: setup audit test bench clean

setup:
	@bash scripts/setup.sh

# The main job. Until the audit command exists, it trains BP on the default dataset.
audit: setup
	$(VENV)/bin/creditaudit train rule=bp arch=resmlp dataset=fashion_mnist epochs=2 setting=main $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(ARGS)

bench: setup
	$(VENV)/bin/python bench/bench_diagnostics.py
	$(VENV)/bin/python bench/bench_epoch.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
