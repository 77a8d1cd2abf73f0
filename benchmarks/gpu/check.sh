#!/usr/bin/env bash
# The GPU check pack: bash benchmarks/gpu/check.sh kernel|train|flow|dali|all [--quick] [--dry-run]
# A thin wrapper; the steps, timeouts and result files are in benchmarks/gpu/check.py (its docstring says how).
set -u
cd "$(dirname "$0")/../.." || exit 2
py=${PYTHON:-$(command -v python || command -v python3)}
exec "$py" benchmarks/gpu/check.py "$@"
