"""Per-token decode latency of the engine split over processes: TP=1 vs TP=2 vs PP=2 (CPU gloo, or CUDA nccl).

Models: ref-llama-16m (real, fp32) and a random Llama of ~0.1B parameters (`--mid`: hidden 1024, 8 blocks, GQA
16/4; weights do not change speed), saved to a temporary folder because every rank loads the model itself.
Variants run one after another (a parallel run owns every core), each with `bench_models`' protocol (greedy,
static cache, median of repeats): TP=1 with all cores, TP=1 with one core (what each rank of a 2-way split gets
on a 2-core machine), TP=2, PP=2.

    .venv/bin/python benchmarks/bench_parallel.py [--device cpu] [--mid] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from random_models import LLAMA_0_1B, random_llama
from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data"))


def mid_llama(folder: Path) -> Path:
    """Save a random Llama of ~0.1B parameters (fp32) with ref-llama's tokenizer into folder."""
    lm = random_llama("random-llama-0.1b", LLAMA_0_1B, "float32")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def measure(source: Path, tp: int, pp: int, threads: int, a: argparse.Namespace) -> dict:
    import miaotui
    from miaotui.api import ParallelConfig, bench_models, start_parallel

    options = {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "repeats": a.repeats}
    load = {"dtype": a.dtype, "device": a.device}
    if tp * pp == 1:
        torch.set_num_threads(threads)
        r = bench_models({"m": miaotui.load(source, **load)}, **options)
    else:
        runner = start_parallel(
            source, ParallelConfig(tp=tp, pp=pp), load_options=load, max_len=a.prompt_len + a.new_tokens
        )
        try:
            r = bench_models({"m": runner.lm}, runners={"m": runner}, **options)
        finally:
            runner.close()
    m = r["models"]["m"]
    return {
        "tp": tp,
        "pp": pp,
        "threads_per_rank": threads,
        "time_per_token_ms": m["time_per_token_ms"],
        "prefill_ms": m["prefill_ms"],
        "spread": m["spread"],
        "rank0_weight_bytes": m["total_bytes"],
        "environment": r["environment"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mid", action="store_true", help="also the ~0.1B random Llama")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    cores = os.cpu_count() or 1
    variants = [(1, 1, cores), (1, 1, 1), (2, 1, max(1, cores // 2)), (1, 2, max(1, cores // 2))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"ref-llama-16m": DATA / "ref-llama-16m"}
        if a.mid:
            models["random-llama-0.1b"] = mid_llama(Path(tmp) / "mid")
        for name, source in models.items():
            for tp, pp, threads in variants:
                row = {"model": name, **measure(source, tp, pp, threads, a)}
                rows.append(row)
                print(f"{name} tp={tp} pp={pp} threads={threads}: {row['time_per_token_ms']:.2f} ms/token", flush=True)
    env = rows[0]["environment"]
    md = [
        f"# Parallel engine: per-token decode latency ({env['date'][:10]})",
        "",
        f"Device {env['device']} ({env['device_name']}, {cores} cores), torch {env['torch']}, "
        f"transformers {env['transformers']}, {a.dtype}, batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
        f"median of {a.repeats}. Variants ran one after another on a shared machine: compare within a model.",
        "",
        "| model | TP | PP | threads/rank | ms/token | vs TP=1 (all cores) | prefill ms | rank-0 weights MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["tp"] * x["pp"] == 1)
        md.append(
            f"| {r['model']} | {r['tp']} | {r['pp']} | {r['threads_per_rank']} | {r['time_per_token_ms']:.2f} | "
            f"{base['time_per_token_ms'] / r['time_per_token_ms']:.2f}x | {r['prefill_ms']:.1f} | "
            f"{r['rank0_weight_bytes'] / 1e6:.1f} |"
        )
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    write_results(a.out, "parallel", device, {"environment": env, "protocol": vars(a), "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
