"""Micro-benchmark of miaotui's CPU int8/int4 kernels against PyTorch's, at the shapes of a 0.4B Llama.

For each layer shape (K input, N output channels) and row count M: the median time of bf16 `F.linear`,
PyTorch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (group 128), and miaotui's `int8_linear` and
`int4_linear` (their kernels up to 32 rows, the dequantized weight through `F.linear` beyond). Two regimes:
"cache" calls one layer again and again (its weights stay in cache, as in a small model), "memory" cycles
through copies of the layer totalling `--memory-mb` of int4 weights, so each call reads its weights from DRAM,
as a decode step of a large model does. Variants are interleaved round by round; GB/s counts the weight bytes
each call reads (codes, plus scales and zeros for int4).
Writes benchmarks/results/cpu-kernels-cpu-<date>.json and .md.

    .venv/bin/python benchmarks/bench_cpu_kernels.py [--ms 1,4,32,128] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1280, 1280), (1280, 256), (1280, 3456), (3456, 1280)]  # (K, N): q/o, k/v, gate/up, down of the 0.4B
GROUP = 128


def layer_copies(k: int, n: int, count: int) -> list[dict]:
    """`count` random layers of shape (N, K) in every variant's storage."""
    from miaotui.quantize import cpu_kernels

    out = []
    for _ in range(count):
        q4 = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        sz = (torch.rand(k // GROUP, 2, n) / 10).to(torch.bfloat16)  # (G, 2, N)
        out.append(
            {
                "w": torch.randn(n, k, dtype=torch.bfloat16),
                "q8": torch.randint(-127, 128, (n, k), dtype=torch.int8),
                "s8": (torch.rand(n) / 50).to(torch.bfloat16),
                "q4_theirs": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 1),
                "sz_theirs": sz.transpose(1, 2).contiguous(),  # (G, N, 2)
                "q4_ours": cpu_kernels.pack_int4(q4),
                "sz_ours": sz,
            }
        )
    return out


def variants() -> dict:
    """name -> (fn(x, layer), weight bytes per call as a function of (K, N))."""
    from miaotui.quantize import cpu_kernels

    int4_bytes = lambda k, n: n * k // 2 + 4 * n * k // GROUP  # noqa: E731
    return {
        "bf16 F.linear": (lambda x, c: F.linear(x, c["w"]), lambda k, n: 2 * n * k),
        "int8 PyTorch": (lambda x, c: torch.ops.aten._weight_int8pack_mm(x, c["q8"], c["s8"]), lambda k, n: n * k),
        "int8 miaotui": (lambda x, c: cpu_kernels.int8_linear(x, c["q8"], c["s8"]), lambda k, n: n * k),
        "int4 PyTorch": (
            lambda x, c: torch.ops.aten._weight_int4pack_mm_for_cpu(x, c["q4_theirs"], GROUP, c["sz_theirs"]),
            int4_bytes,
        ),
        "int4 miaotui": (lambda x, c: cpu_kernels.int4_linear(x, c["q4_ours"], c["sz_ours"], GROUP), int4_bytes),
    }


def measure(fn, x, copies: list[dict]) -> float:
    """Seconds per call, calling fn over all copies once (the copies take turns)."""
    t0 = time.perf_counter()
    for c in copies:
        fn(x, c)
    return (time.perf_counter() - t0) / len(copies)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,4,32,128", help="comma-separated row counts")
    p.add_argument("--memory-ms", default="1,4", help="row counts also measured with weights from memory")
    p.add_argument("--memory-mb", type=int, default=256, help="int4 megabytes cycled through in the memory regime")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()

    from miaotui.bench import environment
    from miaotui.quantize import cpu_kernels

    if not cpu_kernels.available():
        print("miaotui's CPU kernels are not available here (AVX-512 BF16 and a C++ compiler needed)", file=sys.stderr)
        return 1
    ms, memory_ms = [int(m) for m in a.ms.split(",")], [int(m) for m in a.memory_ms.split(",")]
    vs = variants()
    rows = []
    for k, n in SHAPES:
        count = max(2, a.memory_mb * 2**20 // (n * k // 2))
        regimes = {"cache": layer_copies(k, n, 1)}
        regimes["memory"] = layer_copies(k, n, count)
        for regime, copies in regimes.items():
            for m in ms if regime == "cache" else memory_ms:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                times = {name: [] for name in vs}
                reps = 1 if regime == "memory" else 20
                for _ in range(a.rounds + 1):  # the first round warms up
                    for name, (fn, _) in vs.items():
                        times[name].append(min(measure(fn, x, copies) for _ in range(reps)))
                for name, (_, nbytes) in vs.items():
                    t = statistics.median(times[name][1:])
                    row = {"k": k, "n": n, "m": m, "regime": regime, "variant": name, "us": t * 1e6}
                    row["gb_per_s"] = nbytes(k, n) / t / 1e9
                    rows.append(row)
                print(f"{k}x{n} M={m} {regime}: done", file=sys.stderr)
    env = environment(torch.device("cpu"))
    md = [
        f"# miaotui's CPU kernels against PyTorch's ({env['date'][:10]})",
        "",
        f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}. Median of {a.rounds} interleaved "
        f"rounds; bf16 activations; int4 with groups of {GROUP}. cache: one layer called repeatedly; memory: "
        f"{a.memory_mb} MB of int4 copies cycled (weights from DRAM). GB/s: weight bytes read per call / time.",
        "",
        "| K × N | M | weights from | bf16 F.linear µs | int8 PyTorch µs | int8 miaotui µs (GB/s) | int8 ratio "
        "| int4 PyTorch µs | int4 miaotui µs (GB/s) | int4 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(0, len(rows), len(vs)):
        r = {row["variant"]: row for row in rows[i : i + len(vs)]}
        first = rows[i]
        i8, o8, i4, o4 = r["int8 PyTorch"], r["int8 miaotui"], r["int4 PyTorch"], r["int4 miaotui"]
        md.append(
            f"| {first['k']} × {first['n']} | {first['m']} | {first['regime']} | {r['bf16 F.linear']['us']:.1f} "
            f"| {i8['us']:.1f} | {o8['us']:.1f} ({o8['gb_per_s']:.0f}) | {i8['us'] / o8['us']:.2f}x "
            f"| {i4['us']:.1f} | {o4['us']:.1f} ({o4['gb_per_s']:.0f}) | {i4['us'] / o4['us']:.2f}x |"
        )
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_cpu_kernels.py --ms {a.ms} --rounds {a.rounds}`"]
    write_results(a.out, "cpu-kernels", "cpu", {"environment": env, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
