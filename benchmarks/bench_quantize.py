"""Benchmark the built-in recipes against their originals, in one run, on one device.

Runs `miaotui.optimize` for ref-llama-16m (w8, w8a8, w4-rtn) and all-MiniLM-L6-v2 (w8, w8a8) and writes
benchmarks/results/quantize-<device>-<date>.json and .md. Every speed ratio is against the original
measured in the same run, interleaved.

    .venv/bin/python benchmarks/bench_quantize.py [--device cpu|cuda] [--dtype auto|bfloat16|...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-tokens", type=int, default=65536, help="perplexity tokens (WikiText-2 test)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()

    import miaotui
    from miaotui.errors import MiaotuiError

    jobs = [
        ("ref-llama-16m", str(DATA / "ref-llama-16m"), "w8"),
        ("ref-llama-16m", str(DATA / "ref-llama-16m"), "w8a8"),
        ("ref-llama-16m", str(DATA / "ref-llama-16m"), "w4-rtn"),
    ]
    try:
        jobs += [("all-MiniLM-L6-v2", miaotui.default_model(), r) for r in ("w8", "w8a8")]
    except MiaotuiError as e:
        print(f"skipping the encoder: {e}", file=sys.stderr)
    rows, reports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path, recipe) in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}] {name} {recipe}", file=sys.stderr)
            r = miaotui.optimize(
                path,
                recipe,
                Path(tmp) / str(i),
                text_path=DATA / "wikitext-2-raw" / "wiki.test.raw",
                seqlen=512,
                max_tokens=a.max_tokens,
                dtype=a.dtype,
                device=a.device,
                bench_options={"repeats": a.repeats, "new_tokens": 128},
            )
            reports.append({"name": name, **r})
            q, s = r["quality"], r["speed"]["models"]
            o, n = s["original"], s["optimized"]
            if r["kind"] == "causal-lm":
                change = 100 * (q["perplexity_ratio"] - 1)
                quality = f"ppl {q['baseline_perplexity']:.2f} -> {q['perplexity']:.2f} ({change:+.2f} %)"
                speed = (
                    f"decode {o['decode_tokens_per_s']:.0f} -> {n['decode_tokens_per_s']:.0f} tok/s "
                    f"({n['decode_tokens_per_s'] / o['decode_tokens_per_s']:.2f}x), prefill "
                    f"{n['prefill_tokens_per_s'] / o['prefill_tokens_per_s']:.2f}x"
                )
            else:
                quality = f"cosine {q['cosine_mean']:.4f} (min {q['cosine_min']:.4f})"
                batch = r["speed"]["protocol"]["batch_size"]
                speed = (
                    f"batch 1 {o['latency_b1_ms'] / n['latency_b1_ms']:.2f}x, "
                    f"batch {batch} {n['throughput_seq_per_s'] / o['throughput_seq_per_s']:.2f}x"
                )
            shrink = o["linear_bytes"] / n["linear_bytes"]
            rows.append(f"| {name} | {recipe} | {o['dtype']} | {shrink:.2f}x | {quality} | {speed} |")
    env = reports[0]["speed"]["environment"]
    stamp = datetime.date.today().isoformat()
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    md = [
        f"# Quantization recipes vs originals ({stamp})",
        "",
        f"Device {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}. Perplexity: WikiText-2 test, first {a.max_tokens} tokens, seqlen 512, "
        "fp32 compute. Speed: median of interleaved repeats in the model's dtype; decode = greedy, batch 1, "
        "128-token prompt, 128 new tokens; encoder: 128-token inputs.",
        "",
        "| model | recipe | dtype | linear bytes | quality | speed vs original |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `.venv/bin/python benchmarks/bench_quantize.py --device {a.device} --dtype {a.dtype}`",
    ]
    write_results(a.out, "quantize", device, {"environment": env, "runs": reports}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
