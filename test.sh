#!/usr/bin/env bash
# Set up (with the dev tools) and run every check: lint, format, import layers, the test suite.
#   ./test.sh                 everything
#   ./test.sh -m "not slow"   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev
.venv/bin/ruff check miaotui tests benchmarks
.venv/bin/ruff format --check miaotui tests benchmarks
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
