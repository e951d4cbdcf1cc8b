"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity. Blocks with more outlier features (Wanda
scores above `threshold` times their mean) are pruned less, the others more, keeping the mean ratio.

Ratios per block: s_i = s - (D_i - mean(D)), with the outlier fractions D rescaled to span [0, 2 * lam].

>>> [round(r, 3) for r in owl_ratios([0.01, 0.02, 0.03], sparsity=0.5, lam=0.08)]
[0.58, 0.5, 0.42]
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.modules import linear_weight
from miaotui.sparsity.wanda import input_norms_sq, wanda_scores


def outlier_fraction(layers: dict[str, nn.Module], inputs: list[torch.Tensor], forward, threshold: float) -> float:
    """Fraction of a block's Wanda scores (all its selected layers together) above `threshold` x their mean."""
    norms = input_norms_sq(layers, inputs, forward)
    scores = torch.cat(
        [wanda_scores(linear_weight(m), norms[name]).flatten() for name, m in layers.items()]
    )  # (sum N*K,)
    return (scores > threshold * scores.mean()).float().mean().item()


def owl_ratios(fractions: list[float], *, sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier fractions; mean `sparsity`, spread within +-2 * lam."""
    d = torch.tensor(fractions, dtype=torch.float64)
    spread = d.max() - d.min()
    if spread <= 0:
        return [sparsity] * len(fractions)
    d = (d - d.min()) / spread * 2 * lam
    return (sparsity - (d - d.mean())).tolist()
