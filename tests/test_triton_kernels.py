"""miaotui's Triton kernels against plain PyTorch, over the shapes, dtypes and edge cases a GPU sees.

Without a GPU they run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess so that the
setting holds from Triton's import on); with one, natively. The interpreter runs each tile shape the autotuner
may pick, since it has no benchmarker to autotune with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")  # a dev dependency; the GPU image has its own

CHECK = r"""
import json, sys, torch
from miaotui.quantize.triton_int8 import CONFIGS, int8_weight_only_mm
device = sys.argv[1]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
cases = [(m, n, k) for m in (1, 2, 3, 16, 33, 64) for n, k in ((70, 130), (96, 520))] + [(4, 8, 16), (1, 300, 1000)]
blocks = [c[:3] for c in CONFIGS] if device == "cpu" else [None]
out = []
gen = torch.Generator().manual_seed(0)
for dtype in RTOL:
    for i, (m, n, k) in enumerate(cases):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        s = torch.rand(n, generator=gen) * 0.02
        s[0] = 0.0  # a channel scaled to zero
        ref = x.float() @ (w.float() * s[:, None]).T  # (M, N)
        for block in blocks if i % 3 == 0 else blocks[:1]:  # every tile shape on some cases, one on the rest
            y = int8_weight_only_mm(x.to(device), w.to(device), s.to(device), block)
            same_dtype = y.dtype == dtype and tuple(y.shape) == (m, n)
            y = y.float().cpu()
            err = ((y - ref).abs() / (ref.abs().max() + 1e-12)).max().item()
            ok = err <= RTOL[dtype] and same_dtype
            out.append({"dtype": str(dtype), "shape": [m, n, k], "block": block, "err": err, "ok": ok})
print("RESULT " + json.dumps(out))
"""


def _run(device: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def test_int8_weight_only_kernel_matches_pytorch():
    results = _run("cuda" if torch.cuda.is_available() else "cpu")
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad[:5]
    assert {r["dtype"] for r in results} == {"torch.float32", "torch.float16", "torch.bfloat16"}
    assert len(results) >= 3 * 26
