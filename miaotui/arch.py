"""What miaotui needs to know about a model's architecture, read from its config and its module tree.

Nothing here lists model families. The kind (a causal LM, or an encoder / classifier) comes from the config's
architecture name or from transformers' own auto mappings; the transformer blocks are the model's list of
identical modules, as many as the config's layer count; the context length is the config's position limit.
What needs a forward pass to see (which norm or linear feeds which, experts) is discovered where it is used,
on real activations (`miaotui.quantize.folding`, `miaotui.experts`).

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4)
>>> kind_of(config)
'causal-lm'
>>> arch = discover(LlamaForCausalLM(config))
>>> arch.blocks, arch.context_attr
('model.layers', 'max_position_embeddings')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from miaotui.errors import MiaotuiError

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"  # embeddings, or a classification head on any encoder or decoder
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
CLASSIFIER_HEAD = "ForSequenceClassification"
# config attributes, by the names transformers' configs use, that hold the layer count and the context length
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class ArchInfo:
    """What miaotui knows about one loaded model.

    model_type: the Hugging Face `config.model_type`.
    kind: "causal-lm" (next-token logits) or "encoder" (embeddings or classification logits).
    blocks: dotted path from the model (with its head) to its list of transformer blocks.
    context_attr: the config attribute holding the maximum sequence length, or None when there is none.
    """

    model_type: str
    kind: str
    blocks: str
    context_attr: str | None = None


def _auto_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    return set(getattr(modeling_auto, mapping_name, {}))


def kind_of(config) -> str:
    """ "causal-lm" or "encoder", from the config's architecture name, else from transformers' auto mappings.

    A `*ForSequenceClassification` head makes any model (a decoder too) an "encoder": it classifies.
    Encoder-decoder models are refused: miaotui runs decoder-only LMs and encoders.
    """
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise MiaotuiError(
            f"{model_type!r} is an encoder-decoder model; miaotui supports decoder-only causal LMs and encoders"
        )
    names = list(getattr(config, "architectures", None) or [])
    if names:
        return CAUSAL_LM if names[0].endswith(CAUSAL_HEADS) else ENCODER
    causal = model_type in _auto_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if causal and model_type not in _auto_names("MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        return CAUSAL_LM
    if causal or model_type in _auto_names("MODEL_MAPPING_NAMES"):
        return ENCODER
    raise MiaotuiError(
        f"unsupported architecture {model_type!r}: transformers has no causal-LM or encoder model for it"
    )


def is_classifier(config) -> bool:
    """True when the config names a sequence-classification head."""
    names = list(getattr(config, "architectures", None) or [])
    return bool(names) and names[0].endswith(CLASSIFIER_HEAD)


def num_layers(config) -> int | None:
    """The layer count the config states (of its text part), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LAYER_COUNT_ATTRS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _has_weights(module: nn.Module) -> bool:
    """Whether the module holds a matrix (a parameter, or a packed layer's buffer)."""
    return any(t.dim() >= 2 for t in (*module.parameters(), *module.buffers()))


def find_blocks(model: nn.Module) -> str:
    """Dotted path of the model's transformer blocks: a list of modules of one type, each holding weights.

    With several such lists, the first (outermost) one as long as the config's layer count, else the longest.
    """
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1 and _has_weights(mod[0]):
            candidates.append((name, len(mod)))
    if not candidates:
        raise MiaotuiError(f"cannot find the transformer blocks of {type(model).__name__}: it has no list of layers")
    count = num_layers(model.config)
    exact = [name for name, n in candidates if n == count]
    return exact[0] if exact else max(candidates, key=lambda c: c[1])[0]


def context_attr(config) -> str | None:
    """The config attribute holding the maximum number of positions, or None (e.g. ALiBi models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((a for a in CONTEXT_ATTRS if isinstance(getattr(text, a, None), int)), None)


def discover(model: nn.Module, kind: str | None = None) -> ArchInfo:
    """The ArchInfo of a built model (its kind from the config unless given)."""
    config = model.config
    return ArchInfo(
        model_type=config.model_type,
        kind=kind or kind_of(config),
        blocks=find_blocks(model),
        context_attr=context_attr(config),
    )


def context_length(config, arch: ArchInfo) -> int | None:
    """Maximum number of positions the model accepts (None when the config does not say)."""
    if arch.context_attr is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, arch.context_attr, None)
    return int(value) if value else None
