"""Serving benchmark: miaotui's server against a naive one-request-at-a-time server on Hugging Face `generate`.

Both servers run as subprocesses on the same model and machine, and the same streaming client load hits each
at every concurrency level (1, 4, 16, 64 clients by default). Each client sends requests back to back with a
real WikiText-2 prompt (64 tokens) and asks for 64 new tokens (ignore_eos, so every request generates the same
count). Reported per level: throughput (completion tokens/s over the level's wall time), time to first token
and inter-token latency percentiles (p50/p90/p99), seen by the client from the stream.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--levels 1,4,16,64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from results_io import write_results

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data"))


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"serving on (http://[\d.]+:\d+)", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"server failed:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()}")


def prompts(tokenizer_dir: Path, count: int, length: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = [ln for ln in (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines() if len(ln) > 400]
    return [tok.decode(tok(ln)["input_ids"][:length]) for ln in lines[:count]]


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            data = line[6:] if line.startswith("data: ") and line != "data: [DONE]" else None
            if data and json.loads(data)["choices"][0].get("text"):
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:], strict=False)], "chunks": len(times)}


async def level(url: str, model: str, texts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        await one(client, model, texts[0], 4)  # warm-up

        async def user(i: int) -> list[dict]:
            return [
                await one(client, model, texts[(i * per_client + j) % len(texts)], max_tokens)
                for j in range(per_client)
            ]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else None

    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "tokens_per_s": len(results) * max_tokens / wall,
        "ttft_ms": {q: pct(ttft, p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "itl_ms": {q: pct(itl, p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "mean_ttft_ms": statistics.fmean(ttft) * 1000,
    }


def main() -> None:
    import torch
    import transformers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DATA / "ref-llama-16m"))
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--dtype", default="float32", help="float32: AVX2 CPUs have no fast bf16 GEMM for batches")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    texts = prompts(Path(a.model), 256, a.prompt_len)
    model_id = Path(a.model).name
    python = sys.executable
    servers = {
        "miaotui": [python, "-m", "miaotui.cli", "serve", a.model, "--port", "0", "--dtype", a.dtype,
                    "--max-batch", str(max(levels)), "--max-len", str(2 * (a.prompt_len + a.max_tokens)),
                    "--max-queue", "1024"],
        "naive-hf": [python, str(REPO / "benchmarks" / "naive_hf_server.py"), a.model, "--dtype", a.dtype],
    }  # fmt: skip
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in servers.items():
            proc, url = start(cmd, Path(tmp) / f"{name}.log")
            try:
                results[name] = []
                for c in levels:
                    per_client = max(1, 16 // c) if name == "naive-hf" and c > 1 else max(2, 32 // c)
                    r = asyncio.run(level(url, model_id, texts, c, per_client, a.max_tokens))
                    results[name].append(r)
                    print(f"{name} clients={c}: {r['tokens_per_s']:.0f} tok/s, ttft p50 {r['ttft_ms']['p50']:.0f} ms")
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    env = {
        "device": "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": a.dtype,
        "model": model_id,
        "prompt_tokens": a.prompt_len,
        "max_tokens": a.max_tokens,
    }
    md = [
        f"# Serving: miaotui vs a naive Hugging Face server ({model_id}, {a.dtype}, CPU {env['cpu_threads']} threads)",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}; {a.prompt_len}-token prompts, {a.max_tokens} new "
        "tokens, streaming, greedy, ignore_eos. Throughput = completion tokens / wall time at each level.",
        "",
        "| server | clients | requests | tok/s | vs naive | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r, base in zip(rows, results["naive-hf"], strict=True):
            t, i = r["ttft_ms"], r["itl_ms"]
            md.append(
                f"| {name} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
                f"{i['p50']:.1f} / {i['p90']:.1f} / {i['p99']:.1f} |"
            )
    write_results(a.out, "serve", "cpu", {"environment": env, "results": results}, md)


if __name__ == "__main__":
    main()
