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
