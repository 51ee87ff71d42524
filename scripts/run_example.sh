#!/usr/bin/env bash
# Bootstraps .venv, then trains the example with async checkpointing (arguments go to examples/train.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec "$ROOT/.venv/bin/python" examples/train.py "$@"
