#!/usr/bin/env bash
# Bootstraps .venv, then trains the example (examples/train.py; examples/core_demo.py until it exists).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
if [ -f examples/train.py ]; then
    exec "$ROOT/.venv/bin/python" examples/train.py "$@"
elif [ -f examples/core_demo.py ]; then
    exec "$ROOT/.venv/bin/python" examples/core_demo.py "$@"
fi
echo "run_example: neither examples/train.py nor examples/core_demo.py exists yet" >&2
exit 1
