# The two commands of the README: `make run` (the whole stack) and `make test` (the suite);
# `make test-fast` is the inner loop (the tests that need no model).
VENV ?= .venv
export VENV
# nixpkgs' lib for the NixOS module's evaluation tests (tests/test_nix.py), used when a
# checkout exists at the path docs/nixos.md gives; without it those tests skip.
NIXPKGS_LIB_DIR ?= $(HOME)/.cache/ai-sysadmin/nixpkgs-lib
ifneq ($(wildcard $(NIXPKGS_LIB_DIR)/lib/default.nix),)
export AI_SYSADMIN_NIXPKGS_LIB ?= $(NIXPKGS_LIB_DIR)/lib
endif

.PHONY: run test test-fast bench lint
run:
	@scripts/bootstrap.sh run
	$(VENV)/bin/ai-sysadmin run

test:
	@scripts/bootstrap.sh test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The inner loop: every test not marked `slow` (none needs the model or a llama-server;
# tests/conftest.py marks those). Uses the .venv that `make test` or `make run` set up.
test-fast:
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check gateway layers tests bench
	$(VENV)/bin/mypy

bench:
	@scripts/bootstrap.sh test
	$(VENV)/bin/python -m bench $(BENCH_ARGS)
