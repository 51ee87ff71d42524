#!/usr/bin/env bash
# Idempotent dev environment setup: creates .venv, installs torch (CPU build) if missing,
# then the package in editable mode with its test extra (re-run only when pyproject.toml changes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.lightning_ckpt-install.sha256"
TORCH_PIN="torch==2.13.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[bootstrap] $*" >&2; }

# Prints a Python >= 3.10 interpreter, preferring python3.11.
find_python() {
    local cand
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 \
            && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

if [ ! -x "$VPY" ] || ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
    if ! PY="$(find_python)"; then
        log "error: need python3.11 (or python3 >= 3.10) on PATH"
        exit 1
    fi
    log "creating .venv with $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
    log "installing $TORCH_PIN (a few minutes)"
    "$VPY" -m pip install -qq "$TORCH_PIN"
fi

HASH="$("$VPY" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ] \
    || ! "$VPY" -m pip show -q lightning_ckpt >/dev/null 2>&1; then
    log "installing lightning_ckpt in editable mode with [test] extra"
    rm -f "$STAMP"
    "$VPY" -m pip install -qq -e ".[test]"
    echo "$HASH" > "$STAMP"
fi
