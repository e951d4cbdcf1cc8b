"""miaotui's own CPU kernels (`cpu_kernels.cpp`): an int4 weight-only matmul for x86 CPUs with AVX-512 BF16.

PyTorch's `_weight_int4pack_mm_for_cpu` converts every weight to fp32 before its multiply-adds, which caps a
decode step at about 36 GB/s of int4 weights on 2 cores. This kernel turns 32 codes into bf16 with one table
lookup and multiplies them with 32 activations in one `vdpbf16ps`: 50-55 GB/s at batch 1, 1.3-1.6x PyTorch's
kernel from 1 to 128 rows (benchmarks/bench_kernels.py --cpu). The weights keep their exact values; products
are exact in fp32, as in PyTorch's kernel.

The C++ source is compiled on first use with the system's C++ compiler (the one `torch.compile` uses on CPU)
into PyTorch's extension cache, a few seconds once per machine. Without AVX-512 BF16, without a compiler, or with
MIAOTUI_CPU_KERNELS=0, `available()` is False and the layers keep PyTorch's kernels.

>>> import torch
>>> if available():  # doctest: +SKIP
...     q = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
...     sz = torch.ones(1, 2, 32, dtype=torch.bfloat16)
...     y = int4_mm(torch.ones(1, 128, dtype=torch.bfloat16), pack_int4(q), sz, 128)  # (1, 32)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib

import torch

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
INT4_K_MULTIPLE = 128  # input channels per 64-byte chunk of the int4 layout
TILE = 16  # output channels stored together

log = logging.getLogger(__name__)
_switched_off = False


@functools.cache
def available() -> bool:
    """Whether the kernels run here: AVX-512 BF16, a successful build, and MIAOTUI_CPU_KERNELS not 0."""
    if os.environ.get("MIAOTUI_CPU_KERNELS", "1") == "0" or not torch.cpu._is_avx512_bf16_supported():
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name="miaotui_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a compiler without AVX-512 BF16: PyTorch's kernels instead
        log.warning("miaotui's CPU kernels could not be built (%s: %s); using PyTorch's", type(e).__name__, e)
        return False
    _register_fake()
    return True


def int4_fits(in_features: int) -> bool:
    """Whether an int4 layer of this width runs on the kernel here (else on PyTorch's)."""
    return not _switched_off and in_features % INT4_K_MULTIPLE == 0 and available()


@contextlib.contextmanager
def switched_off():
    """Layers that take their kernel layout inside this block run PyTorch's kernels from then on (to compare)."""
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


def int4_mm(x: torch.Tensor, w: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) bf16 contiguous @ W.T -> (M, N) bf16; w from `pack_int4`, scales_zeros (K/G, 2, N) bf16."""
    return torch.ops.miaotui_cpu.int4_mm(x, w, scales_zeros, group_size)


def _register_fake() -> None:
    """Shapes for torch.compile, which traces the op without running it."""

    @torch.library.register_fake("miaotui_cpu::int4_mm")
    def _(x, w, scales_zeros, group_size):
        return x.new_empty(x.shape[0], w.shape[0])
