"""Int4 weight-only linear layer: group-wise 4-bit weights, two per byte, real int4 kernels.

Kernels: on CPUs with AVX-512 BF16, miaotui's own (`miaotui.quantize.cpu_kernels`, bf16 activations, input
channels a multiple of 128: decode 1.2-2.3x PyTorch's, prefill 2x); else PyTorch's `_weight_int4pack_mm_for_cpu`
(bf16 and fp16); on CUDA `_weight_int4pack_mm` (tensor cores, bf16). fp32 activations take a dequantize
fallback (see `forward`). Each wants its own tiled layout, so the layer keeps a single copy of the weight: the
portable layout (row-major nibbles, low nibble = even column) until the first forward on a device, then that
kernel's layout. Saving and moving devices convert back through a nibble permutation learnt from the packing
function itself (`_layout_permutation`), so no layout is hard-coded here.

Dequantization follows PyTorch's convention: w = (q - 8) * scale + zero, q in [0, 15], per group of
`group_size` input channels.

>>> import torch
>>> lin = torch.nn.Linear(256, 64)
>>> q = Int4WeightOnlyLinear.from_float(lin, group_size=64)
>>> x = torch.randn(3, 256)
>>> bool(torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), 0) > 0.99)
True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from miaotui.modules import linear_weight
from miaotui.quantize import cpu_kernels
from miaotui.quantize.config import GROUP_SIZES
from miaotui.quantize.packed import PackedLinear, register_layer

N_MULTIPLE = 16  # PyTorch's CPU kernel packs output channels in blocks of 16
AVX512 = "avx512bf16"  # the layout of miaotui's CPU kernel


def int4_shape_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a (N, K) layer cannot use the int4 kernels, or None when it can."""
    if out_features % N_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {N_MULTIPLE}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    return None


def quantize_groupwise(
    w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest `bits`-bit codes per group of input channels (mid = 2^(bits-1)).

    w: (N, K) -> q (N, K) uint8 in [0, 2^bits), scales (N, K/G), zeros (N, K/G), with w ~ (q - mid) * scale + zero.
    """
    n, k = w.shape
    mid, top = 2 ** (bits - 1), 2**bits - 1
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # (N, G, gs)
    if symmetric:
        scale = (wg.abs().amax(-1) / (mid - 1)).clamp(min=1e-10).to(scale_dtype).float()  # (N, G)
        zero = torch.zeros_like(scale)
        q = torch.round(wg / scale[..., None]).clamp_(-mid, mid - 1) + mid
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / top).clamp(min=1e-10).to(scale_dtype).float()  # (N, G)
        zero_int = torch.round(-lo / scale).clamp_(0, top)  # (N, G): the code of w = 0
        q = (torch.round(wg / scale[..., None]) + zero_int[..., None]).clamp_(0, top)
        zero = (mid - zero_int) * scale
    return q.reshape(n, k).to(torch.uint8), scale.to(scale_dtype), zero.to(scale_dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, K/2) uint8, low nibble = even column."""
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def _kernel_pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Kernel layout `layout` ("cpu", "cuda" or "avx512bf16") of q (N, K) uint8 in [0, 15] (on q's device)."""
    if layout == AVX512:
        return cpu_kernels.pack_int4(q)
    if layout == "cuda":
        k = q.shape[1]
        tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
        even_high = (q[:, ::2] << 4) | q[:, 1::2]  # this op wants the even column in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack(even_high, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All nibbles of a packed tensor in storage order: (2 * bytes,) uint8."""
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack([b & 15, b >> 4], dim=-1).flatten()


def _layout_permutation(n: int, k: int, layout: str, device: torch.device) -> torch.Tensor:
    """src (N*K,) int64: the row-major index of the weight stored at each nibble of the kernel layout.

    Learnt by packing the digits (base 16) of every element's own index.
    """
    idx = torch.arange(n * k, device=device)
    src = torch.zeros_like(idx)
    for digit in range(max(1, ((n * k - 1).bit_length() + 3) // 4)):
        code = ((idx >> (4 * digit)) & 15).to(torch.uint8).view(n, k)
        src |= _nibbles(_kernel_pack(code, layout)).long() << (4 * digit)
    if not torch.equal(torch.sort(src).values, idx):
        raise RuntimeError("the int4 kernel layout is not a permutation of nibbles; cannot convert it back")
    return src


@register_layer
class Int4WeightOnlyLinear(PackedLinear):
    """Drop-in replacement for nn.Linear / Conv1D holding group-wise int4 weights.

    Subclasses with fewer bits (int3) change only the portable storage (`BITS`, `pack_codes`, `unpack_codes`);
    their codes are widened to int4 codes for the kernels.
    """

    layer_type = "int4_weight_only"
    BITS = 4

    def __init__(self, in_features, out_features, bias, dtype=torch.bfloat16, device=None, group_size=128):
        super().__init__(in_features, out_features, bias, dtype, device)
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int{self.BITS} group_size must be one of {GROUP_SIZES}, got {group_size}")
        problem = int4_shape_problem(out_features, in_features, group_size)
        if problem:
            raise ValueError(f"int{self.BITS} weight-only: {problem}")
        self.group_size = group_size
        groups = in_features // group_size
        cols = in_features * self.BITS // 8
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.layout = "portable"  # or "cpu" / "cuda" / "avx512bf16": what qweight holds now
        self._scales_zeros: torch.Tensor | None = None  # (G, N, 2), for avx512bf16 (G, 2, N), activation dtype

    @staticmethod
    def pack_codes(q: torch.Tensor) -> torch.Tensor:
        """Portable storage of codes q (N, K) in [0, 2^BITS)."""
        return pack_nibbles(q)

    @staticmethod
    def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
        """Codes (N, K) uint8 from the portable storage."""
        return unpack_nibbles(packed)

    @classmethod
    def unsupported(cls, out_features: int, in_features: int, group_size: int = 128, **options) -> str | None:
        return int4_shape_problem(out_features, in_features, group_size)

    @classmethod
    def from_codes(cls, module: nn.Module, q: torch.Tensor, scales: torch.Tensor, zero_codes: torch.Tensor, group_size):
        """The layer for `module` holding codes q (N, K) with w ~ (q - zero_code) * scale per group (N, K/G)."""
        w = linear_weight(module)  # (N, K)
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, w.dtype, w.device, group_size)
        layer.qweight = cls.pack_codes(q.contiguous())  # codes computed from a Conv1D's view keep its strides
        layer.scales = scales.to(w.dtype)
        layer.zeros = ((2 ** (cls.BITS - 1) - zero_codes) * scales.float()).to(w.dtype)  # w = (q - mid) * s + zero
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_float(
        cls, module: nn.Module, group_size: int = 128, symmetric: bool = False, algorithm: str = "rtn", **options
    ):
        """Quantize an nn.Linear or Conv1D group-wise: round-to-nearest, or HQQ's fitted zero points ("hqq")."""
        w = linear_weight(module).contiguous()  # (N, K); Conv1D's transposed view, copied
        layer = cls(w.shape[1], w.shape[0], module.bias is not None, w.dtype, w.device, group_size)
        if algorithm == "hqq":
            from miaotui.quantize.hqq import hqq_groupwise

            q, layer.scales, layer.zeros = hqq_groupwise(w, group_size, cls.BITS, w.dtype)
        else:
            q, layer.scales, layer.zeros = quantize_groupwise(w, group_size, symmetric, w.dtype, cls.BITS)
        layer.qweight = cls.pack_codes(q)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    def describe(self) -> dict:
        return {**super().describe(), "group_size": self.group_size}

    @property
    def _widen(self) -> int:
        """What turns this type's codes into int4 codes of the same weight: (q + widen - 8) = (q - mid)."""
        return 8 - 2 ** (self.BITS - 1)

    def codes(self) -> torch.Tensor:
        """The codes (N, K) uint8 in [0, 2^BITS), w = (q - 2^(BITS-1)) * scale + zero, whatever the layout."""
        if self.layout == "portable":
            return self.unpack_codes(self.qweight)
        n, k = self.out_features, self.in_features
        src = _layout_permutation(n, k, self.layout, self.qweight.device)
        q = torch.empty(n * k, dtype=torch.uint8, device=self.qweight.device)
        q[src] = _nibbles(self.qweight)
        return q.view(n, k) - self._widen

    def portable_qweight(self) -> torch.Tensor:
        """The weight in the portable layout, whatever layout the layer runs in now."""
        return self.qweight if self.layout == "portable" else self.pack_codes(self.codes())

    def portable_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.portable_qweight()}

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) this layer represents (for error measurement, not the hot path)."""
        q = self.codes().float()  # (N, K)
        scale = self.scales.float().repeat_interleave(self.group_size, dim=1)
        zero = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return (q - 2 ** (self.BITS - 1)) * scale + zero

    def take(self, dim: int, index: torch.Tensor) -> Int4WeightOnlyLinear:
        """Output rows (dim 0) or input columns (dim 1) `index` as a new layer; columns must be whole groups."""
        g, index = self.group_size, index.to(self.scales.device)
        groups = index
        if dim == 1:
            blocks = index.view(-1, g) if len(index) % g == 0 else index.view(1, -1)  # (groups, g)
            first = blocks[:, :1]  # (groups, 1)
            whole = first - first % g + torch.arange(g, device=first.device)  # the aligned groups they start in
            if blocks.shape[1] != g or not torch.equal(blocks, whole):
                raise ValueError(f"int{self.BITS} weight-only: a shard of input features must be whole groups of {g}")
            groups = blocks[:, 0] // g
        n, k = (len(index), self.in_features) if dim == 0 else (self.out_features, len(index))
        layer = type(self)(k, n, self.bias is not None, self.scales.dtype, self.scales.device, g)
        layer.qweight = self.pack_codes(self.codes().index_select(dim, index).contiguous())
        layer.scales = self.scales.index_select(dim, groups).contiguous()  # (n, k / g)
        layer.zeros = self.zeros.index_select(dim, groups).contiguous()
        if self.bias is not None:
            bias = self.bias[index] if dim == 0 else self.bias
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse=True):
        if self.layout != "portable":  # back to the portable layout before a device change
            self.qweight = self.portable_qweight()
            self.layout = "portable"
        self._scales_zeros = None
        return super()._apply(fn, recurse)

    def _kernel_layout(self, dtype: torch.dtype) -> str:
        """The layout of the kernel that runs inputs of `dtype` on the weight's device."""
        device = self.qweight.device.type
        if device == "cpu" and dtype == torch.bfloat16 and cpu_kernels.int4_fits(self.in_features):
            return AVX512
        return device

    def _prepare(self, dtype: torch.dtype) -> None:
        """Convert the weight to the layout of the kernel for `dtype` and the scales to that dtype."""
        layout = self._kernel_layout(dtype)
        if self.layout != layout:
            self.qweight = _kernel_pack(self.codes() + self._widen, layout)
            self.layout, self._scales_zeros = layout, None
        if layout == AVX512:
            sz = torch.stack([self.scales.T, self.zeros.T], dim=1)  # (G, 2, N)
        else:
            sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
        self._scales_zeros = sz.contiguous().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        if x2.dtype == torch.float32 or (x2.is_cuda and x2.dtype != torch.bfloat16):
            # no fast kernel: CUDA's takes bf16 only, the CPU fp32 one is ~25x slower than fp32 F.linear at
            # prefill sizes. This path serves fp32 quality measurement; it runs from the portable layout.
            if self.layout != "portable":
                self.qweight, self.layout = self.portable_qweight(), "portable"
            y = F.linear(x2, self.dequantize().to(x2.dtype))
        else:
            sz = self._scales_zeros
            if sz is None or sz.dtype != x2.dtype:  # (a compiled step sees it prepared by its warm-up)
                self._prepare(x2.dtype)
            if self.layout == AVX512:
                y = cpu_kernels.int4_linear(x2, self.qweight, self._scales_zeros, self.group_size)  # (M, N)
            else:
                mm = torch.ops.aten._weight_int4pack_mm if x2.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
                y = mm(x2, self.qweight, self.group_size, self._scales_zeros)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
