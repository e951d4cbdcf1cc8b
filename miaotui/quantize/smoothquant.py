"""SmoothQuant (Xiao et al., 2022): make activations easy to quantize by moving their outliers into the weights.

Per input channel j of the layers that one norm or linear feeds: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),
where max|X_j| is taken over calibration tokens and max|W_j| over the consumers' weights. X is divided and W
multiplied by s, folded into the producer (a fold discovered on the block: `miaotui.quantize.folding`), so the
model's function is unchanged; a
later `quantize` step with scheme w8a8 then sees flatter activations. Statistics are gathered block by block.

Per-tensor int8 activations with one outlier channel lose the others to rounding; smoothing fixes that:

>>> import torch
>>> _ = torch.manual_seed(0)
>>> x, w = torch.randn(256, 64), torch.randn(32, 64)
>>> x[:, 3] *= 50  # an outlier channel
>>> s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), alpha=0.5)
>>> def q(t, dim=None):  # symmetric int8 round-to-nearest, per tensor or per row
...     m = t.abs().amax() if dim is None else t.abs().amax(dim, keepdim=True)
...     return torch.round(t / m * 127) * m / 127
>>> err = lambda a, b: ((q(a) @ q(b, 1).T) - x @ w.T).norm() / (x @ w.T).norm()
>>> bool(err(x / s, w * s) < 0.5 * err(x, w))  # measured: 0.0100 vs 0.0516
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.experts import unfuse_experts_
from miaotui.modules import find_linears, matches
from miaotui.quantize.config import SmoothConfig
from miaotui.quantize.folding import consumer_weights, discover_folds, fold_scales_, scaled_layers, unfolded


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (K,) = x_max^alpha / w_max^(1 - alpha) from per-channel maxima (K,); 1 where a channel never fires."""
    s = x_max.float().clamp(min=1e-5).pow(alpha) / w_max.float().clamp(min=1e-5).pow(1 - alpha)  # (K,)
    return torch.where(x_max > 0, s, torch.ones_like(s)).clamp(min=1e-5)


@torch.no_grad()
def smooth_(lm, cfg: SmoothConfig, ids: torch.Tensor, *, progress: bool | None = None) -> dict:
    """SmoothQuant over a LoadedModel, block by block on calibration token ids (S, T); rescales in place.

    A fold (discovered on each block: `miaotui.quantize.folding`) applies when `targets` / `ignore` select one of
    the layers it scales. The summary lists every selected linear layer that was not smoothed, and why (a fold
    that did not hold, or no norm / linear to fold scales into).
    """
    from miaotui.calibration import observe_inputs, run_blockwise

    unfused, not_smoothed = unfuse_experts_(lm.model)
    smoothed = 0

    def smooth_block(index: int, block: nn.Module, inputs: list[torch.Tensor], forward) -> None:
        nonlocal smoothed
        names = [name for name, _ in find_linears(block, cfg.targets, cfg.ignore)]
        groups, dropped = discover_folds(block, inputs[0], forward)
        groups = [
            g for g in groups if any(matches(n, cfg.targets) and not matches(n, cfg.ignore) for n in scaled_layers(g))
        ]
        x_max = [torch.zeros(g.channels, device=lm.device) for g in groups]  # (K,) each

        def observe(i, x):  # x (tokens, K)
            torch.maximum(x_max[i], x.abs().amax(0).float(), out=x_max[i])

        observe_inputs({i: g.consumers[0][1] for i, g in enumerate(groups)}, inputs, forward, observe)
        for g, xm in zip(groups, x_max, strict=True):
            weights = [w for _, m in g.consumers for w in consumer_weights(m)]  # (N, K) each
            w_max = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)  # (K,)
            fold_scales_(g, smoothing_scales(xm, w_max, cfg.alpha))
            smoothed += len(scaled_layers(g))
        not_smoothed.update(unfolded(names, groups, dropped))

    experts = run_blockwise(lm, ids, smooth_block, progress=progress)
    summary = {"algorithm": "smoothquant", "alpha": cfg.alpha, "layers": smoothed, "skipped": not_smoothed}
    return {**summary, **unfused, **experts}
