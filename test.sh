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
.venv/bin/python -m pytest "$@"
