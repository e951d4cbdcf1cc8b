"""What constrained decoding costs per token: the grammar libraries' mask computation, and the engine end to end.

1. Masks: the token sequences of JSON-schema outputs (sampled by miaotui's engine under the grammar) are replayed
   through llguidance (what miaotui uses) and xgrammar (vLLM's default; measured only if installed), timing the
   allowed-token mask of every step and the grammar's compilation, on ref-llama-16m's tokenizer.
2. Engine: ref-llama-16m (bf16, compiled decode, 2 threads) generates the same number of tokens at batch 1 and 8
   unconstrained, with a JSON schema, and with logit_bias, interleaved; ms per token and the ratio.

    .venv/bin/python benchmarks/bench_grammar.py [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import miaotui
from miaotui.bench import environment
from miaotui.engine.constraints import Grammar
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO.parent / "shared" / "data" / "ref-llama-16m"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}


def _median_us(times: list[float]) -> float:
    return round(1e6 * statistics.median(times), 1)


def _p99_us(times: list[float]) -> float:
    return round(1e6 * sorted(times)[int(0.99 * (len(times) - 1))], 1)


def llguidance_masks(tokenizer, vocab: int, sequences: list[list[int]]) -> dict:
    import llguidance
    import llguidance.hf

    from miaotui.engine.constraints import JSON_OPTIONS

    start = time.perf_counter()
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    tok_s = time.perf_counter() - start
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=JSON_OPTIONS)
    bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    compile_s, steps = [], []
    for seq in sequences:
        start = time.perf_counter()
        m = llguidance.LLMatcher(ll, grammar, log_level=0)
        compile_s.append(time.perf_counter() - start)
        for token in seq:
            start = time.perf_counter()
            m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
            steps.append(time.perf_counter() - start)
            m.consume_token(token)
    return {
        "tokenizer_s": round(tok_s, 3),
        "compile_us": _median_us(compile_s),
        "mask_us_p50": _median_us(steps),
        "mask_us_p99": _p99_us(steps),
        "steps": len(steps),
    }


def xgrammar_masks(tokenizer, vocab: int, sequences: list[list[int]]) -> dict | str:
    try:
        import xgrammar as xgr
    except ImportError as e:
        return f"not installed ({e})"
    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    compiled = compiler.compile_json_schema(SCHEMA, any_whitespace=False, separators=(", ", ": "))
    tok_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    compile_s, steps = [], []
    for seq in sequences:
        start = time.perf_counter()
        m = xgr.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - start)
        for token in seq:
            start = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            steps.append(time.perf_counter() - start)
            if not m.accept_token(token):
                break
    return {
        "tokenizer_and_compile_s": round(tok_s, 3),
        "matcher_us": _median_us(compile_s),
        "mask_us_p50": _median_us(steps),
        "mask_us_p99": _p99_us(steps),
        "steps": len(steps),
    }


def engine_rounds(engine: Engine, prompt: list[int], batch: int, tokens: int, rounds: int) -> dict:
    variants = {
        "free": dict(ignore_eos=True),
        "json_schema": dict(grammar=Grammar.json_schema(SCHEMA)),
        "logit_bias": dict(ignore_eos=True, logit_bias=((300, 5.0),)),
    }
    times = {name: [] for name in variants}
    counts = {name: [] for name in variants}
    for r in range(rounds):
        for name, extra in variants.items():
            params = [
                SamplingParams(max_tokens=tokens, temperature=0.8, seed=r * 100 + i, **extra) for i in range(batch)
            ]
            start = time.perf_counter()
            done = engine.generate([prompt] * batch, params)
            times[name].append(time.perf_counter() - start)
            counts[name].append(sum(len(d.token_ids) for d in done))
    out = {}
    for name in variants:
        per_token = [1000 * t / max(c, 1) for t, c in zip(times[name], counts[name], strict=True)]
        out[name] = {"ms_per_token": round(statistics.median(per_token), 3), "tokens": statistics.median(counts[name])}
    for name in ("json_schema", "logit_bias"):
        out[name]["vs_free"] = round(out[name]["ms_per_token"] / out["free"]["ms_per_token"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from results_io import write_results

    torch.set_num_threads(2)
    lm = miaotui.load(MODEL, dtype="bfloat16")
    engine = Engine(lm, max_batch=8, max_len=512, compile=True)
    prompt = lm.tokenizer("A person, as JSON:")["input_ids"]
    grammar = Grammar.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=160, temperature=0.9, seed=i, grammar=grammar) for i in range(16)]
    runs = engine.generate([prompt] * 16, params)
    sequences = [r.token_ids for r in runs]
    vocab = lm.model.config.vocab_size
    masks = {
        "llguidance": llguidance_masks(lm.tokenizer, vocab, sequences),
        "xgrammar": xgrammar_masks(lm.tokenizer, vocab, sequences),
    }
    engine_results = {f"batch {b}": engine_rounds(engine, prompt, b, a.tokens, a.rounds) for b in (1, 8)}
    data = {"environment": environment(torch.device("cpu")), "schema": SCHEMA, "masks": masks, "engine": engine_results}
    md = [
        "# Constrained decoding: per-token cost (ref-llama-16m, vocab 8,192, CPU)",
        "",
        f"{data['environment']['date']}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "command: `.venv/bin/python benchmarks/bench_grammar.py`",
        "",
        "Mask computation, replaying 16 sampled JSON-schema outputs:",
        "",
        "| library | mask p50 | mask p99 | per-request matcher | tokenizer set-up |",
        "|---|---|---|---|---|",
    ]
    ll, xg = masks["llguidance"], masks["xgrammar"]
    cells = (ll["mask_us_p50"], ll["mask_us_p99"], ll["compile_us"], ll["tokenizer_s"])
    md.append("| llguidance | {} us | {} us | {} us | {} s |".format(*cells))
    if isinstance(xg, dict):
        md.append(
            f"| xgrammar | {xg['mask_us_p50']} us | {xg['mask_us_p99']} us | {xg['matcher_us']} us | "
            f"{xg['tokenizer_and_compile_s']} s (with the schema's compilation) |"
        )
    else:
        md.append(f"| xgrammar | {xg} | | | |")
    md += [
        "",
        "Engine (compiled decode, sampled at temperature 0.8), ms per generated token (all rows together):",
        "",
        "| batch | free | JSON schema | logit_bias |",
        "|---|---|---|---|",
    ]
    for name, r in engine_results.items():
        md.append(
            f"| {name.split()[1]} | {r['free']['ms_per_token']} | {r['json_schema']['ms_per_token']} "
            f"({r['json_schema']['vs_free']}x) | {r['logit_bias']['ms_per_token']} ({r['logit_bias']['vs_free']}x) |"
        )
    write_results(a.out, "grammar", "cpu", data, md)


if __name__ == "__main__":
    main()
