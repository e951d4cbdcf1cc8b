"""Mask refinement by swaps: after a method that keeps the surviving weights as they are (magnitude, Wanda) has
chosen which weights to prune, trade pruned weights for kept ones, one pair per output row per round, whenever
the trade lowers the layer's exact reconstruction error on the calibration inputs. No weight changes value:
only which weights are zero.

For one output row w (K,) with prune mask m, the pruned part r = w * m is what the row loses, and its squared
output error over the calibration tokens X (n, K) is r^T H r with H = 2/n X^T X (GPTQ's Hessian). Regrowing a
pruned weight j and pruning a kept weight k changes it by

    -2 r_j g_j + r_j^2 H_jj  +  2 w_k (g_k - r_j H_jk) + w_k^2 H_kk,      g = H r

Each round picks, per row, the regrowth j that helps most on its own, then the best k to prune given j; for N:M
patterns, the best pair within one group of M columns (so the pattern holds), every pair of every group
weighed. It applies the pair if the total is negative, and updates g in O(K) per row. Every row keeps exactly
the sparsity (and pattern) the method gave it. Wanda's ranking reads only diag(H); the swaps use all of H, so
correlated input features stop being pruned together.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> x = torch.randn(256, 8) @ torch.randn(8, 32)  # correlated inputs
>>> w, h = torch.randn(16, 32), 2 * x.T @ x / 256
>>> mask = w.abs() < w.abs().median(1, keepdim=True).values  # magnitude: half of each row
>>> new, (before, after) = refine_mask(w, h, mask.clone(), rounds=50)
>>> bool(after < 0.7 * before), torch.equal(new.sum(1), mask.sum(1))  # lower error, same count per row
(True, True)
"""

from __future__ import annotations

import torch


def _errors(r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row squared output error r^T H r from r and g = r H: (N,)."""
    return (r * g).sum(1)


def _best_pairs(w, h, diag, r, g, mask, nm):
    """Per row, a (regrow j, prune k) pair and its change of error: (j, k, gain), each (N,).

    Unstructured: the best j on its own, then the best k given j. N:M: the best pair within any group of M
    columns, all pairs of each group weighed together (N * K * M values).
    """
    rows = torch.arange(w.shape[0], device=w.device)  # (N,)
    regrow = torch.where(mask, r * (r * diag - 2 * g), torch.inf)  # (N, K)
    prune = torch.where(mask, torch.inf, w * (w * diag + 2 * g))  # (N, K), before the regrowth
    if nm is None:
        j = regrow.argmin(1)  # (N,)
        prune = prune - 2 * w * r[rows, j][:, None] * h[j]  # (N, K): the cross term with j
        k = prune.argmin(1)
        return j, k, regrow[rows, j] + prune[rows, k]
    n_rows, cols, m = *w.shape, nm[1]
    blocks = h.reshape(cols // m, m, cols // m, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, m, m)
    rg, wg = r.view(n_rows, -1, m), w.view(n_rows, -1, m)  # (N, G, m)
    gain = regrow.view(n_rows, -1, m, 1) + prune.view(n_rows, -1, 1, m) - 2 * rg[..., None] * wg[..., None, :] * blocks
    best = gain.view(n_rows, -1).argmin(1)  # (N,) over (G, j, k)
    group, j, k = best // (m * m), best // m % m, best % m
    return group * m + j, group * m + k, gain.view(n_rows, -1)[rows, best]


@torch.no_grad()
def refine_mask(
    w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, rounds: int, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, tuple[float, float]]:
    """w (N, K), H (K, K), mask (N, K) bool (True = pruned) -> (mask, refined in place; (error before, after)).

    Errors are sums over rows of r^T H r. At most `rounds` swaps per row. A row that finds no improving pair
    is done for good (its state no longer changes), so each round works on the rows still improving only.
    """
    w, h = w.float(), hessian.float().to(w.device)  # (N, K), (K, K)
    diag = torch.diagonal(h)  # (K,)
    r = w * mask  # (N, K): the pruned weights
    g = r @ h  # (N, K)
    err = _errors(r, g)  # (N,), kept up to date with each applied gain
    before = err.sum().item()
    live = torch.arange(w.shape[0], device=w.device)  # (L,): rows still improving, and their state below
    lw, lm, lr, lg = w, mask.clone(), r, g
    for _ in range(rounds):
        j, k, gain = _best_pairs(lw, h, diag, lr, lg, lm, nm)  # (L,) each
        better = gain < -1e-6 * err.clamp_min(torch.finfo(torch.float32).tiny)
        if not better.all():
            mask[live[~better]] = lm[~better]  # finished rows
            live, lw, lm, lr, lg, err, j, k, gain = (t[better] for t in (live, lw, lm, lr, lg, err, j, k, gain))
            if not len(live):
                break
        err = err + gain
        i = torch.arange(len(live), device=w.device)
        lm[i, j], lm[i, k] = False, True
        rj, wk = lr[i, j], lw[i, k]
        lr[i, j], lr[i, k] = 0.0, wk
        lg += wk[:, None] * h[k] - rj[:, None] * h[j]
    mask[live] = lm  # rows still improving when the rounds ran out
    r = w * mask
    return mask, (before, _errors(r, r @ h).sum().item())  # recomputed, not the running g
