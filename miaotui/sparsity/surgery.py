"""Cut a transformer into a smaller dense one: keep chosen features of linear layers, heads, blocks.

Everything here changes real shapes (new, smaller weight tensors); the config updates live in
miaotui.sparsity.structured, which decides what to keep.

>>> import torch, torch.nn as nn
>>> lin = nn.Linear(4, 3)
>>> keep_features(lin, torch.tensor([0, 2]), "out")
>>> lin
Linear(in_features=4, out_features=2, bias=True)
>>> head_rows(torch.tensor([0, 2]), head_dim=2)
tensor([0, 1, 4, 5])
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from miaotui.sparsity.layout import Layout


def keep_features(module: nn.Module, index: torch.Tensor, side: str) -> None:
    """Keep only the output ("out") or input ("in") features `index` of an nn.Linear or Conv1D, in place."""
    w = module.weight
    conv = isinstance(module, Conv1D)  # Conv1D stores (in, out)
    axis = (0 if side == "out" else 1) ^ int(conv)
    index = index.to(w.device)
    module.weight = nn.Parameter(w.detach().index_select(axis, index).contiguous(), requires_grad=w.requires_grad)
    if side == "out" and module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach()[index].contiguous(), requires_grad=module.bias.requires_grad)
    if conv:
        module.nf = module.weight.shape[1]
    elif side == "out":
        module.out_features = len(index)
    else:
        module.in_features = len(index)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of whole heads: (n,) head ids -> (n * head_dim,)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def slim_mlp_(block: nn.Module, layout: Layout, keep: torch.Tensor, size: int) -> None:
    """Keep the intermediate channels `keep` (of `size`) in one block's MLP."""
    for path in layout.mlp_in:
        rows = torch.cat([keep + c * size for c in range(layout.mlp_chunks)])  # every stacked chunk (gate | up)
        keep_features(block.get_submodule(path), rows, "out")
    keep_features(block.get_submodule(layout.mlp_out), keep, "in")


def slim_heads_(
    block: nn.Module, layout: Layout, q: torch.Tensor, kv: torch.Tensor, *, num_heads: int, num_kv: int, head_dim: int
) -> None:
    """Keep query heads `q` and key/value heads `kv` in one block's attention (and its output projection)."""
    q_rows, kv_rows = head_rows(q, head_dim), head_rows(kv, head_dim)
    if len(layout.qkv) == 1:  # fused [q | k | v]
        k0, v0 = num_heads * head_dim, (num_heads + num_kv) * head_dim
        keep_features(block.get_submodule(layout.qkv[0]), torch.cat([q_rows, k0 + kv_rows, v0 + kv_rows]), "out")
    else:
        for path, rows in zip(layout.qkv, (q_rows, kv_rows, kv_rows), strict=True):
            keep_features(block.get_submodule(path), rows, "out")
    keep_features(block.get_submodule(layout.attn_out), q_rows, "in")
    attn = block.get_submodule(layout.attn_out.rpartition(".")[0])
    counts = {"num_heads": len(q), "num_key_value_heads": len(kv), "num_key_value_groups": len(q) // len(kv)}
    for name, value in counts.items():
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)


def drop_blocks_(blocks: nn.ModuleList, drop: list[int]) -> None:
    """Remove the blocks at `drop` and renumber the `layer_idx` of the rest (the KV cache slot of each block)."""
    for i in sorted(drop, reverse=True):
        del blocks[i]
    for i, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i
