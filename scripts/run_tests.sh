#!/usr/bin/env bash
# Bootstraps .venv, then runs the test suite; extra arguments go to pytest. Exits with pytest's status.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
