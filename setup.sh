#!/usr/bin/env bash
# Create .venv with miaotui and its pinned dependencies (CPU PyTorch 2.13.0), ready to run.
#   ./setup.sh          runtime + the built-in default model
#   ./setup.sh --dev    also the test and lint tools
# Re-running is cheap: an up-to-date .venv is left as it is.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: miaotui needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

extras="default"
[[ "${1:-}" == "--dev" ]] && extras="default,dev"
stamp=".venv/.miaotui-installed-$extras"
hash=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
    exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[$extras]"
echo "$hash" > "$stamp"
echo "miaotui installed in .venv (try: .venv/bin/miaotui --help)"
