"""Batch-1 decoding of a mixture of experts: miaotui's engine against Hugging Face `generate` and llama.cpp.

Model: random weights (they do not change speed; the random router still picks different experts per token) of
Qwen3-30B-A3B's block shape: hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of 768 channels, 8 per
token, vocabulary 151,936; with `--layers` blocks instead of 48, so that it fits in memory. Variants, interleaved
over repeats (median reported), one greedy generation each from the same prompt: HF `generate` (bf16, its experts
implementation), the engine compiled in bf16 and on w8 and w4-rtn copies (experts unfused into per-expert packed
layers, each token running only its 8; lm_head in w8, as llama.cpp quantizes its output matrix), and llama.cpp f16 /
q8_0 / q4_0 through llama-cpp-python (`--llama-cpp`, from a GGUF of the same weights, checked for next-token
agreement first). Each row gives the bytes a decode step reads (every tensor but the embedding table, only the
routed experts) and the % of the measured copy bandwidth that tokens/s reaches.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_moe.py [--layers 3] [--new-tokens 32] [--llama-cpp]

Writes benchmarks/results/moe-speed-<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from results_io import write_results

from miaotui.bench import copy_bandwidth, decode_bytes_per_token, experts_info, timed

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=False,
)


def random_moe(layers: int):
    """A LoadedModel of random weights of Qwen3-30B-A3B's shape with `layers` blocks, bf16, ref-llama's tokenizer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from miaotui.arch import CAUSAL_LM, discover
    from miaotui.loading import LoadedModel, load_tokenizer

    config = Qwen3MoeConfig(**QWEN3_30B_A3B, num_hidden_layers=layers, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    tokenizer = load_tokenizer(str(DATA / "ref-llama-16m"), CAUSAL_LM)
    return LoadedModel(model, tokenizer, discover(model, CAUSAL_LM), f"random Qwen3-30B-A3B shape, {layers} blocks")


def variants(lm, prompt: list[int], a, tmp: Path) -> dict:
    """name -> (callable generating a.new_tokens tokens, the model it runs or None)."""
    from miaotui.api import Engine, SamplingParams, apply_recipe, get_recipe

    n = a.new_tokens
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    ids = torch.tensor([prompt])
    out = {
        "hf generate": (
            lambda: lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0),
            lm,
        )
    }
    engine = Engine(lm, max_len=len(prompt) + n, compile=True)
    out["engine compiled, bf16"] = (lambda: engine.generate([prompt], params), lm)
    for recipe in ("w8", "w4-rtn"):
        q = _copy_sharing_embeddings(lm)
        apply_recipe(q, _with_head_w8(get_recipe(recipe)), progress=False)
        e = Engine(q, max_len=len(prompt) + n, compile=True)
        out[f"engine compiled, {recipe} (lm_head w8)"] = (lambda e=e: e.generate([prompt], params), q)
    if a.llama_cpp:
        out.update(llama_cpp_variants(lm, prompt, n, tmp))
    return out


def _with_head_w8(recipe):
    """`recipe` plus lm_head in w8. The built-in recipes keep lm_head in full precision; llama.cpp quantizes its
    output matrix (q8_0 under q8_0, q6_K under q4_0), and at a few blocks and a 152k vocabulary it is most of
    a step's bytes: w8 here compares like with like."""
    from miaotui.api import Recipe
    from miaotui.recipe import step_from_dict

    head = step_from_dict({"type": "quantize", "scheme": "w8", "targets": ["lm_head"], "ignore": []})
    return Recipe(steps=(*recipe.steps, head), name=f"{recipe.name}+head-w8")


def _copy_sharing_embeddings(lm):
    """A deep copy of `lm` sharing its input embedding table (never quantized): 0.6 GB less per copy."""
    shared = [lm.model.get_input_embeddings().weight]
    return copy.deepcopy(lm, memo={id(t): t for t in shared})


def llama_cpp_variants(lm, prompt: list[int], n: int, tmp: Path) -> dict:
    from llamacpp import check_agreement, greedy_runner, quantize_gguf, write_gguf

    f16 = write_gguf(lm, tmp / "f16.gguf", DATA / "ref-llama-16m")
    files = {"f16": f16, **{k: quantize_gguf(f16, tmp / f"{k}.gguf", k) for k in ("q8_0", "q4_0")}}
    threads = torch.get_num_threads()
    out = {}
    for kind, path in files.items():
        agreement = check_agreement(lm, path, prompt, threads)
        print(f"llama.cpp {kind}: next-token agreement {100 * agreement:.1f} %", file=sys.stderr)
        out[f"llama.cpp {kind}"] = (greedy_runner(path, prompt, n, threads), None, path, agreement)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (needs llama-cpp-python, gguf)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    lm = random_moe(a.layers)
    prompt = torch.randint(5, 8000, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    bandwidth = copy_bandwidth(lm.device)
    info = experts_info(lm.model)
    with tempfile.TemporaryDirectory() as tmp:
        runs = variants(lm, prompt, a, Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.repeats):  # interleaved: every variant once per round
            for name, (fn, *_) in runs.items():
                with torch.inference_mode():
                    times[name].append(timed(fn, lm.device))
        rows = {}
        for name, (_, model, *gguf) in runs.items():
            seconds = statistics.median(times[name])
            step = decode_bytes_per_token(model, info if model is lm else None) if model else _gguf_bytes(gguf[0], lm)
            rows[name] = {
                "tokens_per_s": a.new_tokens / seconds,
                "seconds": seconds,
                "bytes_per_token": step,
                "bandwidth_pct": 100 * a.new_tokens / seconds * step / bandwidth,
            }
            if gguf:
                rows[name]["next_token_agreement_with_hf"] = gguf[1]
    md = _markdown(rows, lm, a, bandwidth, info)
    write_results(a.out, "moe-speed", lm.device.type, {"rows": rows, "experts": info, "args": vars(a)}, md)


def _gguf_bytes(path: Path, lm) -> int:
    """Bytes a llama.cpp decode step reads from its GGUF: the file, less the embedding table but one row and
    less the experts a token is not routed to (their share of the file, as for our models)."""
    from miaotui.bench import tensor_bytes

    total = path.stat().st_size
    dense = decode_bytes_per_token(lm)  # our bf16 model's ratio of read to stored bytes applies to the GGUF too
    return int(total * dense / tensor_bytes(lm.model))


def _markdown(rows: dict, lm, a, bandwidth: float, info: dict) -> list[str]:
    base = rows["hf generate"]["tokens_per_s"]
    md = [
        f"# Mixture-of-experts decoding, {lm.source} (CPU, {torch.get_num_threads()} threads)",
        "",
        f"Batch 1, {a.prompt_len}-token prompt, {a.new_tokens} new tokens (prefill included), median of "
        f"{a.repeats} interleaved rounds. {info['experts']} experts per block, {info['per_token']:.0f} per token; "
        f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| variant | tokens/s | vs HF generate | bytes read per token | % of bandwidth |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x "
            f"| {r['bytes_per_token'] / 1e6:.0f} MB | {r['bandwidth_pct']:.0f} % |"
        )
    agree = {n: r["next_token_agreement_with_hf"] for n, r in rows.items() if "next_token_agreement_with_hf" in r}
    if agree:
        md += [
            "",
            "llama.cpp's next-token agreement with HF on the prompt (random weights leave near-ties, so f16 "
            "against bf16 differs too): " + ", ".join(f"{n} {100 * v:.0f} %" for n, v in agree.items()) + ". "
            "Its MoE GGUFs load with CPU weight repacking off: llama-cpp-python 0.3.36 crashes in decode on "
            "quantized experts with it on.",
        ]
    md += ["", f"`PYTHONPATH=. .venv/bin/python benchmarks/bench_moe.py {' '.join(sys.argv[1:])}`"]
    return md


if __name__ == "__main__":
    main()
