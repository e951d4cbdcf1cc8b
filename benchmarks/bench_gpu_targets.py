"""The engine's speed targets on one GPU, in one run per model shape: batch-1 decoding in bf16, w8 and w4, and
batch-32 throughput, each against Hugging Face `generate` measured in the same run, with % of the roofline.

Shapes (random weights, which do not change speed): `1b` (Llama-3.2-1B), `8b` (Llama-3-8B), and `tiny`, a small
Llama that runs the whole script on a CPU in a minute (to check it before a GPU is at hand). Per shape:

- HF `generate`, eager, its dynamic cache (the baseline), batch 1 and batch `--batch`;
- with `--hf-static`, HF `generate` with its static cache, which transformers compiles (minutes on the 8B shape);
- the engine with a compiled decode step (CUDA graphs on a GPU): bf16, `w8` and `w4` (RTN, group 128) copies of
  the same model, batch 1, and bf16 at batch `--batch`.

Greedy, `--prompt-len` random prompt tokens, `--new-tokens` new ones; tokens/s = new tokens over the whole call
(prefill included). Variants run interleaved over `--repeats` rounds after a warm-up round; medians reported.
Roofline (batch 1): measured copy bandwidth / bytes one decode step reads (every weight, packed weights at their
packed size, plus the KV cache read at the last step). Results are written after each shape, so a run cut short
keeps the shapes it finished.

    python benchmarks/bench_gpu_targets.py --device cuda --shapes 1b
    python benchmarks/bench_gpu_targets.py --device cuda --shapes 8b --name 8b
    .venv/bin/python benchmarks/bench_gpu_targets.py --device cpu --shapes tiny --repeats 1 --new-tokens 16

On a machine whose only copy of the data is elsewhere, point MIAOTUI_DATA at a folder holding ref-llama-16m's
tokenizer (`tokenizer.json`, `tokenizer_config.json`, `config.json`): the random models use its tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from random_models import LLAMA_1B, LLAMA_8B, LLAMA_TINY, random_llama
from results_io import write_results

from miaotui.bench import timed

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": LLAMA_TINY, "1b": LLAMA_1B, "8b": LLAMA_8B}
# The batch-1 targets in tok/s, per shape and variant (None: no target).
TARGETS = {("1b", "bf16"): 800, ("8b", "bf16"): 150, ("8b", "w8"): 250, ("8b", "w4"): 330}


def kv_bytes_read(lm, length: int) -> int:
    """Bytes of keys and values one batch-1 step reads at `length` positions (bf16 cache)."""
    c = lm.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * length * lm.model.dtype.itemsize


def variants(shape: str, lm, a) -> dict:
    """name -> dict(fn, tokens, batch, model (for bytes), compile_s)."""
    from miaotui.api import Engine, SamplingParams
    from miaotui.quantize import QuantizeConfig, quantize_

    n, dev = a.new_tokens, lm.device
    max_len = a.prompt_len + n
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, min(lm.model.config.vocab_size, 8192), (a.prompt_len,), generator=gen).tolist()
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    one = torch.tensor([prompt], device=dev)
    many = one.repeat(a.batch, 1)

    def hf(ids, **kw):
        return lambda: lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

    out = {"hf generate": dict(fn=hf(one), tokens=n, batch=1, lm=lm)}
    if a.hf_static:
        out["hf generate, static cache (compiled)"] = dict(
            fn=hf(one, cache_implementation="static"), tokens=n, batch=1, lm=lm
        )

    def engine(name: str, model, batch: int = 1) -> None:
        t0 = time.perf_counter()
        e = Engine(model, max_batch=batch, max_len=max_len, compile=True)
        print(f"{shape} {name}: engine ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        out[name] = dict(
            fn=lambda: e.generate([prompt] * batch, params),
            tokens=n * batch,
            batch=batch,
            lm=model,
            compile_s=e.runner.compile_seconds,
        )

    engine("engine bf16", lm)
    for scheme in a.schemes:
        q = copy.deepcopy(lm)
        quantize_(q.model, QuantizeConfig(scheme=scheme, group_size=128), progress=False)
        engine(f"engine {scheme}", q)
    out[f"hf generate, batch {a.batch}"] = dict(fn=hf(many), tokens=n * a.batch, batch=a.batch)
    engine(f"engine bf16, batch {a.batch}", lm, a.batch)
    return out


def run_shape(shape: str, a) -> list[dict]:
    from miaotui.bench import copy_bandwidth, decode_bytes_per_token

    device = torch.device(a.device)
    t0 = time.perf_counter()
    lm = random_llama(f"random-llama-{shape}", SHAPES[shape], "bfloat16", a.device)
    print(f"{shape}: model built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    vs = variants(shape, lm, a)
    times: dict[str, list[float]] = {k: [] for k in vs}
    for rep in range(a.repeats + 1):  # round 0 warms up (and compiles HF's static-cache step)
        for key, v in vs.items():
            t = timed(v["fn"], device)
            if rep:
                times[key].append(t)
        print(f"{shape}: round {rep}/{a.repeats}", file=sys.stderr)
    bandwidth = copy_bandwidth(device)
    base = {
        1: statistics.median(times["hf generate"]),
        a.batch: statistics.median(times[f"hf generate, batch {a.batch}"]),
    }
    rows = []
    for key, v in vs.items():
        t = statistics.median(times[key])
        row = {
            "shape": shape,
            "variant": key,
            "batch": v["batch"],
            "tokens_per_s": v["tokens"] / t,
            "seconds": t,
            "vs_hf": base[v["batch"]] / t,
            "compile_s": v.get("compile_s"),
        }
        scheme = key.removeprefix("engine ").split(",")[0] if key.startswith("engine") else None
        row["target"] = TARGETS.get((shape, scheme)) if v["batch"] == 1 else None
        if v["batch"] == 1 and "lm" in v:
            step_bytes = decode_bytes_per_token(v["lm"]) + kv_bytes_read(lm, a.prompt_len + a.new_tokens)
            row["bytes_per_token"] = step_bytes
            row["roofline_tokens_per_s"] = bandwidth / step_bytes
            row["roofline_pct"] = 100 * row["tokens_per_s"] / row["roofline_tokens_per_s"]
        rows.append(row)
    if device.type == "cuda":
        rows[0]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    for row in rows:
        row["copy_bandwidth"] = bandwidth
    return rows


def markdown(rows: list[dict], env: dict, a) -> list[str]:
    md = [
        f"# Engine speed targets ({env['date'][:10]})",
        "",
        f"Device {env['device']} ({env['device_name']}), torch {env['torch']}, transformers {env['transformers']}; "
        f"random weights in bf16; greedy, {a.prompt_len}-token prompt, {a.new_tokens} new tokens; tokens/s over "
        f"the whole call (prefill included); median of {a.repeats} interleaved repeats; copy bandwidth "
        f"{rows[0]['copy_bandwidth'] / 1e9:.0f} GB/s. Roofline: copy bandwidth / bytes one step reads (weights "
        "as stored, plus the KV cache at the last step).",
        "",
        "| shape | variant | batch | tokens/s | vs HF eager | % of roofline | target | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = f"{r['roofline_pct']:.0f} %" if "roofline_pct" in r else ""
        target = ""
        if r["target"]:
            target = f"{r['target']} ({'met' if r['tokens_per_s'] >= r['target'] else 'missed'})"
        if r["variant"].startswith("engine") and r["batch"] > 1:
            target = f"3x HF ({'met' if r['vs_hf'] >= 3 else 'missed'})"
        comp = f"{r['compile_s']:.0f}" if r["compile_s"] else ""
        md.append(
            f"| {r['shape']} | {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['vs_hf']:.2f}x | "
            f"{pct} | {target} | {comp} |"
        )
    cmd = " ".join(sys.argv[1:])
    md += ["", f"Command: `python benchmarks/bench_gpu_targets.py {cmd}`"]
    return md


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="1b", help=f"comma-separated, of {', '.join(SHAPES)} (default 1b)")
    p.add_argument("--schemes", default="w8,w4", help="weight-only schemes timed at batch 1 (default w8,w4)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-static", action="store_true", help="also HF generate with its compiled static cache")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="", help="results file name: gpu-targets-NAME-<device>-<date>")
    a = p.parse_args()
    shapes = a.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    a.schemes = [s for s in a.schemes.split(",") if s]
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --shapes tiny to check the script)")

    from miaotui.bench import environment

    env = environment(torch.device(a.device))
    rows: list[dict] = []
    name = "gpu-targets" + (f"-{a.name}" if a.name else "")
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    for shape in shapes:
        rows += run_shape(shape, a)
        write_results(
            a.out, name, device, {"environment": env, "protocol": vars(a), "rows": rows}, markdown(rows, env, a)
        )
        if device == "cuda":
            torch.cuda.empty_cache()  # the shape's models are gone: hand their memory back before the next
    return 0


if __name__ == "__main__":
    sys.exit(main())
