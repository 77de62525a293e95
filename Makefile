# The two commands of the README: `make run` (the whole stack) and `make test` (the suite).
VENV ?= .venv
export VENV
# nixpkgs' lib for the NixOS module's evaluation tests (tests/test_nix.py), used when a
# checkout exists at the path docs/nixos.md gives; without it those tests skip.
NIXPKGS_LIB_DIR ?= $(HOME)/.cache/ai-sysadmin/nixpkgs-lib
ifneq ($(wildcard $(NIXPKGS_LIB_DIR)/lib/default.nix),)
export AI_SYSADMIN_NIXPKGS_LIB ?= $(NIXPKGS_LIB_DIR)/lib
endif

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
