"""Int8 weight-only linear layer: int8 weights (N, K) + per-output-channel scales, real int8 kernels.

CPU, bf16 activations, input width a multiple of 64, on a CPU with AVX-512 BF16: miaotui's kernel
(`miaotui.quantize.cpu_kernels`), straight from the layer's row-major codes, eager and in compiled graphs: from
memory 1.1-1.6x PyTorch's `_weight_int8pack_mm` at 1 to 4 rows; past 16 rows (prefill) the weight dequantized
to bf16 through F.linear: a 0.4B model's 128-token prefill 268 -> 135 ms. Otherwise PyTorch's
`_weight_int8pack_mm` (int8 weights x bf16/fp16 activations). Its fp32 path has no fast kernel (tens of times
slower than fp32 F.linear at prefill sizes), so fp32 activations on CPU, used for quality measurement with fp32
compute, take a dequantize-then-matmul fallback: the same product. Inside a compiled graph, one or two rows
(decode) are then a multiply-sum that inductor fuses into a GEMV reading the int8 weights directly: a compiled
ref-llama-16m w8 decode step went from 1.27 to 0.72 ms in bf16 and from 3.4 to 0.82 ms in fp32, a 0.4B Llama's
from 30.6 to 18.3 ms in bf16 (2 cores).
CUDA: a Triton kernel that dequantizes inside the matmul tile (`miaotui.quantize.triton_int8`), with
PyTorch's kernel as fallback.

>>> import torch
>>> lin = torch.nn.Linear(64, 32)
>>> q = Int8WeightOnlyLinear.from_float(lin)
>>> x = torch.randn(2, 64)
>>> bool(torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), 0) > 0.999)
True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from miaotui.modules import GEMV_ROWS, linear_weight
from miaotui.quantize import cpu_kernels
from miaotui.quantize.packed import PackedLinear, register_layer

K_MULTIPLE = 8  # the CPU kernel reads K in blocks of 8; other K give wrong results there


def quantize_per_channel_int8(
    w: torch.Tensor, scale_dtype: torch.dtype, qmax: int = 127
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest in [-qmax, qmax] per output row; the scale is rounded to its dtype first.

    w: (N, K) float -> (qweight (N, K) int8, scale (N,) scale_dtype)
    """
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-10).to(scale_dtype)  # (N,)
    q = torch.round(w / scale.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)  # (N, K)
    return q, scale


def int8_weight_only_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (qweight * scale[:, None]).T without materialising the float weight.

    x: (M, K) float, contiguous; qweight: (N, K) int8; scale: (N,) same dtype as x -> (M, N)
    """
    if x.is_cuda:
        from miaotui.quantize import triton_int8

        if triton_int8.available():
            return triton_int8.int8_weight_only_mm(x, qweight, scale)
    elif x.shape[0] <= GEMV_ROWS and torch.compiler.is_compiling():  # a compiled CPU decode step: see module doc
        return ((x.float()[:, None, :] * qweight.float()).sum(-1) * scale.float()).to(x.dtype)  # (M, N)
    elif x.dtype == torch.float32:
        return F.linear(x, qweight.to(torch.float32)) * scale  # no fast fp32 kernel on CPU: see module doc
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scale)


class Int8Linear(PackedLinear):
    """Base of the 8-bit layers: weights (N, K) of QDTYPE (int8 in [-QMAX, QMAX]) and one float scale per output
    channel.

    SCALE_DTYPE None keeps the scale in the weight's dtype (it then follows `model.to(dtype)`).
    """

    QMAX = 127
    QDTYPE = torch.int8
    SCALE_DTYPE: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if in_features % K_MULTIPLE:
            raise ValueError(f"{self.layer_type} needs in_features divisible by {K_MULTIPLE}, got {in_features}")
        scale_dtype = self.SCALE_DTYPE or dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=self.QDTYPE, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=scale_dtype, device=device))

    @classmethod
    def unsupported(cls, out_features: int, in_features: int, **options) -> str | None:
        return f"in_features {in_features} is not a multiple of {K_MULTIPLE}" if in_features % K_MULTIPLE else None

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` casts every floating-point tensor: floating codes (e4m3) and fixed-dtype scales only
        # follow the layer to its new device
        qweight, scale = self.qweight, self.scale
        out = super()._apply(fn, recurse)
        if qweight.is_floating_point():
            self.qweight = qweight.to(self.qweight.device)
        if self.SCALE_DTYPE is not None:
            self.scale = scale.to(self.scale.device)
        return out

    @classmethod
    def from_float(cls, module: nn.Module, **options):
        """Quantize an nn.Linear or Conv1D by per-channel round-to-nearest."""
        w = linear_weight(module).contiguous()  # (N, K); Conv1D's transposed view, copied
        out_features, in_features = w.shape
        layer = cls(in_features, out_features, module.bias is not None, dtype=w.dtype, device=w.device)
        layer.qweight, layer.scale = quantize_per_channel_int8(w, cls.SCALE_DTYPE or w.dtype, cls.QMAX)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) this layer represents (for error measurement, not the hot path)."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def take(self, dim: int, index: torch.Tensor) -> Int8Linear:
        """Output rows (dim 0: with their scales and bias) or input columns (dim 1) `index` as a new layer."""
        n, k = (len(index), self.in_features) if dim == 0 else (self.out_features, len(index))
        dtype = self.scale.dtype if self.bias is None else self.bias.dtype
        layer = type(self)(k, n, self.bias is not None, dtype=dtype, device=self.qweight.device)
        layer.qweight = self.qweight.index_select(dim, index).contiguous()  # (n, k)
        layer.scale = self.scale[index] if dim == 0 else self.scale.clone()  # (n,)
        if self.bias is not None:
            bias = self.bias[index] if dim == 0 else self.bias
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer


@register_layer
class Int8WeightOnlyLinear(Int8Linear):
    """Drop-in replacement for nn.Linear / Conv1D holding int8 weights and float scales."""

    layer_type = "int8_weight_only"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cpu_kernel: bool | None = None  # miaotui's CPU kernel for bf16 inputs: decided on the first forward

    def _apply(self, fn, recurse=True):
        self._cpu_kernel = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self._cpu_kernel is None:
            self._cpu_kernel = x2.device.type == "cpu" and cpu_kernels.int8_fits(self.in_features)
        if self._cpu_kernel and x2.dtype == torch.bfloat16:  # eager and compiled: see module doc
            y = cpu_kernels.int8_linear(x2, self.qweight, self.scale.to(torch.bfloat16))  # (M, N)
        else:
            y = int8_weight_only_mm(x2, self.qweight, self.scale.to(x.dtype))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def reference_forward(layer: Int8WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """Dequantize-then-matmul in fp32: the ground truth the kernels are tested against."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.dequantize().float(), bias)
