"""llama.cpp as a baseline: write a Llama or Qwen3-MoE Hugging Face model as GGUF and time it with llama-cpp-python.

Needs `pip install llama-cpp-python==0.3.36 gguf==0.19.0` (llama-cpp-python builds llama.cpp from source; a few
minutes). The GGUF is written here (f16), then quantized to q8_0 / q4_0 by llama.cpp's own quantizer. Before any
timing, `check_agreement` compares llama.cpp's next-token choices on a prompt with the Hugging Face model's, so a
wrong conversion cannot pass as a fast one.

>>> path = write_gguf(lm, "model-f16.gguf")  # doctest: +SKIP
>>> quantize_gguf(path, "model-q4_0.gguf", "q4_0")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path

import numpy as np
import torch

FTYPES = {"q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* values


def _rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    out_features = w.shape[0]
    half = out_features // heads // 2
    return w.reshape(heads, 2, half, -1).transpose(1, 2).reshape(out_features, -1)  # (out, in)


def _tokenizer_fields(folder: Path, vocab_size: int) -> dict:
    """Byte-level BPE vocabulary, merges and token types from a tokenizer.json; ids past the tokenizer's up to
    the model's vocab_size become unused padding tokens."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are written, not {model.get('type')}")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, max(vocab.values()) + 1))]
    for text, i in vocab.items():
        tokens[i] = text
    known = set(vocab.values())
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if i in special else 1 if i in known else 5 for i in range(len(tokens))]
    return {"tokens": tokens, "types": types, "merges": merges}


ARCHES = {"llama": "llama", "qwen3_moe": "qwen3moe"}  # Hugging Face model_type -> llama.cpp architecture
NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # a mixture of experts' router
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _header(w, cfg, heads: int, kv_heads: int, head_dim: int) -> None:
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)  # mostly f16
    if cfg.model_type == "qwen3_moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def _tokenizer(w, cfg, folder: Path) -> None:
    tok = _tokenizer_fields(Path(folder), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else 0)
    w.add_eos_token_id(cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0)
    w.add_add_bos_token(False)


def write_gguf(lm, path: str | Path, folder: str | Path) -> Path:
    """Write a Llama or Qwen3-MoE LoadedModel (weights in f16) as GGUF; `folder` holds its tokenizer.json."""
    import gguf

    cfg = lm.model.config
    if cfg.model_type not in ARCHES:
        raise ValueError(f"only {', '.join(ARCHES)} models are written as GGUF here, not {cfg.model_type}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), ARCHES[cfg.model_type])
    _header(w, cfg, heads, kv_heads, head_dim)
    _tokenizer(w, cfg, folder)

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().float().cpu()
        w.add_tensor(name, t.numpy().astype(np.float32 if t.ndim == 1 else np.float16))  # norms stay f32

    inner = lm.model.model
    llama = cfg.model_type == "llama"  # llama.cpp's Llama rotates interleaved pairs; Qwen3 halves, as HF
    add("token_embd.weight", inner.embed_tokens.weight)
    for i, block in enumerate(inner.layers):
        for hf_name, short in NAMES.items():
            try:
                weight = block.get_submodule(hf_name).weight
            except AttributeError:
                continue  # not in this family
            if llama and short in ("attn_q", "attn_k"):
                weight = _rope_rows(weight, heads if short == "attn_q" else kv_heads)
            add(f"blk.{i}.{short}.weight", weight)
        experts = getattr(block.mlp, "experts", None)
        if experts is not None:  # fused (E, 2I, H) [gate | up] and (E, H, I), as llama.cpp stores them
            gate, up = experts.gate_up_proj.chunk(2, dim=1)
            add(f"blk.{i}.ffn_gate_exps.weight", gate)
            add(f"blk.{i}.ffn_up_exps.weight", up)
            add(f"blk.{i}.ffn_down_exps.weight", experts.down_proj)
    add("output_norm.weight", inner.norm.weight)
    if not cfg.tie_word_embeddings:
        add("output.weight", lm.model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def quantize_gguf(src: str | Path, dst: str | Path, kind: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), e.g. kind "q4_0"."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    return Path(dst)


def load_llama(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False):
    import llama_cpp

    with _repack(not _has_experts(path)):
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512, logits_all=logits_all, verbose=False
        )


def _has_experts(path: str | Path) -> bool:
    from gguf import GGUFReader

    return any(t.name.endswith("_exps.weight") for t in GGUFReader(str(path)).tensors)


@contextlib.contextmanager
def _repack(enabled: bool):
    """llama.cpp's CPU weight repacking ("extra buffer types") on or off. llama-cpp-python 0.3.36 crashes in
    decode on a quantized mixture-of-experts GGUF with it on (mul_mat_id on repacked q4_0/q8_0), so such models
    load with it off: slower q4_0/q8_0 matmuls, the peer's fastest path that runs."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = enabled
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def check_agreement(lm, path: str | Path, ids: list[int], threads: int) -> float:
    """Share of positions where llama.cpp's most likely next token equals the Hugging Face model's."""
    llm = load_llama(path, n_ctx=len(ids) + 8, threads=threads, logits_all=True)
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)]).argmax(-1)
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([ids])).logits[0].float().argmax(-1).numpy()
    return float((ours == ref).mean())


def greedy_runner(path: str | Path, prompt_ids: list[int], new_tokens: int, threads: int):
    """A callable that generates `new_tokens` greedy tokens after `prompt_ids` from a fresh context each call."""
    llm = load_llama(path, n_ctx=len(prompt_ids) + new_tokens + 8, threads=threads)

    def run() -> list[int]:
        llm.reset()  # no prompt cache between calls: every call prefills
        out = []
        for token in llm.generate(prompt_ids, temp=0.0, reset=True):
            out.append(token)
            if len(out) == new_tokens:
                break
        return out

    run.close = llm.close  # free llama.cpp's model before the interpreter exits
    return run
