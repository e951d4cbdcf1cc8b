"""Attention for the engine: SDPA that lets query heads share key/value heads without copying them.

Hugging Face's SDPA path repeats the keys and values of grouped-query attention for every query head whenever
a mask is given, which the engine always gives: at batch 32 that copies the whole cache in every layer of every
step. `miaotui_sdpa` hands SDPA the mask with `enable_gqa` instead; without a mask it is Hugging Face's SDPA, and
its masks are SDPA's, so a model switched to it computes the same function everywhere. On the CPU, one query per
row (decoding) skips SDPA's kernel where it is slow: in a compiled step, and in bf16/fp16 (`_decode_attention`).

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
    single = query.shape[2] == 1 and attention_mask.shape[1] == 1 and query.device.type == "cpu"
    if single and (torch.compiler.is_compiling() or query.dtype != torch.float32):
        return _decode_attention(query, key, value, attention_mask, scaling), None
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


def _decode_attention(query, key, value, mask, scaling=None, fused: bool | None = None) -> torch.Tensor:
    """Attention of one query per row on the CPU, where SDPA's kernel is slow at that shape.

    fused (by default: while compiling): the scores as a multiply-sum over the head dimension, which inductor fuses
    with the gather of the keys from the paged cache and the query's rotary embedding; the values by a batched
    matmul on the gathered values (a multiply-sum over positions vectorizes along the positions, an element-wise
    gather from the cache's slots: 2x slower at batch 32). Otherwise two batched matmuls: in bf16 at batch 32 and
    256 positions 137 against 1,939 us a layer for SDPA with a mask (2 cores). q (B, Hq, 1, D), key/value
    (B, Hkv, T, D), mask (B, 1, 1, T) additive or boolean -> (B, 1, Hq, D).

    >>> q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    >>> _decode_attention(q, kv, kv, torch.zeros(1, 1, 1, 5)).shape
    torch.Size([1, 1, 4, 8])
    """
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    scale = d**-0.5 if scaling is None else scaling
    q = query.reshape(b, hkv, hq // hkv, d)  # (B, Hkv, G, D): query head h reads key/value head h // G
    fused = torch.compiler.is_compiling() if fused is None else fused
    if fused:
        scores = (q[:, :, :, None].float() * key[:, :, None].float()).sum(-1)  # (B, Hkv, G, T)
    else:
        scores = (q @ key.transpose(-1, -2)).float()  # (B, Hkv, G, T)
    probs = (scores * scale + mask.float()).softmax(-1)
    out = probs.to(value.dtype) @ value  # (B, Hkv, G, D)
    return out.reshape(b, 1, hq, d).to(query.dtype)  # out: (B, Hkv, G, D)


AttentionInterface.register(NAME, gqa_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_gqa_sdpa(model) -> None:
    """Switch a model that runs on SDPA to `miaotui_sdpa` (others, e.g. eager with soft-capping, stay)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
