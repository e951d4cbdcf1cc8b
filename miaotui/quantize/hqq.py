"""HQQ (half-quadratic quantization): better zero points for group-wise int4/int3 weights, without calibration.

Round-to-nearest sets each group's scale and zero from its min and max. HQQ keeps the scale and fits the zero
point to the weights themselves, minimising the lp-norm (p < 1) of the quantization error, which tolerates the
few large errors of outliers and shrinks the many small ones. Half-quadratic splitting alternates a closed-form
zero update with a generalised soft-thresholding of the error (Badri & Shaji, 2023). The zero is fractional, as
the packed layers store it in the weight's dtype (w = (q - z) * s).

>>> import torch
>>> from miaotui.quantize.int4 import quantize_groupwise
>>> w = torch.randn(64, 256)
>>> def lp_error(q, s, z):  # codes (64, 256), scales and zeros (64, 4): w ~ (q - 8) * s + z per group of 64
...     w_hat = (q.float() - 8).reshape(64, 4, 64) * s[..., None] + z[..., None]
...     return (w - w_hat.reshape(64, 256)).abs().pow(0.7).mean()
>>> hqq = hqq_groupwise(w, group_size=64, bits=4, scale_dtype=torch.float32)
>>> bool(lp_error(*hqq) < lp_error(*quantize_groupwise(w, 64, False, torch.float32)))
True
"""

from __future__ import annotations

import torch

from miaotui.quantize.int4 import quantize_groupwise


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal step of the lp-norm: soft-thresholding with a magnitude-dependent threshold."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-8).pow(p - 1) / beta)


@torch.no_grad()
def hqq_groupwise(
    w: torch.Tensor,
    group_size: int,
    bits: int,
    scale_dtype: torch.dtype,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zeros as `quantize_groupwise` returns them (w ~ (q - mid) * scale + zero), the zero fitted.

    w: (N, K); groups of `group_size` input channels. Stops early when the mean absolute error stops falling.
    """
    n, k = w.shape
    mid, top = 2 ** (bits - 1), 2**bits - 1
    _, scale, _ = quantize_groupwise(w, group_size, False, scale_dtype, bits)  # min/max scales (N, G)
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # (N, G, gs)
    s = scale.float()[..., None]  # (N, G, 1)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    z = torch.round(-lo / s).clamp(0, top)  # (N, G, 1): RTN's zero code, the starting point
    best_z, best = z, float("inf")
    for _ in range(iters):
        q = torch.round(wg / s + z).clamp(0, top)
        error = wg - (q - z) * s  # (N, G, gs)
        current = float(error.abs().mean())
        if current >= best:
            break
        best, best_z = current, z
        e = _shrink(error, beta, p)
        z = (q - (wg - e) / s).mean(-1, keepdim=True)  # the zero that best explains the codes, outliers shrunk
        beta *= kappa
    q = torch.round(wg / s + best_z).clamp(0, top)
    zero = (mid - best_z) * s  # w = (q - z) s = (q - mid) s + (mid - z) s
    return q.reshape(n, k).to(torch.uint8), scale, zero[..., 0].to(scale_dtype)
