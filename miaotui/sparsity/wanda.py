"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||, the weight magnitude times the norm of its input
feature over the calibration tokens, comparing weights within each output row. No weight update.

Activation norms are gathered block by block (`miaotui.calibration.run_blockwise`): each block sees the
outputs of the blocks before it, already pruned.

>>> import torch
>>> w = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
>>> norms_sq = torch.tensor([100.0, 1.0, 1.0, 0.0])  # feature 0 carries large activations
>>> wanda_prune(w, norms_sq, 0.5, None)[0].tolist()  # magnitude alone would keep the two 2.0s
[[1.0, 0.0, 2.0, 0.0]]
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.calibration import accumulate_inputs
from miaotui.modules import linear_weight
from miaotui.sparsity.masks import prune_mask


def input_norms_sq(layers: dict[str, nn.Module], inputs: list[torch.Tensor], forward) -> dict[str, torch.Tensor]:
    """Sum of squares of each input feature over the calibration tokens reaching each layer: name -> (K,)."""
    sums, _ = accumulate_inputs(layers, inputs, forward, lambda x: x.pow(2).sum(0))
    # a layer no token reached: equal norms (magnitude pruning)
    return {name: sums.get(name, torch.ones(linear_weight(m).shape[1])) for name, m in layers.items()}


def wanda_scores(w: torch.Tensor, norms_sq: torch.Tensor) -> torch.Tensor:
    """|W| * ||X||: (N, K) from w (N, K) and the squared input norms (K,)."""
    return w.abs().float() * norms_sq.float().sqrt()[None, :].to(w.device)


def wanda_prune(
    w: torch.Tensor, norms_sq: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (pruned float weight (N, K), prune mask (N, K)), lowest scores per output row."""
    mask = prune_mask(wanda_scores(w, norms_sq), sparsity, nm=nm, per_row=True)  # (N, K)
    return w.float().masked_fill(mask, 0.0), mask
