"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and spread each removed weight's error over the
columns not yet visited, with the inverse Hessian of the layer's calibration inputs (the OBS update).

Masks are chosen adaptively: for unstructured sparsity, per block of `block` columns, the lowest
w^2 / [H^-1]_jj^2 over the whole block (rows and columns together), after the updates from earlier blocks;
for N:M, per group of M columns when the sweep reaches it. The Hessian, its dampening and the Cholesky factor
of its inverse are GPTQ's (`miaotui.quantize.gptq`). With correlated inputs it beats magnitude pruning:

>>> import torch
>>> _ = torch.manual_seed(0)
>>> w, x = torch.randn(32, 128), torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)
>>> err = lambda new: ((new - w) @ x.T).norm()
>>> sgpt, mask = sparsegpt_prune(w, 2 * x.T @ x / 512, 0.5, None)
>>> from miaotui.sparsity.magnitude import magnitude_prune
>>> bool(err(sgpt) < 0.5 * err(magnitude_prune(w, None, 0.5, None)[0]))
True
>>> int(mask.sum()), int((sgpt == 0).sum())
(2048, 2048)
"""

from __future__ import annotations

import torch

from miaotui.quantize.gptq import inverse_hessian_factor
from miaotui.sparsity.masks import pruned_count


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    *,
    block: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K), H (K, K) -> (pruned and updated float weight (N, K), prune mask (N, K)).

    Unstructured: exactly `pruned_count(N * width, sparsity)` weights of each block of columns.
    N:M (nm=(n, m)): n kept in every m consecutive columns of each row; `block` is rounded to a multiple of m.
    """
    w, hinv = inverse_hessian_factor(w, hessian, damp)  # (N, K), (K, K) upper
    rows, k = w.shape
    if nm is not None:
        block = max(1, block // nm[1]) * nm[1]
    mask = torch.zeros(rows, k, dtype=torch.bool, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device)  # (N, B)
        h1 = hinv[i1:i2, i1:i2]  # (B, B)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)  # (N, B)
        if nm is None:
            scores = (w1 / torch.diag(h1)[None, :]).pow(2).flatten()  # (N*B,)
            count = pruned_count(scores.numel(), sparsity)
            if count:
                mask1.view(-1)[torch.topk(scores, count, largest=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = (w1[:, i : i + m] / torch.diag(h1)[i : i + m][None, :]).pow(2)  # (N, m)
                mask1.scatter_(1, i + torch.topk(scores, m - n, dim=1, largest=False).indices, True)
            col = w1[:, i]  # (N,)
            kept = col.masked_fill(mask1[:, i], 0.0)
            e = (col - kept) / h1[i, i]  # (N,)
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            w1[:, i] = kept
            err1[:, i] = e
        w[:, i1:i2] = w1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, mask
