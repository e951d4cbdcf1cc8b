"""The model families the tests build as tiny random models (2 blocks, hidden 64), with their configs.

miaotui lists no families itself; these are the ones its tests cover. CORE: the families most tests sweep;
FAMILIES: every family the family test (test_families.py) runs end to end.
"""

from __future__ import annotations

CORE = ("bert", "gemma", "gemma2", "gpt2", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3", "roberta")
DECODERS = (
    "cohere",
    "falcon",
    "gemma3_text",
    "glm",
    "gpt_neox",
    "gptj",
    "granite",
    "olmo2",
    "phi",
    "smollm3",
    "stablelm",
    "starcoder2",
)
MOE = ("deepseek_v3", "gpt_oss", "llama4_text", "mixtral", "qwen2_moe", "qwen3_moe")
ENCODERS = ("deberta-v2", "distilbert", "electra", "modernbert", "xlm-roberta")
CLASSIFIERS = ("llama-cls",)  # a decoder with a sequence-classification head
FAMILIES = tuple(sorted(CORE + DECODERS + MOE + ENCODERS + CLASSIFIERS))
ENCODER_TYPES = {"bert", "roberta", *ENCODERS}

_COMMON = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
_DECODER = dict(_COMMON, vocab_size=8192, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
_MOE = dict(_DECODER, moe_intermediate_size=64, num_experts_per_tok=2)
_ENCODER = dict(_COMMON, vocab_size=30522, max_position_embeddings=256, pad_token_id=0)
_SPECIAL = {
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma": dict(_DECODER, head_dim=16),
    "gemma2": dict(_DECODER, head_dim=16),
    "gemma3_text": dict(_DECODER, head_dim=16, sliding_window=8),  # a sliding layer with a short window
    "gpt2": dict(vocab_size=8192, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": dict(
        vocab_size=8192,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
    "gptj": dict(vocab_size=8192, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    "gpt_neox": dict(_DECODER, num_key_value_heads=None),
    "falcon": dict(_DECODER, num_key_value_heads=None, multi_query=True),
    "phi": dict(_DECODER, num_key_value_heads=None),
    "stablelm": dict(_DECODER, num_key_value_heads=4),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_MOE, num_experts=4, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(_MOE, num_experts=4, head_dim=16),
    "deepseek_v3": dict(
        _MOE,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        num_key_value_heads=4,
    ),
    "llama4_text": dict(
        _DECODER,
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size_mlp=128,
        head_dim=16,
        attention_chunk_size=8,
    ),
    "gpt_oss": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8),
    "modernbert": dict(_ENCODER, global_attn_every_n_layers=2, local_attention=8),
}


def model_type(family: str) -> str:
    return "llama" if family == "llama-cls" else family


def tiny_config(family: str):
    """A small random config of `family` (2 blocks, hidden 64); llama-cls carries a 2-label head."""
    from transformers import AutoConfig

    kwargs = _SPECIAL.get(family, _ENCODER if family in ENCODER_TYPES else _DECODER)
    config = AutoConfig.for_model(model_type(family), **kwargs)
    if family == "llama-cls":
        config.num_labels, config.architectures = 2, ["LlamaForSequenceClassification"]
    return config
