"""The pruned linear layer: dense weights in memory, a bitmask and the nonzero values on disk.

Unstructured (and N:M) sparsity saves no time on a CPU: there is no sparse matmul that beats a dense one at
these densities (50 %), so the layer computes with its dense weight, zeros included, as fast as the original.
What it does save is disk space: a checkpoint stores one bit per weight (is it nonzero?) plus the nonzero
values, 1.125 bytes per bf16 weight at 50 % sparsity instead of 2. The encoding is lossless for any bit
pattern (a kept weight that happens to be 0.0 or -0.0 reloads exactly), and the weight expands to dense when
the model loads.

>>> import torch
>>> lin = torch.nn.Linear(16, 4)
>>> with torch.no_grad():
...     lin.weight[:, ::2] = 0
>>> layer = SparseLinear.from_float(lin)
>>> layer.describe()["nnz"], sorted(layer.portable_tensors())
(32, ['bitmask', 'weight'])
>>> x = torch.randn(3, 16)
>>> torch.equal(layer(x), lin(x))
True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from miaotui.modules import linear_weight
from miaotui.quantize.packed import PackedLinear, register_layer

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def nonzero_mask(w: torch.Tensor) -> torch.Tensor:
    """True where the bit pattern of w is not all zeros (so -0.0 counts as nonzero): same shape, bool."""
    return w.contiguous().view(_INT_VIEW[w.element_size()]) != 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (...) -> uint8 (ceil(numel / 8),), element i in bit i % 8 of byte i // 8."""
    flat = mask.flatten()
    flat = F.pad(flat.to(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8)  # (bytes, 8)
    return (flat * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (bytes,) -> bool (numel,): the inverse of pack_bits."""
    return ((bits[:, None] & _BITS.to(bits.device)) != 0).flatten()[:numel]


@register_layer
class SparseLinear(PackedLinear):
    """Drop-in replacement for a pruned nn.Linear / Conv1D: dense `weight` (N, K) at run time.

    Its saved (portable) form is `bitmask` (ceil(N*K/8),) uint8 plus `weight` holding only the nonzero values
    (nnz,); a freshly built layer holds that form until its first forward or device/dtype move expands it.
    """

    layer_type = "sparse_bitmask"

    def __init__(self, in_features, out_features, bias, dtype=torch.float32, device=None, nnz=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        numel = in_features * out_features
        nnz = numel if nnz is None else nnz
        if not 0 <= nnz <= numel:
            raise ValueError(f"sparse layer: nnz {nnz} is outside [0, {numel}]")
        self.register_buffer("weight", torch.empty(nnz, dtype=dtype, device=device))  # (nnz,) packed form
        self.register_buffer("bitmask", torch.empty((numel + 7) // 8, dtype=torch.uint8, device=device))
        self.layout = "packed"  # or "dense": weight is (N, K) and bitmask is dropped

    @classmethod
    def from_float(cls, module: nn.Module, **options) -> SparseLinear:
        """Take over the (already pruned) weight of an nn.Linear or Conv1D, kept dense in memory."""
        w = linear_weight(module)  # (N, K)
        problem = cls.unsupported(*w.shape, weight=w, **options)
        if problem:
            raise ValueError(f"{cls.layer_type}: {problem}")
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, w.dtype, w.device)
        layer.weight, layer.bitmask, layer.layout = w.detach().contiguous().clone(), None, "dense"
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The weight as (N, K), expanding the packed form first if needed."""
        if self.layout == "packed":
            mask = unpack_bits(self.bitmask, self.weight_numel)  # (N*K,)
            dense = torch.zeros(self.weight_numel, dtype=self.weight.dtype, device=self.weight.device)
            dense[mask] = self.weight
            self.weight, self.bitmask, self.layout = dense.view(self.out_features, self.in_features), None, "dense"
        return self.weight

    def portable_tensors(self) -> dict[str, torch.Tensor]:
        if self.layout == "packed":
            return {}
        w = self.dense_weight()
        mask = nonzero_mask(w)  # (N, K)
        return {"weight": w[mask], "bitmask": pack_bits(mask)}

    def describe(self) -> dict:
        nnz = self.weight.numel() if self.layout == "packed" else int(nonzero_mask(self.dense_weight()).sum())
        return {**super().describe(), "nnz": nnz}

    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero."""
        return 1 - self.describe()["nnz"] / self.weight_numel

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.weight.device.type != "meta":
            self.dense_weight()  # expand once the tensors are real (after loading)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)
