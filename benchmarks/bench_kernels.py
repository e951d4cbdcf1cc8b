"""Micro-benchmark of the int8 linear kernels against bf16 F.linear, at Llama-3-8B layer shapes.

For each (N, K) and M: median time of bf16 `F.linear`, miaotui's w8 kernel (Triton on CUDA,
`_weight_int8pack_mm` on CPU), PyTorch's `_weight_int8pack_mm`, and the w8a8 dynamic path; speedups vs
bf16 and, at M=1, the % of the memory-bandwidth roofline (weight bytes / time vs measured copy bandwidth).
Writes benchmarks/results/kernels-<device>-<date>.json and .md.

    .venv/bin/python benchmarks/bench_kernels.py [--device cuda] [--shapes 8b|small]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],  # q/o, k/v, gate/up, down
    "small": [(384, 384), (1024, 384), (384, 1024)],  # ref-llama-16m
}


def timeit(fn, device: torch.device, reps: int = 50) -> float:
    """Median seconds of `fn` over `reps` calls after warm-up (CUDA events on GPU)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write)."""
    n = 1 << 28 if device.type == "cuda" else 1 << 24
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n / timeit(lambda: b.copy_(a), device, reps=20)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="8b")
    p.add_argument("--ms", default="1,16,128,2048", help="comma-separated M values")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()

    from miaotui.quantize import Int8DynamicLinear, Int8WeightOnlyLinear

    dev = torch.device(a.device)
    bw = copy_bandwidth(dev)
    rows, results = [], []
    for n, k in SHAPES[a.shapes]:
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        w8 = Int8WeightOnlyLinear.from_float(lin)
        a8 = Int8DynamicLinear.from_float(lin)
        for m in [int(x) for x in a.ms.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            calls = {
                "bf16_us": lambda x=x, lin=lin: F.linear(x, lin.weight),
                "w8_us": lambda x=x, w8=w8: w8(x),
                "torch_int8pack_us": lambda x=x, w8=w8: torch.ops.aten._weight_int8pack_mm(x, w8.qweight, w8.scale),
                "w8a8_us": lambda x=x, a8=a8: a8(x),
            }
            r = {"N": n, "K": k, "M": m}
            with torch.no_grad():
                for key, fn in calls.items():
                    r[key] = timeit(fn, dev) * 1e6
            r["w8_roofline_pct"] = 100 * (n * k + 2 * m * (n + k)) / bw / (r["w8_us"] / 1e6)
            r["bf16_roofline_pct"] = 100 * (2 * n * k + 2 * m * (n + k)) / bw / (r["bf16_us"] / 1e6)
            results.append(r)
            rows.append(
                f"| {n}x{k} | {m} | {r['bf16_us']:.1f} | {r['w8_us']:.1f} ({r['bf16_us'] / r['w8_us']:.2f}x) | "
                f"{r['torch_int8pack_us']:.1f} ({r['bf16_us'] / r['torch_int8pack_us']:.2f}x) | "
                f"{r['w8a8_us']:.1f} ({r['bf16_us'] / r['w8a8_us']:.2f}x) | {r['bf16_roofline_pct']:.0f} % | "
                f"{r['w8_roofline_pct']:.0f} % |"
            )
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    stamp = datetime.date.today().isoformat()
    env = {"date": stamp, "device": name, "torch": torch.__version__, "copy_bandwidth_GBps": bw / 1e9}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"kernels-{dev.type}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    md = [
        f"# int8 linear kernels vs bf16 F.linear ({name}, {stamp})",
        "",
        f"torch {torch.__version__}{', triton ' + env['triton'] if 'triton' in env else ''}; measured copy "
        f"bandwidth {bw / 1e9:.0f} GB/s. Median µs (speedup vs bf16); roofline = bytes moved / bandwidth / time.",
        "",
        "| N x K | M | bf16 µs | w8 (miaotui) µs | torch int8pack µs | w8a8 µs | bf16 roofline | w8 roofline |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `python benchmarks/bench_kernels.py --device {a.device} --shapes {a.shapes} --ms {a.ms}`",
    ]
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
