"""Int3 weight-only linear layer: group-wise 3-bit codes, eight weights in three bytes, run on the int4 kernels.

Storage (the portable layout, what is saved): each row of codes q in [0, 7] is a little-endian bit stream,
code i at bits 3i..3i+2, so codes 8j..8j+7 fill bytes 3j..3j+2 ((N, 3K/8) uint8). Read as little-endian
int32 words this is compressed-tensors' dense 3-bit packing, 32 codes in three words.
Dequantization as for int4, with mid = 4: w = (q - 4) * scale + zero, per group of `group_size` inputs.

Kernels: there is no 3-bit matmul in PyTorch, so on its first bf16/fp16 forward on a device the layer widens
its codes to int4 codes (q + 4 with the same scales and zeros: the same weights exactly) in that device's int4
kernel layout and runs `Int4WeightOnlyLinear`'s kernels. From then on its runtime memory equals int4 (half a
byte per weight); the disk size stays 3 bits per weight (plus scales and zeros). fp32 activations dequantize
from the 3-bit storage, as int4 does.

>>> import torch
>>> lin = torch.nn.Linear(256, 64)
>>> q = Int3WeightOnlyLinear.from_float(lin, group_size=64)
>>> q.qweight.shape  # 3 bytes per 8 weights
torch.Size([64, 96])
>>> x = torch.randn(3, 256)
>>> bool(torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), 0) > 0.97)
True
"""

from __future__ import annotations

import torch

from miaotui.quantize.int4 import Int4WeightOnlyLinear
from miaotui.quantize.packed import register_layer

SHIFTS = torch.arange(8, dtype=torch.int32) * 3  # bit offset of each of 8 codes in a 24-bit word


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 7], K a multiple of 8 -> (N, 3K/8) uint8 (layout in the module doc)."""
    n, k = q.shape
    words = (q.view(n, k // 8, 8).to(torch.int32) << SHIFTS.to(q.device)).sum(-1)  # (N, K/8) 24-bit words
    return torch.stack([words & 255, (words >> 8) & 255, words >> 16], dim=-1).to(torch.uint8).view(n, -1)


def unpack_int3(p: torch.Tensor) -> torch.Tensor:
    """(N, 3K/8) uint8 -> (N, K) uint8 codes."""
    n = p.shape[0]
    b = p.view(n, -1, 3).to(torch.int32)  # (N, K/8, 3)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (N, K/8)
    return ((words[..., None] >> SHIFTS.to(p.device)) & 7).to(torch.uint8).view(n, -1)


@register_layer
class Int3WeightOnlyLinear(Int4WeightOnlyLinear):
    """Drop-in replacement for nn.Linear / Conv1D holding group-wise int3 weights (3 bits each on disk)."""

    layer_type = "int3_weight_only"
    BITS = 3

    @staticmethod
    def pack_codes(q: torch.Tensor) -> torch.Tensor:
        return pack_int3(q)

    @staticmethod
    def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
        return unpack_int3(packed)
