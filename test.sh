#!/usr/bin/env bash
# Set up (with the dev tools) and run every check: lint, format, import layers, the documentation site, the tests.
#   ./test.sh                 everything
#   ./test.sh -m "not slow"   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --dev
.venv/bin/ruff check miaotui tests benchmarks docs/scripts
.venv/bin/ruff format --check miaotui tests benchmarks docs/scripts
.venv/bin/lint-imports
# The site into build/site: a broken link or anchor, a page missing from the nav, a docstring the API reference
# cannot render fails here. (The variables silence two plugins' banners about MkDocs' future.)
NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true .venv/bin/mkdocs build --strict --quiet
# Two test processes of one thread each, a file at a time in each (its fixtures built once): on 2 cores 1.4x faster
# than one process of two threads, since much of the suite waits on subprocesses, servers and Python.
.venv/bin/python -m pytest -n "${MIAOTUI_TEST_WORKERS:-2}" --dist loadfile "$@"
