"""benchmarks/gpu_check.sh, the one prepared GPU call, dry-run on the CPU: every step runs and writes its results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path, ref_llama):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "MIAOTUI_DATA": str(ref_llama.parent),
    }
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 step(s) failed" in done.stdout
    assert {p.suffix for p in tmp_path.glob("gpu-targets-tiny-cpu-*")} == {".json", ".md"}
    assert "tests collected" in (tmp_path / "tests.log").read_text()
