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
    folds: where per-channel scales can be folded (AWQ, SmoothQuant) without changing the model's function.
    norm_plus_one: the RMSNorms compute x * (1 + weight) (Gemma).
    """

    model_type: str
    kind: str
    blocks: str
    context_attr: str = "max_position_embeddings"
    folds: tuple[Fold, ...] = ()
    norm_plus_one: bool = False


@dataclass(frozen=True)
class Fold:
    """`producer` alone feeds `consumers`, linearly per channel (names relative to a block).

    Dividing the producer's output channel j by s_j and multiplying input channel j of every consumer by s_j keeps
    the block's function. `chunk` (i, n): only the i-th of n equal slices of a fused producer's outputs feeds the
    consumers (the value third of a fused qkv projection); applied only when its size equals the consumers' input
    features (so never across grouped-query attention). `when`: config attributes that must hold.
    """

    producer: str
    consumers: tuple[str, ...]
    chunk: tuple[int, int] | None = None
    when: tuple[tuple[str, object], ...] = ()


# pre-norm decoders: each norm feeds the projections after it; v feeds o through attention (a per-channel linear
# mix over tokens); up feeds down through the gate's product (act(gate) * up)
_LLAMA = (
    Fold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Fold("self_attn.v_proj", ("self_attn.o_proj",)),
    Fold("mlp.up_proj", ("mlp.down_proj",)),
)
_GEMMA2 = (_LLAMA[0], Fold("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), *_LLAMA[2:])
_PHI3 = (
    Fold("input_layernorm", ("self_attn.qkv_proj",)),
    Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
    Fold("self_attn.qkv_proj", ("self_attn.o_proj",), chunk=(2, 3)),
    Fold("mlp.gate_up_proj", ("mlp.down_proj",), chunk=(1, 2)),
)
_GPT2 = (  # c_fc -> c_proj is not foldable: GELU between
    Fold("ln_1", ("attn.c_attn",)),
    Fold("ln_2", ("mlp.c_fc",)),
    Fold("attn.c_attn", ("attn.c_proj",), chunk=(2, 3)),
)
_PRE_LN = (("do_layer_norm_before", True),)
_OPT = (
    Fold("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), when=_PRE_LN),
    Fold("self_attn.v_proj", ("self_attn.out_proj",)),
    Fold("final_layer_norm", ("fc1",), when=_PRE_LN),
    Fold("fc1", ("fc2",), when=(("activation_function", "relu"),)),  # relu(x / s) = relu(x) / s for s > 0
)
# post-LN encoders: every LayerNorm also feeds the residual stream, and GELU sits between the two FFN linears;
# only value -> attention output is foldable
_BERT = (Fold("attention.self.value", ("attention.output.dense",)),)


_TABLE = [
    ArchInfo("llama", CAUSAL_LM, "model.layers", folds=_LLAMA),
    ArchInfo("mistral", CAUSAL_LM, "model.layers", folds=_LLAMA),
    ArchInfo("qwen2", CAUSAL_LM, "model.layers", folds=_LLAMA),
    ArchInfo("qwen3", CAUSAL_LM, "model.layers", folds=_LLAMA),  # q_norm/k_norm act after q/k: no effect
    ArchInfo("phi3", CAUSAL_LM, "model.layers", folds=_PHI3),
    ArchInfo("gemma", CAUSAL_LM, "model.layers", folds=_LLAMA, norm_plus_one=True),
    ArchInfo("gemma2", CAUSAL_LM, "model.layers", folds=_GEMMA2, norm_plus_one=True),
    ArchInfo("gpt2", CAUSAL_LM, "transformer.h", context_attr="n_positions", folds=_GPT2),
    ArchInfo("opt", CAUSAL_LM, "model.decoder.layers", folds=_OPT),
    ArchInfo("bert", ENCODER, "encoder.layer", folds=_BERT),
    ArchInfo("roberta", ENCODER, "encoder.layer", folds=_BERT),
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
