"""Scale-out benchmark: one miaotui server against Ray Serve replicas of it, on this machine.

Servers, one at a time, the same streaming client as bench_serve.py (64-token WikiText-2 prompts, 64 new tokens,
temperature 0, ignore_eos): `single` (one process, 2 threads), `ray-1` (one replica with 1 CPU behind Ray Serve's
proxy and miaotui's ingress) and `ray-2` (two replicas, 1 CPU each). Reported per concurrency: output tokens/s,
TTFT and ITL percentiles; at concurrency 1 the difference between `single` and `ray-1` is what the Ray hop costs
(with one thread fewer for the engine, so it is an upper bound on the hop itself).

    .venv/bin/python benchmarks/bench_scale.py [--levels 1,8,32] [--servers single,ray-1,ray-2] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from bench_serve import DATA, REPO, environment, level, prompts, start
from results_io import write_results


def commands(model: str, dtype: str, max_len: int, max_batch: int, compiled: bool) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "miaotui.cli", "serve", model, "--port", "0", "--dtype", dtype, "--max-len",
            str(max_len), "--max-batch", str(max_batch), "--max-queue", "1024"]  # fmt: skip
    if not compiled:
        base.append("--no-compile")
    return {
        "single": base,
        "ray-1": [*base, "--replicas", "1", "--replica-cpus", "1"],
        "ray-2": [*base, "--replicas", "2", "--replica-cpus", "1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DATA / "ref-llama-16m"))
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--servers", default="single,ray-1,ray-2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compile", action="store_true", help="compiled decode steps (default: eager, faster start)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    texts = prompts(Path(a.model), 256, 64)
    model_id = Path(a.model).name
    cmds = commands(a.model, a.dtype, 256, max(levels), a.compile)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.servers.split(","):
            proc, url = start(cmds[name], Path(tmp) / f"{name}.log")
            try:
                results[name] = []
                for c in levels:
                    r = asyncio.run(level(url, model_id, texts, c, max(2, 32 // c), 64))
                    results[name].append(r)
                    print(f"{name} clients={c}: {r['tokens_per_s']:.0f} tok/s, ttft p50 {r['ttft_ms']['p50']:.0f} ms")
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    env = environment(a.dtype, model_id, {})
    env.update(compiled=a.compile, command=" ".join(sys.argv))
    md = [
        f"# Scale-out on Ray Serve, {model_id} ({a.dtype}, {'compiled' if a.compile else 'eager'}), this CPU",
        "",
        f"torch {env['torch']}; command: `.venv/bin/python {' '.join(sys.argv)}`",
        "",
        "| server | clients | tok/s | TTFT p50 / p90 ms | ITL p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            t, i = r["ttft_ms"], r["itl_ms"]
            md.append(f"| {name} | {r['clients']} | {r['tokens_per_s']:.0f} | {t['p50']:.0f} / {t['p90']:.0f} | "
                      f"{i['p50']:.1f} / {i['p99']:.1f} |")  # fmt: skip
    write_results(a.out, "scale", "cpu", {"environment": env, "results": results}, md)


if __name__ == "__main__":
    main()
