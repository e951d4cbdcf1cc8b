"""Serving workloads that steady load does not show: a shared system prompt, and long prompts among short ones.

1. `prefix`: every request is one 768-token system prompt (WikiText-2 text) followed by its own 32-token question,
   32 new tokens, 8 clients back to back, 12 requests each. With prefix caching the shared blocks are computed
   once: TTFT and tokens/s with it on and off (`--no-prefix-caching`; vLLM `--no-enable-prefix-caching`).
2. `mixed`: 8 clients stream short requests (64-token prompts, 64 new tokens) while a 900-token prompt (16 new
   tokens, a different text each time) arrives every 2 s. Reported: inter-token latency of the short requests,
   over all their gaps and over the gaps that overlap a long prompt's wait for its first token (the stall its
   prefill causes them; a long prompt every 2 s touches a few dozen of ~5,000 gaps, too few to move the overall
   p99), and the long requests' TTFT, with chunked prefill (the default chunk, and `--prefill-chunk` values asked
   for) and without (`--prefill-chunk 0`); vLLM with its defaults (chunked prefill always on in its V1 engine).

Same client for every server, one server at a time, on the same model; vLLM's CPU build from its own environment
as in bench_serve.py (skipped, with the reason, when it cannot be imported).

    .venv/bin/python benchmarks/bench_serve_workloads.py [--workloads prefix,mixed] [--chunks 256]
        [--servers miaotui,vllm] [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_serve import DATA, REPO, environment, one, start, vllm_available, vllm_command, wiki_lines
from results_io import write_results

MAX_LEN = 1024


def texts(model: Path) -> dict:
    """The system prompt (768 tokens), questions (32 tokens), short prompts (64) and long prompts (900)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lines = [tok(ln)["input_ids"] for ln in wiki_lines(400)]
    stream = [t for ids in lines[:40] for t in ids]
    system = tok.decode(stream[:768])
    rest = lines[40:]
    return {
        "system": system,
        "questions": [tok.decode(ids[a : a + 32]) for a in (0, 40) for ids in rest[:64]],  # 128, all different
        "short": [tok.decode(ids[:64]) for ids in rest[64:192]],
        "long": [tok.decode([t for ids in rest[192 + 8 * i : 200 + 8 * i] for t in ids][:900]) for i in range(16)],
    }


async def prefix_round(url: str, model: str, t: dict, clients: int = 8, per_client: int = 12) -> dict:
    prompts = [t["system"] + "\n\n" + q for q in t["questions"]]
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        await one(client, model, t["system"] + "\n\n" + t["short"][0], 4)  # warm-up: the system prompt is now seen

        async def user(i: int) -> list[dict]:
            return [await one(client, model, prompts[i * per_client + j], 32) for j in range(per_client)]

        t0 = time.perf_counter()
        done = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] * 1000 for r in done)
    return {
        "requests": len(done),
        "tokens_per_s": len(done) * 32 / wall,
        "ttft_ms": {"p50": _pct(ttft, 0.5), "p90": _pct(ttft, 0.9)},
    }


async def mixed_round(url: str, model: str, t: dict, clients: int = 8, longs: int = 6, every_s: float = 2.0) -> dict:
    stop, short, windows = asyncio.Event(), [], []  # short requests' token times; long prompts' (sent, first token)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=32)) as client:
        await one(client, model, t["long"][-1], 2)  # warm-up, long prompt shapes included

        async def user(i: int) -> None:
            j = 0
            while not stop.is_set():
                short.append((await one(client, model, t["short"][(i * 16 + j) % len(t["short"])], 64))["times"])
                j += 1

        async def arrivals() -> None:
            await asyncio.sleep(every_s)
            for k in range(longs):
                r = await one(client, model, t["long"][k], 16)
                windows.append((r["sent"], r["sent"] + r["ttft"]))
                await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - r["sent"])))
            stop.set()

        await asyncio.gather(arrivals(), *(user(i) for i in range(clients)))
    gaps = [(a, b) for times in short for a, b in zip(times, times[1:], strict=False)]
    itl = sorted((b - a) * 1000 for a, b in gaps)
    # the gaps that overlap a long prompt's wait for its first token: the stall its prefill causes
    stalled = sorted((b - a) * 1000 for a, b in gaps if any(a < f and b > s for s, f in windows))
    waits = [(f - s) * 1000 for s, f in windows]
    return {
        "short_itl_ms": {"p50": _pct(itl, 0.5), "p99": _pct(itl, 0.99), "p99.9": _pct(itl, 0.999), "max": itl[-1]},
        "short_tokens": len(itl),
        "during_long_prefill_itl_ms": {"p50": _pct(stalled, 0.5), "p99": _pct(stalled, 0.99), "count": len(stalled)},
        "long_ttft_ms": {"median": statistics.median(waits), "max": max(waits)},
    }


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def servers(a) -> tuple[dict, dict]:
    """workload -> {variant: (command, environment, url)}, and skipped servers with the reason."""
    ours = [sys.executable, "-m", "miaotui.cli", "serve", a.model, "--port", "0", "--dtype", a.dtype,
            "--max-batch", "16", "--max-len", str(MAX_LEN), "--max-queue", "1024"]  # fmt: skip
    plan, skipped = {"prefix": {}, "mixed": {}}, {}
    wanted = a.servers.split(",")
    if "miaotui" in wanted:
        plan["prefix"]["miaotui"] = (ours, None, None)
        plan["prefix"]["miaotui --no-prefix-caching"] = ([*ours, "--no-prefix-caching"], None, None)
        plan["mixed"]["miaotui"] = (ours, None, None)
        for chunk in a.chunks:
            plan["mixed"][f"miaotui --prefill-chunk {chunk}"] = ([*ours, "--prefill-chunk", str(chunk)], None, None)
        plan["mixed"]["miaotui --prefill-chunk 0"] = ([*ours, "--prefill-chunk", "0"], None, None)
    if "vllm" in wanted:
        why = vllm_available(a.vllm_python)
        if why is not None:
            skipped["vllm"] = why
            print(f"vllm skipped: {why} (see bench_serve.py --help to install it)", file=sys.stderr)
        else:
            for workload, extra in (("prefix", []), ("prefix", ["--no-enable-prefix-caching"]), ("mixed", [])):
                cmd, env, url = vllm_command(a.vllm_python, a.model, a.dtype, MAX_LEN, 16)
                plan[workload][" ".join(["vllm", *extra])] = ([*cmd, *extra], env, url)
    return {w: plan[w] for w in a.workloads.split(",")}, skipped


def main() -> None:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DATA / "ref-llama-16m"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workloads", default="prefix,mixed")
    p.add_argument("--servers", default="miaotui,vllm", help="of miaotui, vllm")
    p.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="extra --prefill-chunk values to run the mixed workload with")  # fmt: skip
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    t, model_id = texts(Path(a.model)), Path(a.model).name
    plan, skipped = servers(a)
    results: dict = {w: {} for w in plan}
    rounds = {"prefix": prefix_round, "mixed": mixed_round}
    with tempfile.TemporaryDirectory() as tmp:
        for workload, variants in plan.items():
            for name, (cmd, env, url) in variants.items():
                proc, url = start(cmd, Path(tmp) / "server.log", url, env)
                try:
                    results[workload][name] = r = asyncio.run(rounds[workload](url, model_id, t))
                    print(workload, name, r, flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=120)
    env = environment(a.dtype, model_id, skipped)
    write_results(a.out, "serve-workloads", "cpu", {"environment": env, "results": results}, _markdown(results, env))


def _markdown(results: dict, env: dict) -> list[str]:
    md = [
        f"# Serving workloads ({env['model']}, {env['dtype']}, CPU {env['cpu_threads']} threads)",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}; one server at a time, same client.",
        "",
    ]
    if "prefix" in results:
        md += ["## Shared 768-token system prompt + 32-token questions, 32 new tokens, 8 clients", "",
               "| server | TTFT p50 / p90 ms | tok/s |", "|---|---|---|"]  # fmt: skip
        for name, r in results["prefix"].items():
            t = r["ttft_ms"]
            md.append(f"| {name} | {t['p50']:.0f} / {t['p90']:.0f} | {r['tokens_per_s']:.0f} |")
        md.append("")
    if "mixed" in results:
        md += [
            "## 8 clients of short requests (64 + 64 tokens), a 900-token prompt every 2 s",
            "",
            "| server | short ITL p50 / p99 / p99.9 / max ms | short ITL while a long prompt waits: p50 / p99 ms "
            "(gaps) | long TTFT median / max ms |",
            "|---|---|---|---|",
        ]
        for name, r in results["mixed"].items():
            i, s, t = r["short_itl_ms"], r["during_long_prefill_itl_ms"], r["long_ttft_ms"]
            md.append(
                f"| {name} | {i['p50']:.1f} / {i['p99']:.1f} / {i['p99.9']:.0f} / {i['max']:.0f} | "
                f"{s['p50']:.1f} / {s['p99']:.1f} ({s['count']}) | {t['median']:.0f} / {t['max']:.0f} |"
            )
        md.append("")
    for name, why in env["skipped"].items():
        md += [f"{name} skipped: {why}", ""]
    md += [f"`.venv/bin/python benchmarks/bench_serve_workloads.py {' '.join(sys.argv[1:])}`"]
    return md


if __name__ == "__main__":
    main()
