"""Magnitude pruning: remove the weights of smallest absolute value in each layer (no calibration data).

The baseline the calibrated methods must beat. Like the Wanda and SparseGPT papers' baseline, the
threshold is per layer (the whole matrix), not per output row.

>>> import torch
>>> w = torch.tensor([[0.1, -3.0], [2.0, -0.2]])
>>> new, mask = magnitude_prune(w, None, 0.5, None)
>>> new.tolist()
[[0.0, -3.0], [2.0, 0.0]]
"""

from __future__ import annotations

import torch

from miaotui.sparsity.masks import prune_mask


def magnitude_prune(
    w: torch.Tensor, stat: None, sparsity: float, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (pruned float weight (N, K), prune mask (N, K)); `stat` is unused (no calibration)."""
    mask = prune_mask(w.abs().float(), sparsity, nm=nm, per_row=False)  # (N, K)
    return w.float().masked_fill(mask, 0.0), mask
