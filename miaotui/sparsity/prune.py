"""The pruning verb, `prune_(lm, cfg)`: check everything, prune layer weights (in calibration order for the
methods that need data), then swap in the layer type that stores them.

>>> import torch.nn as nn
>>> from miaotui.sparsity.config import PruneConfig
>>> m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
>>> s = prune_(m, PruneConfig(sparsity=0.25), progress=False)
>>> s["pruned"], s["layers"]["0"], type(m[0]).__name__
(2, 0.25, 'SparseLinear')
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from miaotui.calibration import Calibration, blocks_of, calibration_summary, run_blockwise
from miaotui.experts import unfuse_experts_
from miaotui.loading import LoadedModel
from miaotui.modules import find_linears, linear_weight, set_module
from miaotui.progress import track
from miaotui.quantize.gptq import layer_hessians
from miaotui.sparsity.config import PruneConfig
from miaotui.sparsity.layer import SparseLinear
from miaotui.sparsity.magnitude import magnitude_prune
from miaotui.sparsity.owl import outlier_fraction, owl_ratios
from miaotui.sparsity.semi_structured import SemiStructuredSparseLinear
from miaotui.sparsity.sparsegpt import sparsegpt_prune
from miaotui.sparsity.swaps import refine_mask
from miaotui.sparsity.wanda import input_norms_sq, wanda_prune

# method -> (collect the calibration statistic of a block's layers, or None; prune one weight)
METHODS = {
    "magnitude": (None, magnitude_prune),
    "wanda": (input_norms_sq, wanda_prune),
    "sparsegpt": (layer_hessians, sparsegpt_prune),
}
CPU_NOTE = (
    "pruned layers compute with dense weights on CPU: sparsity saves no time there, only disk space "
    "(bitmask + nonzero values); 2:4 layers run PyTorch's semi-structured sparse kernels on CUDA (fp16/bf16)"
)


def _check(model: nn.Module, cfg: PruneConfig, chosen: list[tuple[str, nn.Module]]) -> None:
    """Refuse bad input before any work: no matching layer, shapes the pattern or layer type cannot take."""
    if not chosen:
        names = [n for n, _ in find_linears(model)][:4]
        raise ValueError(
            f"prune: targets {list(cfg.targets)} minus ignore {list(cfg.ignore)} match no linear layer "
            f"(the model's linear layers are named like {', '.join(names) or 'nothing: it has none'})"
        )
    for name, m in chosen:
        out_features, in_features = linear_weight(m).shape
        if cfg.nm is not None and in_features % cfg.nm[1]:
            raise ValueError(
                f"prune: pattern {cfg.pattern} needs input features divisible by {cfg.nm[1]}; layer {name} has "
                f"{in_features} (leave it out with ignore)"
            )
        if cfg.layer == "semi_structured":
            problem = SemiStructuredSparseLinear.unsupported(out_features, in_features)
            if problem:
                raise ValueError(f"prune: layer {name}: {problem} (use layer: auto to store it as a bitmask)")


def _write(module: nn.Module, new: torch.Tensor) -> None:
    """Put the pruned weight (N, K) back into an nn.Linear / Conv1D, in its own dtype and layout."""
    w = linear_weight(module)
    w.copy_(new.to(w.dtype))


def _pack(model: nn.Module, name: str, module: nn.Module, cfg: PruneConfig) -> str:
    """Swap in the layer type that keeps the pruned weight; returns its type name."""
    if cfg.layer == "dense":
        return "float_linear"
    cls = SparseLinear
    if cfg.layer == "semi_structured" or (cfg.layer == "auto" and cfg.nm == (2, 4)):
        problem = SemiStructuredSparseLinear.unsupported(*linear_weight(module).shape)
        cls = SparseLinear if problem and cfg.layer == "auto" else SemiStructuredSparseLinear
    set_module(model, name, cls.from_float(module))
    return cls.layer_type


def _error_ratio(errors: list[tuple[float, float]]) -> float:
    """Mean over layers of reconstruction error after swaps / before (1.0: the swaps changed nothing)."""
    ratios = [after / before for before, after in errors if before > 0]
    return round(sum(ratios) / len(ratios), 4) if ratios else 1.0


@torch.no_grad()
def prune_(
    lm: LoadedModel | nn.Module,
    cfg: PruneConfig,
    *,
    calibration: Calibration | torch.Tensor | None = None,
    progress: bool | None = None,
) -> dict:
    """Prune `lm` in place as `cfg` says; returns a summary (sparsity per layer, layer types, skipped, a note).

    lm: a LoadedModel, or a bare nn.Module for magnitude pruning with uniform ratios.
    calibration: a Calibration (or (S, T) token ids) for wanda, sparsegpt, owl ratios and swaps.
    """
    model = lm.model if isinstance(lm, LoadedModel) else lm
    unfused, kept_fused = unfuse_experts_(model)
    chosen = find_linears(model, cfg.targets, cfg.ignore)
    _check(model, cfg, chosen)
    ids = None
    if cfg.needs_calibration:
        what = f"method {cfg.method}" if cfg.method != "magnitude" else "swaps" if cfg.swaps else "ratios owl"
        if not isinstance(lm, LoadedModel):
            raise ValueError(f"prune: {what} calibrates block by block; pass a LoadedModel (miaotui.load)")
        if calibration is None:
            raise ValueError(f"prune: {what} needs calibration text (--calib FILE)")
        ids = calibration.token_ids(lm, progress=progress) if isinstance(calibration, Calibration) else calibration
    collect, prune_weight = METHODS[cfg.method]
    if cfg.method == "sparsegpt":
        prune_weight = functools.partial(sparsegpt_prune, damp=cfg.damp)
    swap_errors: list[tuple[float, float]] = []
    if cfg.swaps:  # the method's mask, then swaps; both read the layer Hessian (Wanda: its diagonal, 2/n ||X_j||^2)
        collect, method_prune = layer_hessians, prune_weight

        def prune_weight(w, hessian, sparsity, nm):
            _, mask = method_prune(w, torch.diagonal(hessian) if cfg.method == "wanda" else None, sparsity, nm)
            mask, errors = refine_mask(w, hessian, mask, cfg.swaps, nm)
            swap_errors.append(errors)
            return w.float().masked_fill(mask, 0.0), mask

    masks: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    experts: dict = {}
    block_ratios: list[float] = []

    def prune_layers(layers: dict[str, nn.Module], stats: dict | None, sparsity: float) -> None:
        for name, m in layers.items():
            new, masks[name] = prune_weight(linear_weight(m), stats[name] if stats else None, sparsity, cfg.nm)
            _write(m, new)

    if ids is None:
        for name, m in track(chosen, f"pruning ({cfg.method})", enabled=progress):
            prune_layers({name: m}, None, cfg.sparsity)
    else:
        full_name = {id(m): name for name, m in chosen}

        def in_block(block: nn.Module) -> dict[str, nn.Module]:
            return {full_name[id(m)]: m for m in block.modules() if id(m) in full_name}

        ratios = None
        if cfg.ratios == "owl":  # first pass over the dense model: outlier fractions per block
            fractions = []

            def measure(index, block, inputs, forward):
                fractions.append(outlier_fraction(in_block(block), inputs, forward, cfg.owl_threshold))

            run_blockwise(lm, ids, measure, progress=progress)
            ratios = owl_ratios(fractions, sparsity=cfg.sparsity, lam=cfg.owl_lambda)

        def prune_block(index, block, inputs, forward):
            layers = in_block(block)
            sparsity = ratios[index] if ratios else cfg.sparsity
            block_ratios.append(round(sparsity, 4))
            prune_layers(layers, collect(layers, inputs, forward) if collect else None, sparsity)

        experts = run_blockwise(lm, ids, prune_block, progress=progress)
        blocks = {id(m) for m in blocks_of(lm).modules()}
        skipped = {name: "outside the transformer blocks: not calibrated" for name, m in chosen if id(m) not in blocks}
    layer_types: dict[str, int] = {}
    for name, m in chosen:
        if name in masks:
            kind = _pack(model, name, m, cfg)
            layer_types[kind] = layer_types.get(kind, 0) + 1
    pruned = sum(int(masks[n].sum()) for n in masks)
    total = sum(masks[n].numel() for n in masks)
    return {
        "method": cfg.method,
        "pattern": cfg.pattern,
        "sparsity": cfg.sparsity,
        "pruned": len(masks),
        "overall_sparsity": pruned / max(total, 1),
        "layers": {name: round(mask.float().mean().item(), 4) for name, mask in masks.items()},
        **({"calibration": calibration_summary(lm, calibration, ids)} if ids is not None else {}),
        **({"block_ratios": block_ratios} if cfg.ratios == "owl" else {}),
        **({"swap_error_ratio": _error_ratio(swap_errors)} if cfg.swaps else {}),
        "layer_types": layer_types,
        "skipped": {**kept_fused, **skipped},
        "note": CPU_NOTE,
        **unfused,
        **experts,
    }
