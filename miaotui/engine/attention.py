"""Attention for the engine: SDPA that lets query heads share key/value heads without copying them.

Hugging Face's SDPA path repeats the keys and values of grouped-query attention for every query head whenever
a mask is given, which the engine always gives: at batch 32 that copies the whole cache in every layer of every
step. `miaotui_sdpa` hands SDPA the mask with `enable_gqa` instead; without a mask it is Hugging Face's SDPA, and
its masks are SDPA's, so a model switched to it computes the same function everywhere.

>>> "miaotui_sdpa" in __import__("transformers").AttentionInterface._global_mapping
True
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "miaotui_sdpa"


def gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (B, Hq, q, D), key/value (B, Hkv, T, D), mask (B, 1, q, T) -> ((B, q, Hq, D), None)."""
    if attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_gqa_sdpa(model) -> None:
    """Switch a model that runs on SDPA to `miaotui_sdpa` (others, e.g. eager with soft-capping, stay)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
