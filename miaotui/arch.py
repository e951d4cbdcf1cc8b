"""Per-architecture knowledge in one small table: which families we support and how they are laid out.

>>> from transformers import LlamaConfig
>>> arch_of(LlamaConfig()).kind
'causal-lm'
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.errors import MiaotuiError

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


@dataclass(frozen=True)
class ArchInfo:
    """What miaotui needs to know about one model family.

    model_type: the Hugging Face `config.model_type`.
    kind: "causal-lm" (decoder, next-token logits) or "encoder" (embeddings / classification).
    blocks: dotted path from the base model to its list of transformer blocks.
    context_attr: config attribute holding the maximum sequence length.
    """

    model_type: str
    kind: str
    blocks: str
    context_attr: str = "max_position_embeddings"


_TABLE = [
    ArchInfo("llama", CAUSAL_LM, "model.layers"),
    ArchInfo("mistral", CAUSAL_LM, "model.layers"),
    ArchInfo("qwen2", CAUSAL_LM, "model.layers"),
    ArchInfo("qwen3", CAUSAL_LM, "model.layers"),
    ArchInfo("phi3", CAUSAL_LM, "model.layers"),
    ArchInfo("gemma", CAUSAL_LM, "model.layers"),
    ArchInfo("gemma2", CAUSAL_LM, "model.layers"),
    ArchInfo("gpt2", CAUSAL_LM, "transformer.h", context_attr="n_positions"),
    ArchInfo("opt", CAUSAL_LM, "model.decoder.layers"),
    ArchInfo("bert", ENCODER, "encoder.layer"),
    ArchInfo("roberta", ENCODER, "encoder.layer"),
]
SUPPORTED: dict[str, ArchInfo] = {a.model_type: a for a in _TABLE}


def arch_of(config) -> ArchInfo:
    """The table entry for a transformers config, or a MiaotuiError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise MiaotuiError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(sorted(SUPPORTED))}"
        )
    return SUPPORTED[model_type]


def context_length(config, arch: ArchInfo) -> int | None:
    """Maximum number of positions the model accepts (None when the config does not say)."""
    value = getattr(config, arch.context_attr, None)
    return int(value) if value else None


@dataclass(frozen=True)
class Layout:
    """Where the structured parts of one transformer block live (dotted paths inside the block).

    qkv: the query, key and value projections, or one fused projection laid out [q | k | v]; empty where the
        family derives head_dim from hidden_size / heads, so removing heads would change it.
    attn_out: the attention output projection (heads along its input features).
    mlp_in: the projections producing the MLP intermediate channels; mlp_chunks of them are stacked in each
        output (a fused gate_up: 2). mlp_out: the projection consuming them.
    mlp_size: the config attribute holding the intermediate size.
    """

    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    qkv: tuple[str, ...] = ()
    mlp_size: str = "intermediate_size"
    mlp_chunks: int = 1


_LLAMA_LAYOUT = Layout(
    "self_attn.o_proj",
    ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
_BERT_LAYOUT = Layout("attention.output.dense", ("intermediate.dense",), "output.dense")
LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA_LAYOUT),
    "phi3": Layout(
        "self_attn.o_proj", ("mlp.gate_up_proj",), "mlp.down_proj", qkv=("self_attn.qkv_proj",), mlp_chunks=2
    ),
    "gpt2": Layout("attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", mlp_size="n_inner"),
    "opt": Layout("self_attn.out_proj", ("fc1",), "fc2", mlp_size="ffn_dim"),
    "bert": _BERT_LAYOUT,
    "roberta": _BERT_LAYOUT,
}
