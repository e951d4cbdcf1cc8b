"""N:M semi-structured sparsity: masks keeping N of every M consecutive input weights, and the 2:4 layer that
runs on PyTorch's semi-structured sparse kernels on CUDA (`to_sparse_semi_structured`: cuSPARSELt or CUTLASS).

On a CPU, and for fp32 activations, the 2:4 layer computes densely like `SparseLinear`: no time saved. On an
Ampere-or-newer GPU with fp16/bf16 activations it compresses its weight once (half the values plus 2-bit
metadata) and multiplies with the sparse kernel. Whether that is faster than dense bf16 depends on the shape
and on M (the number of tokens): `benchmarks/bench_sparsity.py` measures it; decoding at batch 1 often is not.

>>> import torch
>>> scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 7.0]])
>>> nm_prune_mask(scores, 2, 4).int().tolist()  # True = pruned: the 2 lowest of each group of 4
[[0, 1, 0, 1, 1, 1, 0, 0]]
>>> is_nm_sparse(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), 2, 4)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miaotui.quantize.packed import register_layer
from miaotui.sparsity.layer import SparseLinear, nonzero_mask

# The stricter (CUTLASS) minimum of PyTorch's 2:4 kernels for fp16/bf16 weights: rows, columns multiples.
MIN_ROWS, MIN_COLS = 32, 64


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask (True = pruned) keeping the n highest of every m consecutive scores along the last dim.

    scores: (N, K) with K % m == 0 -> bool (N, K).
    """
    rows, k = scores.shape
    groups = scores.reshape(rows, k // m, m)  # (N, K/m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices  # (N, K/m, m-n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, k)


def is_nm_sparse(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input weights of w (N, K) has at most n nonzeros."""
    rows, k = w.shape
    if k % m:
        return False
    return bool((nonzero_mask(w).reshape(rows, k // m, m).sum(-1) <= n).all())


def semi_structured_available(device: torch.device) -> bool:
    """True on a CUDA device with 2:4 sparse tensor cores (compute capability 8.0 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@register_layer
class SemiStructuredSparseLinear(SparseLinear):
    """A 2:4-sparse linear layer: PyTorch's semi-structured sparse kernels on CUDA, dense elsewhere.

    Saved like `SparseLinear` (bitmask + nonzero values). On CUDA with fp16/bf16 activations the first forward
    replaces the dense weight by its compressed form (about 0.56x the bytes); moving or casting the layer, or
    saving it, goes back through the dense weight, which the compressed form reproduces exactly (checked).
    """

    layer_type = "sparse_2to4"

    def __init__(self, in_features, out_features, bias, dtype=torch.float32, device=None, nnz=None):
        super().__init__(in_features, out_features, bias, dtype, device, nnz)
        self._sparse = None  # the compressed weight (a SparseSemiStructuredTensor) while running on CUDA

    @classmethod
    def unsupported(cls, out_features: int, in_features: int, weight: torch.Tensor | None = None, **options):
        if out_features % MIN_ROWS or in_features % MIN_COLS:
            return (
                f"the 2:4 kernels need out_features a multiple of {MIN_ROWS} and in_features a multiple of "
                f"{MIN_COLS}, got {out_features}x{in_features}"
            )
        if weight is not None and not is_nm_sparse(weight, 2, 4):
            return "the weight is not 2:4 sparse (more than 2 nonzeros in a group of 4 input weights)"
        return None

    def dense_weight(self) -> torch.Tensor:
        if self._sparse is not None:
            self.weight, self._sparse = self._sparse.to_dense(), None
            self.layout = "dense"
        return super().dense_weight()

    def _compress(self) -> None:
        """Replace the dense weight by the semi-structured sparse tensor, if it round-trips exactly."""
        from torch.sparse import to_sparse_semi_structured

        dense = self.dense_weight()
        sparse = to_sparse_semi_structured(dense)
        if not torch.equal(sparse.to_dense(), dense):
            raise RuntimeError("the 2:4 compressed weight does not reproduce the dense weight; kept dense")
        self._sparse, self.weight = sparse, None

    def _apply(self, fn, recurse=True):
        if self._sparse is not None:
            self.dense_weight()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = x.dtype in (torch.float16, torch.bfloat16) and semi_structured_available(x.device)
        if not fast:
            return super().forward(x)
        if self._sparse is None:
            if self.dense_weight().dtype != x.dtype:
                raise RuntimeError(f"2:4 layer: input dtype {x.dtype} differs from weight dtype {self.weight.dtype}")
            self._compress()
        shape = x.shape  # (..., K)
        y = F.linear(x.reshape(-1, self.in_features), self._sparse, self.bias)  # (M, N)
        return y.reshape(*shape[:-1], self.out_features)
