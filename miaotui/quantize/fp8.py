"""FP8 W8A8: e4m3 weights per output channel x e4m3 activations per token, on `torch._scaled_mm`.

The weight row n is stored as q = w / s_n in float8_e4m3fn (s_n = max|w_n| / 448, the largest finite e4m3);
each call scales the activation rows the same way and multiplies in fp8 with fp32 rescaling (rowwise scaling).
On GPUs with FP8 tensor cores (CUDA compute capability 8.9 and up: H100, H200, L4, L40S, RTX 40xx) this runs on
them; GUIDE's H100 kernel table has it up to 1.4x bf16 at prefill sizes, 0.4-1.0x at batch-1 decode.

PyTorch's CPU `_scaled_mm` computes the same product with reference loops (tens of times slower than bf16):
quantizing to fp8 elsewhere is refused (`device_problem`) unless the step asks for `emulate: true`, which
exists to measure fp8's quality on a machine without the hardware.

>>> import torch
>>> lin = torch.nn.Linear(64, 32)
>>> q = Fp8DynamicLinear.from_float(lin)
>>> x = torch.randn(4, 64)
>>> bool(torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), 0) > 0.99)
True
>>> q.qweight.dtype, q.to(torch.bfloat16).qweight.dtype  # model casts leave the fp8 codes alone
(torch.float8_e4m3fn, torch.float8_e4m3fn)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.errors import MiaotuiError
from miaotui.modules import linear_weight
from miaotui.quantize.int8 import Int8Linear
from miaotui.quantize.packed import register_layer

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores
DIM_MULTIPLE = 16  # _scaled_mm's CUDA kernels need K and N in multiples of 16


def device_problem(device: torch.device | str) -> str | None:
    """Why fp8 matmuls would not run on fast hardware on `device`, or None when they do.

    >>> device_problem("cpu").split(";")[0]
    'fp8 W8A8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: H100, H200, L4, L40S, RTX 40xx)'
    """
    device = torch.device(device)
    need = "fp8 W8A8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: H100, H200, L4, L40S, RTX 40xx)"
    if device.type != "cuda":
        return f"{need}; the model is on {device.type} (load it with --device cuda, or use w8a8: int8 runs on CPUs)"
    if not torch.cuda.is_available():
        return f"{need}; this machine has no CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{need}; {name} has compute capability {capability[0]}.{capability[1]} (use w8a8 or w8 there)"
    return None


def require_hardware(device: torch.device | str) -> None:
    """Raise MiaotuiError, naming the way out, when `device` has no fast fp8 matmuls."""
    problem = device_problem(device)
    if problem:
        raise MiaotuiError(
            f"quantize: {problem}. To measure fp8's quality without the hardware, set `emulate: true` on the "
            "quantize step (PyTorch's slow reference kernels)"
        )


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 per row. x: (M, K) float -> (codes (M, K) e4m3, scale (M, 1) fp32)."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # (M, 1)
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale  # the cast does not saturate by itself


def fp8_rowwise_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (qweight * scale[:, None]).T with x quantized to e4m3 per row on the fly.

    x: (M, K) float; qweight: (N, K) e4m3; scale: (N,) fp32 -> (M, N) in x's dtype
    """
    xq, xs = quantize_rows_fp8(x)  # (M, K) e4m3, (M, 1)
    # rowwise scaling on CUDA writes bf16 only; fp32 compute takes its output up again
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=out_dtype)  # (M, N)
    return y.to(x.dtype)


@register_layer
class Fp8DynamicLinear(Int8Linear):
    """Drop-in replacement for nn.Linear / Conv1D with e4m3 weights and per-token e4m3 activations."""

    layer_type = "fp8_dynamic"
    QDTYPE = FP8
    SCALE_DTYPE = torch.float32

    @classmethod
    def unsupported(cls, out_features: int, in_features: int, **options) -> str | None:
        if in_features % DIM_MULTIPLE or out_features % DIM_MULTIPLE:
            return f"fp8 kernels need both dimensions in multiples of {DIM_MULTIPLE}, got {out_features}x{in_features}"
        return None

    @classmethod
    def from_float(cls, module: nn.Module, **options):
        """Quantize an nn.Linear or Conv1D to e4m3 per output channel (round to nearest)."""
        w = linear_weight(module).contiguous()  # (N, K); Conv1D's transposed view, copied
        out_features, in_features = w.shape
        layer = cls(in_features, out_features, module.bias is not None, dtype=w.dtype, device=w.device)
        layer.qweight, scale = quantize_rows_fp8(w.detach())  # (N, K), (N, 1)
        layer.scale = scale[:, 0]
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        y = fp8_rowwise_mm(x.reshape(-1, self.in_features), self.qweight, self.scale)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
