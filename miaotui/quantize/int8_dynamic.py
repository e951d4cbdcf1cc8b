"""W8A8 dynamic int8 linear layer: int8 weights per output channel, activations quantized on the fly per token.

Weights use the full int8 range [-127, 127], as the compressed-tensors export states them, and activations get
one scale per token (row), so the model run here is the model exported.
CPU with AVX-512 VNNI and BF16: miaotui's kernel (`cpu_w8a8.cpp`, see `miaotui.quantize.cpu_kernels`) quantizes
each row to int8 and multiplies u8 x s8 into int32 with vpdpbusd, straight from the layer's row-major codes, with
the scales and bias in its epilogue: on 2 cores 0.59-0.99x the time of fbgemm's `linear_dynamic` (one activation
scale per call, the kernel this layer ran before) at 1 row, 0.71-1.08x at 8 rows, 0.44-1.05x at 128-2,048 rows
(benchmarks/bench_w8a8.py).
Other CPUs: fbgemm's `quantized::linear_dynamic` (int8 GEMM), which quantizes its input with one scale per call:
each row is first divided by its largest magnitude (so every row spans [-1, 1], and that one scale serves every
row as a per-token scale would) and the output multiplied back. With VNNI fbgemm sums u8 x s8 products straight
into int32. Without VNNI (AVX2) it sums pairs into int16, which saturates for large products
(2 * 255 * 127 > 2**15): there the packed copy of the weights is requantized to [-63, 63], which cannot
saturate (2 * 255 * 63 < 2**15): correct, slightly coarser.
CUDA: per-token int8 activations and `torch._int_mm` (int8 tensor cores), rescaled in fp32.
This is the scheme for compute-bound work (encoders, prefill, large batches).

>>> import torch
>>> lin = torch.nn.Linear(64, 32)
>>> q = Int8DynamicLinear.from_float(lin)
>>> x = torch.randn(4, 64)
>>> bool(torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), 0) > 0.99)
True
"""

from __future__ import annotations

import warnings

import torch

from miaotui.quantize import cpu_kernels
from miaotui.quantize.int8 import Int8Linear
from miaotui.quantize.packed import register_layer

_CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
_AVX2_QMAX = 63  # the largest weight code whose pair sums cannot saturate int16 with u8 activations


def has_vnni() -> bool:
    """Whether fbgemm multiplies u8 x s8 into int32 without an int16 step here (AVX-512 VNNI)."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except Exception:  # an unknown CPU or PyTorch: take the path that is correct everywhere
        return False


def _int8_dynamic_cuda(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (M, K) float -> (M, N): per-token symmetric int8 activations, int32 accumulation."""
    xs = (x.abs().amax(dim=1, keepdim=True).float() / 127.0).clamp(min=1e-10)  # (M, 1)
    xq = torch.round(x.float() / xs).clamp_(-127, 127).to(torch.int8)  # (M, K)
    rows = xq.shape[0]
    if rows < _CUDA_MIN_ROWS:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, _CUDA_MIN_ROWS - rows))
    acc = torch._int_mm(xq, qweight.t())[:rows]  # (M, N) int32
    return (acc.float() * xs * scale.float()[None, :]).to(x.dtype)


@register_layer
class Int8DynamicLinear(Int8Linear):
    """Drop-in replacement for nn.Linear / Conv1D computing int8 x int8 with dynamic activation scales."""

    layer_type = "int8_dynamic"
    SCALE_DTYPE = torch.float32
    vnni: bool | None = None  # fbgemm sums into int32 here (None: ask the CPU on first use)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self._packed: tuple | None = None  # (key, fbgemm packed params), built on first CPU call
        self._cpu_kernel: bool | None = None  # miaotui's CPU kernel: decided on the first CPU call

    def _apply(self, fn, recurse=True):
        self._packed = None  # rebuilt on the next CPU call, from the tensors where they now are
        self._cpu_kernel = None
        return super()._apply(fn, recurse)

    def _fbgemm_params(self):
        key = (self.qweight.data_ptr(), self.scale.data_ptr())
        if self._packed is None or self._packed[0] != key:
            q, scale = self.qweight, self.scale.double()
            if Int8DynamicLinear.vnni is None:
                Int8DynamicLinear.vnni = has_vnni()
            if not Int8DynamicLinear.vnni and int(q.to(torch.int16).abs().max()) > _AVX2_QMAX:  # see the module doc
                q, scale = self._narrowed()
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensor types are deprecated; fbgemm's kernels are not
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(q, scale, zero, 0)
            self._packed = (key, torch.ops.quantized.linear_prepack(qw, None))  # bias: after the rescale
        return self._packed[1]

    def _narrowed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights on the [-63, 63] grid: (codes (N, K) int8, scales (N,) float64)."""
        w = self.qweight.double() * self.scale.double()[:, None]  # (N, K)
        scale = (w.abs().amax(1) / _AVX2_QMAX).clamp(min=1e-12)
        return torch.round(w / scale[:, None]).clamp(-_AVX2_QMAX, _AVX2_QMAX).to(torch.int8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.is_cuda:
            y = _int8_dynamic_cuda(x2, self.qweight, self.scale)  # (M, N)
        else:
            if self._cpu_kernel is None:
                self._cpu_kernel = cpu_kernels.w8a8_fits()
            if self._cpu_kernel:  # per-token quantization, scales and bias inside the kernel
                x2 = x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()
                y = cpu_kernels.w8a8_mm(x2.contiguous(), self.qweight, self.scale, self.bias)  # (M, N)
                return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
            xf = x2.float()
            peak = xf.abs().amax(1, keepdim=True).clamp_(min=1e-30)  # (M, 1): every row to [-1, 1]
            y = torch.ops.quantized.linear_dynamic(xf / peak, self._fbgemm_params(), False).mul_(peak)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
