"""Benchmark miaotui's engine against Hugging Face `generate`, in one run, on one device.

Models: ref-llama-16m (real) and a random Llama of about 0.4B parameters (`--big`, weights do not change speed).
Variants, interleaved over repeats (median reported): HF `generate` (greedy, its default dynamic cache), the
engine eager, the engine with a compiled decode step (`--compile`), the engine on w8 and w4 copies (eager, and
compiled with `--compile`; on a CPU with miaotui's kernels, also compiled on PyTorch's int8/int4 kernels),
speculative decoding with prompt lookup (on real text), batch-32 throughput of HF vs the engine, and with
`--llama-cpp` llama.cpp itself (f16, q8_0, q4_0 through llama-cpp-python; see llamacpp.py).
Tokens/s counts new tokens over the whole call (prefill included) so every variant is measured the same way. The
batch-1 rates of the unquantized model are also given as a % of the memory-bandwidth roofline (copy bandwidth /
weight bytes per token).

    .venv/bin/python benchmarks/bench_engine.py [--device cpu|cuda] [--dtype bfloat16] [--compile] [--big]
        [--llama-cpp]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from random_models import LLAMA_0_4B, random_llama
from results_io import write_results

from miaotui.bench import timed

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIAOTUI_DATA", REPO.parent / "shared" / "data"))


def variants(lm, prompt_ids: list[int], text_ids: list[int], a, gguf_dir: Path) -> dict:
    """name -> (callable, new tokens it produces)."""
    from miaotui.api import Engine, SamplingParams, apply_recipe, get_recipe
    from miaotui.quantize import cpu_kernels

    n, dev = a.new_tokens, lm.device
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    one = torch.tensor([prompt_ids], device=dev)
    many = one.repeat(a.batch, 1)

    def hf(ids):
        return lambda: lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    max_len = len(text_ids) + n
    engine = Engine(lm, max_len=max_len)
    out = {
        "hf generate": (hf(one), n),
        "engine": (lambda: engine.generate([prompt_ids], params), n),
    }
    if a.compile:
        compiled = Engine(lm, max_len=max_len, compile=True)
        print(f"compile: {compiled.runner.compile_seconds:.1f} s", file=sys.stderr)
        out["engine compiled"] = (lambda: compiled.generate([prompt_ids], params), n)
        full = Engine(lm, compile=True)  # the default cache: the model's context (at most 2048 positions)
        out[f"engine compiled, {full.runner.max_len}-position cache"] = (
            lambda: full.generate([prompt_ids], params),
            n,
        )
    for recipe in ("w8", "w4-rtn"):
        q = copy.deepcopy(lm)
        if recipe == "w4-rtn" and q.dtype == torch.float32:
            q.model.to(torch.bfloat16)  # the int4 kernels compute in bfloat16
        apply_recipe(q, get_recipe(recipe), progress=False)
        if a.compile and dev.type == "cpu" and cpu_kernels.available():
            with cpu_kernels.switched_off():  # the same model on PyTorch's kernel, for comparison
                theirs = Engine(copy.deepcopy(q), max_len=max_len, compile=True)
            out[f"engine {recipe} compiled, PyTorch's kernel"] = (
                lambda c=theirs: c.generate([prompt_ids], params),
                n,
            )
        e = Engine(q, max_len=max_len)
        out[f"engine {recipe}"] = (lambda e=e: e.generate([prompt_ids], params), n)
        if a.compile:
            c = Engine(q, max_len=max_len, compile=True)
            out[f"engine {recipe} compiled"] = (lambda c=c: c.generate([prompt_ids], params), n)
    lookup = Engine(lm, max_len=max_len, draft="ngram", num_draft=a.num_draft)
    plain = Engine(lm, max_len=max_len)
    real = SamplingParams(max_tokens=n)
    out["engine, real text"] = (lambda: plain.generate([text_ids], real), n)
    out["engine + prompt lookup, real text"] = (lambda: lookup.generate([text_ids], real), n)
    out["_lookup"] = lookup
    if a.llama_cpp:
        out.update(llama_cpp_variants(lm, prompt_ids, text_ids, n, gguf_dir))
    batched = Engine(lm, max_batch=a.batch, max_len=max_len)
    out[f"hf generate, batch {a.batch}"] = (hf(many), n * a.batch)
    out[f"engine, batch {a.batch}"] = (lambda: batched.generate([prompt_ids] * a.batch, params), n * a.batch)
    return out


def llama_cpp_variants(lm, prompt_ids: list[int], text_ids: list[int], n: int, root: Path) -> dict:
    """llama.cpp f16 / q8_0 / q4_0 through llama-cpp-python, from a GGUF written from `lm` (Llama models only);
    each checked for next-token agreement with `lm` on the real-text prompt before it is timed."""
    from llamacpp import check_agreement, greedy_runner, quantize_gguf, write_gguf

    if lm.model.config.model_type != "llama":
        return {}
    folder = Path(tempfile.mkdtemp(dir=root))
    f16 = write_gguf(lm, folder / "f16.gguf", DATA / "ref-llama-16m")
    files = {"f16": f16, **{k: quantize_gguf(f16, folder / f"{k}.gguf", k) for k in ("q8_0", "q4_0")}}
    threads = torch.get_num_threads()
    out = {}
    for kind, path in files.items():
        agreement = check_agreement(lm, path, text_ids, threads)
        print(f"llama.cpp {kind}: next-token agreement {100 * agreement:.1f} %", file=sys.stderr)
        runner = greedy_runner(path, prompt_ids, n, threads)
        runner.top1_agreement = agreement
        out[f"llama.cpp {kind}"] = (runner, n)
    return out


def run_model(name: str, lm, a, gguf_dir: Path) -> list[dict]:
    from miaotui.bench import copy_bandwidth, decode_bytes_per_token

    text = (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000]
    text_ids = lm.tokenizer(text)["input_ids"][: a.prompt_len]
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, lm.model.config.vocab_size, (a.prompt_len,), generator=gen).tolist()
    vs = variants(lm, prompt_ids, text_ids, a, gguf_dir)
    lookup = vs.pop("_lookup")
    times: dict[str, list[float]] = {k: [] for k in vs}
    for rep in range(a.repeats + 1):  # the first round warms up
        for key, (fn, _) in vs.items():
            t = timed(fn, lm.device)
            if rep:
                times[key].append(t)
        print(f"{name}: round {rep}/{a.repeats}", file=sys.stderr)
    for fn, _ in vs.values():
        if hasattr(fn, "close"):
            fn.close()
    base = statistics.median(times["hf generate"])
    rows = []
    for key, (_, tokens) in vs.items():
        t = statistics.median(times[key])
        row = {"model": name, "variant": key, "tokens_per_s": tokens / t, "seconds": t}
        batch_base = f"hf generate, batch {a.batch}"
        ref = statistics.median(times[batch_base]) if "batch" in key else base
        row["vs_hf"] = ref / t
        if "prompt lookup" in key:
            row.update(lookup.speculative_stats)
        if hasattr(vs[key][0], "top1_agreement"):
            row["top1_agreement"] = vs[key][0].top1_agreement
        rows.append(row)
    roofline = copy_bandwidth(lm.device) / decode_bytes_per_token(lm)
    for row in rows:
        if row["variant"] in ("hf generate", "engine", "engine compiled"):
            row["roofline_pct"] = 100 * row["tokens_per_s"] / roofline
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype of the base models (default float32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time a compiled decode step")
    p.add_argument("--big", action="store_true", help="also the random ~0.4B Llama")
    p.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also llama.cpp f16/q8_0/q4_0 (pip install llama-cpp-python==0.3.36 gguf==0.19.0)",
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default="", help="results file name: engine-NAME-<device>-<date> (default engine-...)")
    a = p.parse_args()

    import miaotui
    from miaotui.bench import environment

    models = [("ref-llama-16m", miaotui.load(DATA / "ref-llama-16m", dtype=a.dtype, device=a.device))]
    if a.big:
        models.append(("random-llama-0.4b", random_llama("random-llama-0.4b", LLAMA_0_4B, a.dtype, a.device)))
    with tempfile.TemporaryDirectory(prefix="gguf-") as tmp:  # llama.cpp's model files, removed at the end
        rows = [row for name, lm in models for row in run_model(name, lm, a, Path(tmp))]
    env = environment(models[0][1].device)
    md = [
        f"# Engine vs Hugging Face generate ({env['date'][:10]})",
        "",
        f"Device {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}, dtype {a.dtype} (w4 in bfloat16). Greedy, {a.prompt_len}-token "
        f"prompt, {a.new_tokens} new tokens; tokens/s = new tokens / wall time of the call (prefill included); "
        f"median of {a.repeats} interleaved repeats; ratios against HF `generate` at the same batch in this run.",
        "",
        "| model | variant | tokens/s | vs HF generate | notes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        notes = []
        if "acceptance_rate" in r:
            notes.append(f"acceptance {100 * r['acceptance_rate']:.0f} %, {r['tokens_per_pass']:.2f} tokens/pass")
        if "top1_agreement" in r:
            notes.append(f"top-1 agreement with the model {100 * r['top1_agreement']:.1f} % on the real-text prompt")
        if "roofline_pct" in r:
            notes.append(f"{r['roofline_pct']:.1f} % of roofline")
        md.append(
            f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_hf']:.2f}x | {'; '.join(notes)} |"
        )
    flags = " ".join(f for f, on in (("--compile", a.compile), ("--big", a.big), ("--llama-cpp", a.llama_cpp)) if on)
    flags += f" --repeats {a.repeats}" + (f" --name {a.name}" if a.name else "")
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_engine.py --device {a.device} --dtype {a.dtype} {flags}`"]
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    write_results(
        a.out,
        f"engine-{a.name}" if a.name else "engine",
        device,
        {"environment": env, "protocol": vars(a), "rows": rows},
        md,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
