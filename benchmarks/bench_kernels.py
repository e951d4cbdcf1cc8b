"""Micro-benchmark of the low-bit linear layers against bf16 F.linear, at Llama-3-8B layer shapes.

For each (N, K) and M: median time of bf16 `F.linear`, miaotui's w8 layer (Triton on CUDA,
`_weight_int8pack_mm` on CPU), PyTorch's `_weight_int8pack_mm`, the w8a8 dynamic layer and the w4 (g128)
layer on PyTorch's int4 kernels; speedups vs
bf16 and, at M=1, the % of the memory-bandwidth roofline (weight bytes / time vs measured copy bandwidth).
Writes benchmarks/results/kernels-<device>-<date>.json and .md.

    .venv/bin/python benchmarks/bench_kernels.py [--device cuda] [--shapes 8b|small]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],  # q/o, k/v, gate/up, down
    "small": [(384, 384), (1024, 384), (384, 1024)],  # ref-llama-16m
}


def timeit(fn, device: torch.device, reps: int = 50) -> float:
    """Median seconds of one call of `fn` after warm-up.

    On CUDA the calls are captured in a CUDA graph (24 per replay) and the replays timed with events,
    so the figure is GPU time without Python launch overhead, as a graph-captured decode step sees it.
    """
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        graph, per_replay = torch.cuda.CUDAGraph(), 24
        with torch.cuda.graph(graph):
            for _ in range(per_replay):
                fn()
        graph.replay()
        times = []
        for _ in range(max(3, reps // 5)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / per_replay)
        return statistics.median(times)
    times = []
    for _ in range(reps):
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


def variants(x, lins, w8s, a8s, w4s, turn) -> dict:
    """The kernels to time on input x, each call using the next copy of the layer."""

    def nxt(layers):
        return layers[next(turn) % len(layers)]

    def int8pack():
        w = nxt(w8s)
        return torch.ops.aten._weight_int8pack_mm(x, w.qweight, w.scale)

    return {
        "bf16_us": lambda: F.linear(x, nxt(lins).weight),
        "w8_us": lambda: nxt(w8s)(x),
        "torch_int8pack_us": int8pack,
        "w8a8_us": lambda: nxt(a8s)(x),
        "w4_us": lambda: nxt(w4s)(x),
    }


def skip_slow(name: str, m: int, device: torch.device) -> bool:
    """PyTorch's CUDA int8pack kernel takes 0.1-0.3 s at M=2048 (8b shapes): not worth graph capture."""
    return name == "torch_int8pack_us" and device.type == "cuda" and m > 128


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="8b")
    p.add_argument("--ms", default="1,16,128,2048", help="comma-separated M values")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--flush-bytes", type=int, default=256 << 20, help="bf16 weight bytes cycled per shape (L2 flush)")
    a = p.parse_args()

    from miaotui.quantize import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

    dev = torch.device(a.device)
    bw = copy_bandwidth(dev)
    rows, results = [], []
    for n, k in SHAPES[a.shapes]:
        # enough distinct copies of the layer that its weights cannot stay in the L2 cache between calls
        copies = max(1, -(-a.flush_bytes // (2 * n * k))) if dev.type == "cuda" else 1
        lins = [torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        w8s = [Int8WeightOnlyLinear.from_float(lin) for lin in lins]
        a8s = [Int8DynamicLinear.from_float(lin) for lin in lins]
        w4s = [Int4WeightOnlyLinear.from_float(lin, group_size=128) for lin in lins]
        with torch.no_grad():
            for layer in w4s:  # convert to the kernel layout before any timing or graph capture
                layer(torch.zeros(1, k, device=dev, dtype=torch.bfloat16))
        turn = iter(range(1 << 62))
        for m in [int(x) for x in a.ms.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

            calls = variants(x, lins, w8s, a8s, w4s, turn)
            r = {"N": n, "K": k, "M": m}
            with torch.no_grad():
                for key, fn in calls.items():
                    r[key] = float("nan") if skip_slow(key, m, dev) else timeit(fn, dev) * 1e6
            r["w4_roofline_pct"] = 100 * (n * k / 2 + n * k / 32 + 2 * m * (n + k)) / bw / (r["w4_us"] / 1e6)
            r["w8_roofline_pct"] = 100 * (n * k + 2 * m * (n + k)) / bw / (r["w8_us"] / 1e6)
            r["bf16_roofline_pct"] = 100 * (2 * n * k + 2 * m * (n + k)) / bw / (r["bf16_us"] / 1e6)
            results.append(r)
            rows.append(
                f"| {n}x{k} | {m} | {r['bf16_us']:.1f} | {r['w8_us']:.1f} ({r['bf16_us'] / r['w8_us']:.2f}x) | "
                f"{r['torch_int8pack_us']:.1f} ({r['bf16_us'] / r['torch_int8pack_us']:.2f}x) | "
                f"{r['w8a8_us']:.1f} ({r['bf16_us'] / r['w8a8_us']:.2f}x) | "
                f"{r['w4_us']:.1f} ({r['bf16_us'] / r['w4_us']:.2f}x) | {r['bf16_roofline_pct']:.0f} % | "
                f"{r['w8_roofline_pct']:.0f} % | {r['w4_roofline_pct']:.0f} % |"
            )
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    stamp = datetime.date.today().isoformat()
    env = {"date": stamp, "device": name, "torch": torch.__version__, "copy_bandwidth_GBps": bw / 1e9}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    md = [
        f"# int8 linear kernels vs bf16 F.linear ({name}, {stamp})",
        "",
        f"torch {torch.__version__}{', triton ' + env['triton'] if 'triton' in env else ''}; measured copy "
        f"bandwidth {bw / 1e9:.0f} GB/s. Median µs per call (speedup vs bf16), CUDA-graph replay on GPU; roofline ="
        " bytes moved / bandwidth / time.",
        "",
        "| N x K | M | bf16 µs | w8 µs | torch int8pack µs | w8a8 µs | w4 g128 µs | bf16 roofline | w8 roofline "
        "| w4 roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `python benchmarks/bench_kernels.py --device {a.device} --shapes {a.shapes} --ms {a.ms}`",
    ]
    write_results(a.out, "kernels", dev.type, {"environment": env, "results": results}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
