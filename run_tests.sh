#!/bin/bash
# Usage: ./run_tests.sh [pytest args]   — sets up .venv and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
set -euo pipefail
exec python -m pytest "$@"
