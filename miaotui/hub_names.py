"""The names a family's checkpoints give to a model's tensors, learnt from transformers' own conversion mapping.

transformers loads some checkpoints under other names than its modules have, and merges per-expert weights
(`experts.3.w1.weight`, `experts.3.w3.weight`) into fused 3-D tensors (`experts.gate_up_proj`). An export must
write the checkpoint's layout, which vLLM and transformers load. Rather than list those layouts, this asks
transformers to revert its conversions on probe tensors: each fused experts tensor is replaced by (E, rows, 1)
codes e * rows + r, so the reverted tensors tell which expert and which rows each checkpoint tensor holds.

>>> import torch
>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> config = MixtralConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=8, num_local_experts=2,
...                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
>>> with torch.device("meta"):
...     model = MixtralForCausalLM(config)
>>> rename(model, ["model.layers.0.mlp.gate.weight"])
{'model.layers.0.mlp.gate.weight': 'model.layers.0.block_sparse_moe.gate.weight'}
>>> parts = expert_parts(model, "model.layers.0.mlp.experts", 2, "gate_up_proj", 16, 16)
>>> for hub, expert, projection, rows in parts[:3]:  # expert 0: gate (w1), down (w2), up (w3)
...     print(hub.split(".", 3)[-1], expert, projection, rows.tolist()[:3], len(rows))
block_sparse_moe.experts.0.w1 0 gate_up_proj [0, 1, 2] 8
block_sparse_moe.experts.0.w2 0 down_proj [0, 1, 2] 16
block_sparse_moe.experts.0.w3 0 gate_up_proj [8, 9, 10] 8
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.errors import MiaotuiError


def revert(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (module names) under the family's checkpoint names, merged tensors split as they store them."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def rename(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """{key: its name in the family's checkpoints} for tensor keys that are only renamed (not merged or split)."""
    out = {}
    for key in keys:
        reverted = revert(model, {key: torch.zeros(1, 1)})
        if len(reverted) != 1:
            raise MiaotuiError(f"{key} is stored split or merged in this family's checkpoints; cannot export it alone")
        out[key] = next(iter(reverted))
    return out


def expert_parts(
    model: nn.Module, name: str, experts: int, up_name: str, up_rows: int, down_rows: int
) -> list[tuple[str, int, str, torch.Tensor]]:
    """Where the experts module `name` goes in the family's checkpoints: [(checkpoint module name, expert,
    "up_name" or "down_proj", the rows of that expert's projection it holds)].

    Raises MiaotuiError when the checkpoints keep the experts fused (no per-expert layers to quantize).
    """
    up_codes = torch.arange(experts * up_rows).view(experts, up_rows, 1)
    down_codes = experts * up_rows + torch.arange(experts * down_rows).view(experts, down_rows, 1)
    reverted = revert(model, {f"{name}.{up_name}": up_codes, f"{name}.down_proj": down_codes})
    parts = []
    for key, codes in sorted(reverted.items()):
        codes = codes.flatten()
        if not key.endswith(".weight") or len(reverted) < 2 * experts:
            raise MiaotuiError(
                f"{name}: this family's checkpoints keep the experts fused ({key}); compressed-tensors quantizes "
                "per-expert linear layers only"
            )
        is_up = bool(codes[0] < experts * up_rows)
        rows = up_rows if is_up else down_rows
        local = codes if is_up else codes - experts * up_rows
        expert = int(local[0]) // rows
        if not bool((local // rows == expert).all()):
            raise MiaotuiError(f"{name}: checkpoint tensor {key} mixes experts; cannot export it")
        parts.append((key.removesuffix(".weight"), expert, up_name if is_up else "down_proj", local % rows))
    return parts
