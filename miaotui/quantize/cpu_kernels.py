"""miaotui's own CPU kernels for x86 CPUs with AVX-512 BF16: int4 and int8 weight-only matmuls, and w8a8.

PyTorch's `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm` convert every weight to fp32 before their
multiply-adds. These kernels turn codes into bf16 with table lookups (`vpermw`: 32 codes per instruction) and
multiply them with 32 activations per `vdpbf16ps`, whose products are exact in fp32. On 2 cores at batch 1: int8
46-48 GB/s of weights from memory (1.5x PyTorch's), int4 about 90 GB/s from cache (2x PyTorch's), and a 0.4B
model's compiled decode step 1.6x (`w8`) and 1.4x (`w4`) faster (benchmarks/bench_cpu_kernels.py,
bench_engine.py). Past MATMUL_ROWS rows (prefill) the weight is dequantized to bf16 for PyTorch's matmul.
`cpu_int4.cpp` (its own tiled layout) and `cpu_int8.cpp` (the layer's row-major codes) say how.
`cpu_w8a8.cpp` (AVX-512 VNNI as well) quantizes activations to int8 per token and multiplies them with int8
weights into int32 (`vpdpbusd`): the compressed-tensors scheme `w8a8` exports, in 0.44-1.08x the time of
fbgemm's per-call kernel from 1 to 2,048 rows (benchmarks/bench_w8a8.py; see `int8_dynamic`).

The C++ sources are compiled on first use with the system's C++ compiler (the one `torch.compile` uses on CPU)
into PyTorch's extension cache, a few seconds once per machine, and registered as PyTorch operators, which a
compiled graph calls directly. Without AVX-512 BF16, without a compiler, or with MIAOTUI_CPU_KERNELS=0,
`available()` is False and the layers keep PyTorch's kernels.

>>> import torch
>>> x = torch.ones(1, 64, dtype=torch.bfloat16)
>>> q = torch.full((16, 64), -3, dtype=torch.int8)
>>> scale = torch.full((16,), 0.5, dtype=torch.bfloat16)
>>> int8_mm(x, q, scale)[0, :3].tolist() if available() else [-96.0] * 3  # 64 x -3 x 0.5
[-96.0, -96.0, -96.0]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib

import torch
import torch.nn.functional as F

SOURCES = [pathlib.Path(__file__).with_name(f) for f in ("cpu_ops.cpp", "cpu_int4.cpp", "cpu_int8.cpp", "cpu_w8a8.cpp")]
HEADER = pathlib.Path(__file__).with_name("cpu_common.h")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp"]
INT4_K_MULTIPLE = 128  # input channels per 64-byte chunk of the int4 layout
INT8_K_MULTIPLE = 64  # input channels per 64-byte load of int8 codes
TILE = 16  # output channels stored together
MATMUL_ROWS = 16  # from more rows on, the dequantized weight through PyTorch's bf16 matmul wins (prefill)

log = logging.getLogger(__name__)
_switched_off = False
_built: bool | None = None


def available() -> bool:
    """Whether the kernels run here: AVX-512 BF16, a successful build, and MIAOTUI_CPU_KERNELS not 0.

    Builds them on the first call (a plain global afterwards, so compiled graphs read it without a break).
    """
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    if os.environ.get("MIAOTUI_CPU_KERNELS", "1") == "0" or not torch.cpu._is_avx512_bf16_supported():
        return False
    try:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*SOURCES, HEADER])).hexdigest()[:12]
        name = f"miaotui_cpu_kernels_{digest}"  # PyTorch's build cache tracks the sources, not the header
        load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=FLAGS, is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a compiler without AVX-512 BF16: PyTorch's kernels instead
        log.warning("miaotui's CPU kernels could not be built (%s: %s); using PyTorch's", type(e).__name__, e)
        return False
    _register_fake()
    return True


def int4_fits(in_features: int) -> bool:
    """Whether an int4 layer of this width runs on the kernel here (else on PyTorch's)."""
    return not _switched_off and in_features % INT4_K_MULTIPLE == 0 and available()


def int8_fits(in_features: int) -> bool:
    """Whether an int8 weight-only layer of this width runs on the kernel here (else on PyTorch's)."""
    return not _switched_off and in_features % INT8_K_MULTIPLE == 0 and available()


@contextlib.contextmanager
def switched_off():
    """Layers that choose their kernel inside this block (on their first forward) run PyTorch's from then on."""
    global _switched_off
    saved, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = saved


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of codes q (N, K) uint8 in [0, 15], N a multiple of 16, K of 128: (N, K/2) uint8.

    Tiles of 16 output channels, each storing its channels' 64-byte chunks of 128 inputs chunk by chunk. In a
    chunk, byte 2j holds inputs j (low nibble) and 32 + j, byte 2j + 1 inputs 64 + j and 96 + j.
    """
    n, k = q.shape
    c = q.reshape(n // TILE, TILE, k // INT4_K_MULTIPLE, 4, 32).transpose(1, 2)  # (tiles, chunks, 16, nibble, word)
    low, high = c[:, :, :, 0] | (c[:, :, :, 1] << 4), c[:, :, :, 2] | (c[:, :, :, 3] << 4)  # (tiles, chunks, 16, 32)
    return torch.stack([low, high], dim=-1).reshape(n, k // 2).contiguous()


def w8a8_fits() -> bool:
    """Whether w8a8 layers run on the kernel here (AVX-512 VNNI; else on fbgemm's, see `int8_dynamic`)."""
    return not _switched_off and available() and torch.cpu._is_vnni_supported()


def w8a8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) fp32/bf16 contiguous, quantized to int8 per row, @ (q * scale[:, None]).T + bias -> (M, N), x's
    dtype; q (N, K) int8, scale (N,) fp32, bias (N,) or None."""
    return torch.ops.miaotui_cpu.w8a8_mm(x, q, scale, bias)


def int4_mm(x: torch.Tensor, w: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) bf16 contiguous @ W.T -> (M, N) bf16; w from `pack_int4`, scales_zeros (K/G, 2, N) bf16."""
    return torch.ops.miaotui_cpu.int4_mm(x, w, scales_zeros, group_size)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 contiguous @ (q * scale[:, None]).T -> (M, N) bf16; q (N, K) int8, scale (N,) bf16."""
    return torch.ops.miaotui_cpu.int8_mm(x, q, scale)


def int4_linear(x: torch.Tensor, w: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """`int4_mm` up to MATMUL_ROWS rows; beyond, the weight dequantized to bf16 (rounded once) through F.linear."""
    if x.shape[0] <= MATMUL_ROWS:
        return int4_mm(x, w, scales_zeros, group_size)
    return F.linear(x, torch.ops.miaotui_cpu.int4_dequantize(w, scales_zeros, group_size))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`int8_mm` up to MATMUL_ROWS rows; beyond, the weight dequantized to bf16 (rounded once) through F.linear."""
    if x.shape[0] <= MATMUL_ROWS:
        return int8_mm(x, q, scale)
    return F.linear(x, torch.ops.miaotui_cpu.int8_dequantize(q, scale))


def _register_fake() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""

    @torch.library.register_fake("miaotui_cpu::int4_mm")
    def _(x, w, scales_zeros, group_size):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("miaotui_cpu::int8_mm")
    def _(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("miaotui_cpu::w8a8_mm")
    def _(x, q, scale, bias):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("miaotui_cpu::int4_dequantize")
    def _(w, scales_zeros, group_size):
        return scales_zeros.new_empty(w.shape[0], 2 * w.shape[1])

    @torch.library.register_fake("miaotui_cpu::int8_dequantize")
    def _(q, scale):
        return scale.new_empty(q.shape)
