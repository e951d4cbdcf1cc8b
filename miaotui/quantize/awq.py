"""AWQ (Lin et al., 2023): activation-aware weight quantization, block by block through the model.

A few input channels carry large activations; their weights matter most. For each fold discovered in a block
(a norm or linear feeding some layers), AWQ scales those input channels up before rounding, by
s = mean|X|^alpha (normalised), and folds 1/s into the producer so the model's function is unchanged
(`miaotui.quantize.folding`). alpha is searched on a grid in [0, 1) for the least output error of the
consumers on calibration activations; alpha 0 is round-to-nearest, so the search never does worse than RTN
on that loss. Then each layer's clipping range is searched per group (shrinking it trades clipped outliers
for finer steps), and the layer is packed by round-to-nearest into the usual int4 (or int8) layer.

Output errors use the inputs' second moment H = sum x x^T: ||(W' - W) X^T||^2 = sum((D @ H) * D) with
D = W' - W, exact over all calibration tokens at a cost independent of their number.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> x = torch.randn(2048, 256) * torch.cat([torch.full((8,), 20.0), torch.ones(248)])  # 8 salient channels
>>> w, h = torch.randn(64, 256), x.T @ x
>>> quant = lambda w: fake_quantize(w, "w4", 128, False)
>>> s, alpha = search_scales([w], x.abs().mean(0), h, quant)
>>> err = lambda d: output_error(d, h).item()
>>> bool(alpha > 0 and err(quant(w * s) / s - w) < 0.7 * err(quant(w) - w))  # measured: 0.26
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.experts import unfuse_experts_
from miaotui.modules import find_linears, linear_weight, set_module
from miaotui.quantize.config import QuantizeConfig
from miaotui.quantize.folding import discover_folds, fold_scales_, scaled_layers, unfolded
from miaotui.quantize.int4 import quantize_groupwise
from miaotui.quantize.int8 import quantize_per_channel_int8
from miaotui.quantize.rtn import LAYER_FOR_SCHEME

SCALE_GRID = 20  # alphas 0, 0.05, ..., 0.95
CLIP_GRID = 20  # clipping ratios 1, 0.975, ..., 0.525
MAX_SHRINK = 0.5
SEARCH_EXPERTS = 8  # experts scored in the scale search of a fold into an experts module


def fake_quantize(w: torch.Tensor, scheme: str, group_size: int, symmetric: bool) -> torch.Tensor:
    """The float weight (N, K) that round-to-nearest codes of w stand for, as the packed layers store them."""
    if scheme == "w8":
        q, scale = quantize_per_channel_int8(w, torch.float32)
        return q.float() * scale[:, None]
    n, k = w.shape
    q, scale, zero = quantize_groupwise(w, group_size, symmetric, torch.float32)  # (N, K), (N, G), (N, G)
    deq = (q.float().view(n, k // group_size, group_size) - 8) * scale[..., None] + zero[..., None]
    return deq.view(n, k)


def output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """||D X^T||^2 for a weight error D (N, K) and H = X^T X (K, K)."""
    return ((d @ h) * d).sum()


def search_scales(weights: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor, quant) -> tuple:
    """The input-channel scales s (K,) with the least output error of all `weights` (each (N, K)), and their alpha.

    quant(w) -> the dequantized weight; x_mean (K,): mean |x| per channel; h (K, K): sum of x x^T.
    """
    weights = [w.float() for w in weights]
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for i in range(SCALE_GRID):
        alpha = i / SCALE_GRID
        s = x_mean.float().pow(alpha).clamp(min=1e-4)  # (K,)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(output_error(quant(w * s) / s - w, h).item() for w in weights)
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]


def clip_weight(w: torch.Tensor, h: torch.Tensor, quant, group: int, symmetric: bool) -> torch.Tensor:
    """w (N, K) clamped per group to the shrunk range with the least output error after quant (H: (K, K))."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)  # (N, G, gs)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)  # (N, G, 1)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    hg = torch.stack([h[j : j + group, j : j + group] for j in range(0, k, group)])  # (G, gs, gs)
    best_err = torch.full((n, k // group, 1), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    for i in range(CLIP_GRID):
        ratio = 1 - MAX_SHRINK * i / CLIP_GRID
        d = quant(torch.clamp(wg, lo * ratio, hi * ratio).view(n, k)).view_as(wg) - wg  # (N, G, gs)
        err = torch.einsum("ngi,gij,ngj->ng", d, hg, d)[..., None]  # (N, G, 1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
    return torch.clamp(wg, lo * best, hi * best).view(n, k)


@torch.no_grad()
def awq_quantize_(lm, cfg: QuantizeConfig, ids: torch.Tensor, *, clip: bool = True, progress=None) -> dict:
    """AWQ over a LoadedModel, block by block on calibration token ids (S, T); replaces layers in place."""
    from miaotui.calibration import observe_inputs, run_blockwise

    layer_cls = LAYER_FOR_SCHEME[cfg.scheme]
    options = {"group_size": cfg.group_size, "symmetric": cfg.symmetric}
    group = cfg.group_size if cfg.scheme == "w4" else None
    symmetric = cfg.scheme == "w8" or cfg.symmetric

    def quant(w):
        return fake_quantize(w, cfg.scheme, cfg.group_size, cfg.symmetric)

    unfused, skipped = unfuse_experts_(lm.model)
    done, scaled, unscaled = 0, 0, {}

    def quantize_block(index: int, block: nn.Module, inputs: list[torch.Tensor], forward) -> None:
        nonlocal done, scaled
        chosen = {}
        for name, m in find_linears(block, cfg.targets, cfg.ignore):
            problem = layer_cls.unsupported(*linear_weight(m).shape, **options)
            if problem:
                skipped[f"block {index}: {name}"] = problem
            else:
                chosen[name] = m
        groups, dropped = discover_folds(block, inputs[0], forward)
        groups = [g for g in groups if any(name in chosen for name in scaled_layers(g))]
        key = {name: name for name in chosen}  # layers sharing an input share its statistics
        observed = dict(chosen)
        for i, g in enumerate(groups):
            key.update({name: f"fold {i}" for name in scaled_layers(g)})
            observed[f"fold {i}"] = g.consumers[0][1]
        stats = {}  # key -> [sum |x| (K,), H (K, K)]

        def observe(k, x):
            x = x.float()  # (tokens, K)
            if k not in stats:
                k_in = x.shape[1]
                stats[k] = [torch.zeros(k_in, device=x.device), torch.zeros(k_in, k_in, device=x.device)]
            stats[k][0] += x.abs().sum(0)
            stats[k][1] += x.T @ x

        observe_inputs({k: observed[k] for k in set(key.values())}, inputs, forward, observe)
        for i, g in enumerate(groups):
            abs_sum, h = stats[f"fold {i}"]
            weights = [linear_weight(chosen[n]) for n in scaled_layers(g) if n in chosen]
            s, _ = search_scales(_sample(weights), abs_sum, h, quant)
            fold_scales_(g, s)
            h /= s[:, None] * s[None, :]  # the consumers now see x / s
            scaled += len(weights)
        for name, m in chosen.items():
            if clip:
                w = linear_weight(m)
                w.copy_(clip_weight(w, stats[key[name]][1], quant, group or w.shape[1], symmetric).to(w.dtype))
            set_module(block, name, layer_cls.from_float(m, **options))
            done += 1
        unscaled.update(unfolded(chosen, groups, dropped))

    experts = run_blockwise(lm, ids, quantize_block, progress=progress)
    return {
        "scheme": cfg.scheme,
        "algorithm": "awq",
        "quantized": done,
        "skipped": skipped,
        "scaled": scaled,
        "unscaled": unscaled,
        **unfused,
        **experts,
    }


def _sample(weights: list[torch.Tensor], most: int = SEARCH_EXPERTS) -> list[torch.Tensor]:
    """At most `most` of the weights sharing a fold, evenly spaced: the scale search of an experts module scores
    a sample of its experts (each expert's weights are still clipped and rounded on their own)."""
    if len(weights) <= most:
        return weights
    step = len(weights) / most
    return [weights[int(i * step)] for i in range(most)]
