"""LowRankLinear: a linear layer W (out, in) stored as two thin ones, U (out, r) after V (r, in).

The factors are plain `nn.Linear` children (`v`: in -> r, `u`: r -> out, the bias on `u`), so a later
quantize step packs them like any other linear layer, and checkpoints rebuild the structure from `describe()`.

>>> import torch
>>> layer = LowRankLinear.from_factors(torch.ones(3, 2), torch.ones(2, 4), bias=torch.zeros(3))
>>> layer(torch.ones(1, 4)).tolist(), layer.describe()["rank"]
([[8.0, 8.0, 8.0]], 2)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.modules import register_structural


@register_structural
class LowRankLinear(nn.Module):
    """y = u(v(x)): drop-in replacement for nn.Linear / Conv1D with rank * (in + out) weights."""

    structure_type = "low_rank_linear"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in 1..min(in, out) = {min(in_features, out_features)}, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None, dtype=None):
        """The layer with u.weight = up (out, r) and v.weight = down (r, in), in `dtype` (default: up's)."""
        dtype = dtype or up.dtype
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias is not None, dtype=dtype, device=up.device)
        layer.u.weight = nn.Parameter(up.to(dtype).contiguous(), requires_grad=False)
        layer.v.weight = nn.Parameter(down.to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            layer.u.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))  # (..., in) -> (..., r) -> (..., out)

    def describe(self) -> dict:
        """Constructor arguments, as stored in the checkpoint sidecar."""
        return {
            "type": self.structure_type,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.u.bias is not None,
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
