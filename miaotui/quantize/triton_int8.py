"""Triton kernel for CUDA: y = x @ (int8 W * scale).T with the dequantization inside the matmul tile.

The int8 weight tile is loaded (half the bytes of bf16), converted in registers and fed to the tensor
cores; the per-channel scale is applied once to the fp32 accumulator.

>>> available() in (True, False)
True
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def available() -> bool:
    """True when Triton is importable and a CUDA GPU is present."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# (BM, BN, BK, warps, stages) tried by the autotuner
CONFIGS = [
    (16, 16, 512, 2, 3),
    (16, 32, 512, 4, 3),
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 32, 256, 4, 3),
    (32, 64, 128, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
]


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in CONFIGS]

    @triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "IEEE", "WIDEN"])
    @triton.jit
    def int8_wo_mm(
        IEEE: tl.constexpr,
        WIDEN: tl.constexpr,
        x_ptr,
        w_ptr,
        s_ptr,
        y_ptr,
        M,
        N,
        K,
        M_BUCKET,
        sxm,
        swn,
        sym,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)  # (BM,)
        rn = pid_n * BN + tl.arange(0, BN)  # (BN,)
        rk = tl.arange(0, BK)  # (BK,)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(
                x_ptr + rm[:, None] * sxm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
            )  # (BM, BK)
            w = tl.load(
                w_ptr + rn[None, :] * swn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0
            )  # (BK, BN) int8
            if IEEE:  # fp32 inputs: exact fp32 products, not TF32
                acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
            elif WIDEN:  # bf16 under the interpreter: products in fp32 (see int8_weight_only_mm)
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)  # (BN,)
        acc = acc * scale[None, :]
        tl.store(
            y_ptr + rm[:, None] * sym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rm[:, None] < M) & (rn[None, :] < N),
        )

    return int8_wo_mm


def int8_weight_only_mm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """x: (M, K) bf16/fp16/fp32 contiguous; qweight: (N, K) int8; scale: (N,) -> (M, N) in x's dtype.

    block: (BM, BN, BK) to run one tile shape instead of the autotuned choice (Triton's interpreter, which runs
    the kernel on the CPU with TRITON_INTERPRET=1, has no benchmarker to autotune with). Triton 3.9's interpreter
    computes `tl.dot` of bf16 tiles wrongly (a 16 x 16 product off by 1e10), so there bf16 tiles are widened to
    fp32 before the product; on a GPU the kernel multiplies bf16 tiles on the tensor cores.
    """
    import triton

    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bucket = 1 << max(0, (m - 1).bit_length())  # re-tune per power-of-two M, not per M
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))
    widen = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    strides = (x.stride(0), qweight.stride(0), y.stride(0))
    args = (x.dtype == torch.float32, widen, x, qweight, scale, y, m, n, k, bucket, *strides)
    if block is None:
        _kernel()[grid](*args)
    else:
        _kernel().fn[grid](*args, BM=block[0], BN=block[1], BK=block[2])
    return y
