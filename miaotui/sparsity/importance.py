"""How much each structured part of a model matters, measured on calibration data in one block-by-block pass.

Channel score of input channel j of an output projection W (the MLP down projection, the attention output):
‖X_j‖₂ · ‖W[:, j]‖₂, how far that channel can move the block's output (Wanda's |W|·‖X‖ summed over a column).
A head scores the sum of its channels. Block score: 1 - mean cosine(block input, block output) over tokens
(block influence, as in ShortGPT): a block that barely changes its input is the one to drop.

>>> import torch
>>> w = torch.tensor([[1.0, 0.0], [1.0, 3.0]])  # (out, in)
>>> channel_scores(torch.tensor([4.0, 1.0]), w)  # sum of squared activations per input channel
tensor([2.8284, 3.0000])
>>> choose_heads(torch.tensor([1.0, 5.0, 3.0, 2.0]), num_kv=2, new_heads=2, new_kv=2)  # one per KV group
(tensor([1, 2]), tensor([0, 1]))
>>> choose_heads(torch.tensor([1.0, 5.0, 3.0, 2.0]), num_kv=2, new_heads=2, new_kv=1)  # a whole group
(tensor([0, 1]), tensor([0]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miaotui.calibration import blocks_of, run_blockwise
from miaotui.loading import LoadedModel
from miaotui.sparsity.layout import Layout


@dataclass
class Importance:
    """Statistics of one calibration pass, per block index."""

    mlp_sumsq: list[torch.Tensor]  # per block: (I,) sum of squared inputs of the MLP output projection
    attn_sumsq: list[torch.Tensor]  # per block: (H*D,) sum of squared inputs of the attention output projection
    block_change: torch.Tensor  # (L,) 1 - mean cosine(block input, block output)


def channel_scores(sumsq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """‖X_j‖ · ‖W[:, j]‖ per input channel: sumsq (K,), weight (N, K) -> (K,)."""
    return sumsq.float().sqrt() * weight.detach().float().norm(dim=0)


def choose_heads(
    scores: torch.Tensor, *, num_kv: int, new_heads: int, new_kv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query heads and KV heads to keep, in order: whole KV groups when new_kv < num_kv, else the same
    number of query heads from every group. scores: (H,) with query head h in KV group h // (H / num_kv)."""
    group = scores.numel() // num_kv
    per_group = scores.view(num_kv, group)  # (KV, G)
    if new_kv < num_kv:
        kv = per_group.sum(1).topk(new_kv).indices.sort().values  # (KV',)
        q = (kv[:, None] * group + torch.arange(group)).flatten()  # (KV' * G,)
        return q, kv
    local = per_group.topk(new_heads // num_kv, dim=1).indices.sort(dim=1).values  # (KV, G')
    q = (torch.arange(num_kv)[:, None] * group + local).flatten()  # (KV * G',)
    return q, torch.arange(num_kv)


@torch.no_grad()
def measure_importance(
    lm: LoadedModel, layout: Layout, ids: torch.Tensor, *, progress: bool | None = None
) -> Importance:
    """One calibration pass over token ids (S, T), gathering the statistics of every block."""
    blocks = blocks_of(lm)
    n = len(blocks)
    sumsq: dict[tuple[int, str], torch.Tensor] = {}
    change = torch.zeros(n, dtype=torch.float64)
    tokens = torch.zeros(n, dtype=torch.float64)

    def input_stats(key):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            sumsq[key] = sumsq.get(key, 0) + x.square().sum(0).cpu()  # (K,)

        return hook

    def block_stats(index):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]  # (1, T, H)
            y = out[0] if isinstance(out, tuple) else out  # (1, T, H)
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (1, T)
            change[index] += (1 - cos).sum().item()
            tokens[index] += cos.numel()

        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(block_stats(i), with_kwargs=True))
            for path in filter(None, (layout.mlp_out, layout.attn_out)):
                handles.append(block.get_submodule(path).register_forward_pre_hook(input_stats((i, path))))
        run_blockwise(lm, ids, lambda *_: None, progress=progress)  # the hooks see every block's own forward
    finally:
        for h in handles:
            h.remove()
    return Importance(
        mlp_sumsq=[sumsq.get((i, layout.mlp_out)) for i in range(n)],
        attn_sumsq=[sumsq.get((i, layout.attn_out)) for i in range(n)],
        block_change=change / tokens,
    )
