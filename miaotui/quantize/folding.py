"""Scale folding: divide a producer's output channels by s and multiply its consumers' input channels by s.

The model computes exactly the same function (up to float rounding), but the consumers now see inputs X / s
and hold weights W * s: AWQ chooses s to protect the weights that meet large activations, SmoothQuant to move
activation outliers into the weights. Which norm or linear feeds which linears is the `folds` field of the
architecture table (`miaotui.arch`).

>>> import torch, torch.nn as nn
>>> from miaotui.arch import Fold
>>> block = nn.ModuleDict({"norm": nn.LayerNorm(8), "fc": nn.Linear(8, 4)})
>>> x = torch.randn(3, 8)
>>> before = block["fc"](block["norm"](x))
>>> groups, skipped = resolve_folds(block, (Fold("norm", ("fc",)),), config=None)
>>> fold_scales_(groups[0], torch.rand(8) + 0.5)
>>> torch.allclose(block["fc"](block["norm"](x)), before, atol=1e-5)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from miaotui.arch import Fold
from miaotui.modules import LINEAR_TYPES, linear_weight
from miaotui.quantize.packed import PackedLinear

NO_PRODUCER = "no norm or linear feeds it alone and linearly: no scales to fold"


@dataclass
class FoldGroup:
    """One fold resolved in one block: the producer, the rows of its output that feed the consumers, the consumers."""

    fold: Fold
    producer: nn.Module
    rows: slice
    consumers: list[tuple[str, nn.Module]]
    plus_one: bool = False  # the producer is a norm computing x * (1 + weight)

    @property
    def channels(self) -> int:
        return linear_weight(self.consumers[0][1]).shape[1]


def fold_label(fold: Fold) -> str:
    return f"{fold.producer} -> {', '.join(fold.consumers)}"


def _problem(block: nn.Module, fold: Fold, config, plus_one: bool) -> tuple[str | None, FoldGroup | None]:
    """Why `fold` cannot be applied in this block, or the resolved group."""
    for attr, value in fold.when:
        if getattr(config, attr, None) != value:
            return f"needs {attr}={value!r} (the model has {getattr(config, attr, None)!r})", None
    try:
        producer = block.get_submodule(fold.producer)
        consumers = [(name, block.get_submodule(name)) for name in fold.consumers]
    except AttributeError as e:
        return f"module not found ({e})", None
    if isinstance(producer, PackedLinear) or any(isinstance(m, PackedLinear) for _, m in consumers):
        return "already quantized by an earlier step", None
    if not all(isinstance(m, LINEAR_TYPES) for _, m in consumers):
        return "a consumer is not a linear layer", None
    k = {linear_weight(m).shape[1] for _, m in consumers}
    if isinstance(producer, LINEAR_TYPES):
        out = linear_weight(producer).shape[0]
        i, n = fold.chunk or (0, 1)
        rows = slice(i * out // n, (i + 1) * out // n) if out % n == 0 else slice(0, 0)
    elif isinstance(getattr(producer, "weight", None), torch.Tensor) and producer.weight.dim() == 1:
        rows = slice(0, producer.weight.shape[0])
    else:
        return f"the producer {type(producer).__name__} has no per-channel weight", None
    if k != {rows.stop - rows.start}:
        return (
            f"shapes differ ({rows.stop - rows.start} outputs feed {sorted(k)} inputs: grouped-query attention)",
            None,
        )
    return None, FoldGroup(fold, producer, rows, consumers, plus_one and not isinstance(producer, LINEAR_TYPES))


def resolve_folds(block: nn.Module, folds, config, plus_one: bool = False) -> tuple[list[FoldGroup], dict[Fold, str]]:
    """The folds that apply in `block` and, for those that do not, {fold: reason}."""
    groups, skipped = [], {}
    for fold in folds:
        problem, group = _problem(block, fold, config, plus_one)
        if problem:
            skipped[fold] = problem
        else:
            groups.append(group)
    return groups, skipped


def block_folds(lm, block: nn.Module) -> tuple[list[FoldGroup], dict[Fold, str]]:
    """`resolve_folds` with the LoadedModel's architecture table entry and config."""
    return resolve_folds(block, lm.arch.folds, lm.model.config, lm.arch.norm_plus_one)


def unfolded(names, groups: list[FoldGroup], skipped: dict[Fold, str]) -> dict[str, str]:
    """{linear name: why no scales were folded into it} for the names not covered by `groups`."""
    covered = {name for g in groups for name, _ in g.consumers}
    reasons = {c: f"{fold_label(f)}: {why}" for f, why in skipped.items() for c in f.consumers}
    return {name: reasons.get(name, NO_PRODUCER) for name in names if name not in covered}


def _assign(t: torch.Tensor, value: torch.Tensor) -> None:
    t.copy_(value.to(t.dtype))


@torch.no_grad()
def fold_scales_(group: FoldGroup, s: torch.Tensor) -> None:
    """Producer output channels / s, consumer input channels * s (s: (K,) positive), in place."""
    s = s.float()  # (K,)
    p = group.producer
    if isinstance(p, LINEAR_TYPES):
        w = linear_weight(p)[group.rows]  # (K, in) view
        _assign(w, w.float() / s[:, None])
        if p.bias is not None:
            b = p.bias[group.rows]
            _assign(b, b.float() / s)
    else:
        w = p.weight
        _assign(w, (w.float() + 1) / s - 1 if group.plus_one else w.float() / s)
        if getattr(p, "bias", None) is not None:
            _assign(p.bias, p.bias.float() / s)
    for _, m in group.consumers:
        w = linear_weight(m)  # (N, K) view
        _assign(w, w.float() * s[None, :])
