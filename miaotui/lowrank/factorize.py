"""The factorization verb, `factorize_(lm, cfg, ids)`: plain SVD layer by layer, or activation-aware SVD block by
block on calibration token ids (memory bounded by one block's input statistics).

>>> import torch, torch.nn as nn
>>> from miaotui.lowrank.config import FactorizeConfig
>>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
>>> s = factorize_(m, FactorizeConfig(method="svd", ratio=0.5), progress=False)
>>> s["factorized"], s["ranks"], list(s["skipped"])
(1, {'0': 16}, ['2'])
>>> type(m[0]).__name__
'LowRankLinear'
"""

from __future__ import annotations

import torch
import torch.nn as nn

from miaotui.experts import unfuse_experts_
from miaotui.lowrank import svd
from miaotui.lowrank.config import FactorizeConfig
from miaotui.lowrank.layer import LowRankLinear
from miaotui.modules import find_linears, linear_weight, matches, set_module
from miaotui.progress import track


def select_layers(model: nn.Module, cfg: FactorizeConfig) -> dict[str, nn.Module]:
    """The linear layers the step factorizes (not the factors of earlier steps); refuses patterns that match none."""
    inside = {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    linears = [(n, m) for n, m in find_linears(model) if n.rpartition(".")[0] not in inside]
    for pattern in cfg.targets:
        if not any(matches(n, (pattern,)) for n, _ in linears):
            raise ValueError(f"factorize: target pattern {pattern!r} matches no linear layer of the model")
    chosen = {n: m for n, m in linears if matches(n, cfg.targets) and not matches(n, cfg.ignore)}
    if not chosen:
        raise ValueError(f"factorize: targets {list(cfg.targets)} minus ignore {list(cfg.ignore)} leave no layer")
    if cfg.rank is not None:
        for name, m in chosen.items():
            n, k = linear_weight(m).shape
            if cfg.rank > min(n, k):
                raise ValueError(
                    f"factorize: rank {cfg.rank} is larger than min(in, out) = {min(n, k)} of {name} ({k} -> {n})"
                )
    return chosen


def _rank(cfg: FactorizeConfig, s: torch.Tensor, n: int, k: int) -> int:
    """The per-layer rank from the config's budget."""
    if cfg.rank is not None:
        return cfg.rank
    if cfg.energy is not None:
        return svd.rank_for_energy(s, cfg.energy, cfg.rank_multiple, n, k)
    return svd.rank_for_ratio(n, k, cfg.ratio, cfg.rank_multiple)


class _Factorizer:
    """Decompose layers, choose ranks, replace them, and keep the summary."""

    def __init__(self, model: nn.Module, cfg: FactorizeConfig, chosen: dict[str, nn.Module], ranks=None):
        self.model, self.cfg, self.chosen, self.ranks = model, cfg, chosen, ranks
        self.done: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self.spectra: dict[str, tuple[torch.Tensor, int, int]] = {}

    def __call__(self, name: str, module: nn.Module, chol: torch.Tensor | None = None) -> None:
        w = linear_weight(module)  # (N, K)
        n, k = w.shape
        parts = svd.decompose(w, chol)
        if self.ranks is None and self.cfg.allocation == "global":  # first pass: spectra only
            self.spectra[name] = (parts[1].cpu(), n, k)
            return
        r = self.ranks[name] if self.ranks is not None else _rank(self.cfg, parts[1], n, k)
        if r is None or (self.cfg.skip_larger and r * (n + k) >= n * k):
            self.skipped[name] = f"rank {r or 'any'} would not save weights ({k} -> {n})"
            return
        up, down = svd.factors(*parts, rank=r)
        layer = LowRankLinear.from_factors(up, down, module.bias, dtype=w.dtype)
        set_module(self.model, name, layer)
        self.done[name] = r


def _run(lm, cfg, chosen, ids, ranks, progress) -> _Factorizer:
    """One pass over the chosen layers: from the weights alone (svd) or block by block with whitening (asvd)."""
    model = lm.model if hasattr(lm, "model") else lm
    work = _Factorizer(model, cfg, chosen, ranks)
    if cfg.method == "svd":
        for name, module in track(list(chosen.items()), f"factorizing ({cfg.method})", enabled=progress):
            work(name, module)
        return work
    from miaotui.calibration import observe_inputs, run_blockwise

    names = {id(m): n for n, m in model.named_modules()}

    def block_fn(index: int, block: nn.Module, inputs: list[torch.Tensor], forward) -> None:
        mine = [(names[id(m)], m) for m in block.modules() if id(m) in chosen_ids]
        grams = {}
        for name, m in mine:
            w = linear_weight(m)
            grams[name] = torch.zeros(w.shape[1], w.shape[1], device=w.device)  # (K, K)

        def accumulate(name, x):
            x = x.float()  # (tokens, K)
            grams[name] += x.T @ x  # (K, K)

        observe_inputs(dict(mine), inputs, forward, accumulate)
        for name, m in mine:
            work(name, m, svd.whitening(grams.pop(name)))

    chosen_ids = {id(m) for m in chosen.values()}
    run_blockwise(lm, ids, block_fn, progress=progress)
    return work


def factorize_(lm, cfg: FactorizeConfig, ids: torch.Tensor | None = None, *, progress: bool | None = None) -> dict:
    """Factorize the selected layers of `lm` (a LoadedModel, or any nn.Module for method svd) in place.

    ids: (S, T) calibration token ids, needed by method asvd. Returns a summary: ranks per layer, the layers
    left dense and why, and the weights of the selected layers before and after.
    """
    model = lm.model if hasattr(lm, "model") else lm
    unfused, kept_fused = unfuse_experts_(model)
    chosen = select_layers(model, cfg)
    if cfg.method == "asvd":
        if ids is None or not hasattr(lm, "model"):
            raise ValueError("factorize: method asvd needs a loaded model and calibration token ids")
        from miaotui.calibration import blocks_of

        in_blocks = {id(m) for m in blocks_of(lm).modules()}
        outside = [name for name, m in chosen.items() if id(m) not in in_blocks]
        if len(outside) == len(chosen):
            raise ValueError(
                f"factorize: asvd calibrates inside the transformer blocks; {outside[0]} is outside "
                "(use method svd for it)"
            )
        chosen = {name: m for name, m in chosen.items() if name not in outside}
    else:
        outside = []
    before = sum(linear_weight(m).numel() for m in chosen.values())
    ranks = None
    if cfg.allocation == "global":
        spectra = _run(lm, cfg, chosen, ids, None, progress).spectra
        ranks = svd.allocate_global(spectra, cfg.ratio, cfg.rank_multiple)
    work = _run(lm, cfg, chosen, ids, ranks, progress)
    work.skipped.update(dict.fromkeys(outside, "outside the transformer blocks: no calibration statistics"))
    work.skipped.update(kept_fused)
    after = before - sum(
        linear_weight(chosen[name]).numel() - r * sum(linear_weight(chosen[name]).shape)
        for name, r in work.done.items()
    )
    return {
        "method": cfg.method,
        "factorized": len(work.done),
        "skipped": work.skipped,
        "ranks": work.done,
        "weights_before": before,
        "weights_after": after,
        "kept_ratio": after / before,
        **unfused,
    }
