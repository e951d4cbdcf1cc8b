"""Which weights to prune given their importance scores: exact counts, unstructured or N:M.

>>> import torch
>>> scores = torch.tensor([[1.0, 4.0, 2.0, 3.0], [8.0, 5.0, 7.0, 6.0]])
>>> prune_mask(scores, 0.5).int().tolist()  # per output row: the lowest half of each row
[[1, 0, 1, 0], [0, 1, 0, 1]]
>>> prune_mask(scores, 0.5, per_row=False).int().tolist()  # the lowest half of the whole matrix
[[1, 1, 1, 1], [0, 0, 0, 0]]
>>> prune_mask(scores, 0.5, nm=(1, 2)).int().tolist()  # 1:2, the lower of each pair
[[1, 0, 1, 0], [0, 1, 0, 1]]
"""

from __future__ import annotations

import torch

from miaotui.sparsity.semi_structured import nm_prune_mask


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity ratio removes (rounded to the nearest)."""
    return round(sparsity * numel)


def prune_mask(
    scores: torch.Tensor, sparsity: float, *, nm: tuple[int, int] | None = None, per_row: bool = True
) -> torch.Tensor:
    """bool (N, K), True = pruned: the lowest-scoring weights of scores (N, K).

    nm=(n, m): keep n of every m consecutive weights of a row (sparsity is then 1 - n/m). Otherwise prune
    `pruned_count(K, sparsity)` weights of each row (per_row) or `pruned_count(N*K, sparsity)` of the matrix.
    """
    if nm is not None:
        return nm_prune_mask(scores, *nm)
    flat = scores if per_row else scores.reshape(1, -1)  # (rows, cols)
    count = pruned_count(flat.shape[1], sparsity)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count:
        mask.scatter_(1, torch.topk(flat, count, dim=1, largest=False).indices, True)
    return mask.reshape(scores.shape)
