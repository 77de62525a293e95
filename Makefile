# The two commands of the README: `make run` (the whole stack) and `make test` (the suite).
VENV ?= .venv
export VENV

.PHONY: run test bench lint
run:
	@scripts/bootstrap.sh run
	$(VENV)/bin/ai-sysadmin run

test:
	@scripts/bootstrap.sh test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check gateway layers tests bench
	$(VENV)/bin/mypy

bench:
	@scripts/bootstrap.sh test
	$(VENV)/bin/python -m bench $(BENCH_ARGS)
