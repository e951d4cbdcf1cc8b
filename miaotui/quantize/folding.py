"""Scale folding: divide a producer's output channels by s and multiply its consumers' input channels by s.

The model computes the same function (up to float rounding), but the consumers now see inputs X / s and hold
weights W * s: AWQ chooses s to protect the weights that meet large activations, SmoothQuant to move
activation outliers into the weights.

Which norm or linear feeds which layers is discovered on each block with real activations, not listed:
1. each candidate producer (a linear layer, or a norm: a module with a per-channel weight) gets its output
   channels multiplied by distinct random factors; a layer whose input then changes by exactly those factors,
   channel by channel, is a consumer (through a norm's output, attention's per-channel mix of values, the up
   projection times its gate, a ReLU; not through GELU or a softmax), and the factors tell which producer
   channel feeds each consumer channel (a third of a fused qkv, interleaved heads);
2. the fold is then applied to a float32 copy of the block with random scales, and kept only if the block's
   output stays the same: a producer that also feeds the residual stream (post-LN encoders) or a layer that
   cannot take scales is dropped, with the reason. A norm computing x * (1 + w) (Gemma) is found the same way:
   the fold that keeps the output is the one that divides 1 + w.
Consumers are linear layers, a router's weight (experts, H) and an experts module (every expert's first
projection).

>>> import torch, torch.nn as nn
>>> from miaotui.calibration import BlockCall
>>> block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
>>> x = torch.randn(3, 8)
>>> groups, dropped = discover_folds(block, x, BlockCall(block))
>>> [(g.producer_name, [n for n, _ in g.consumers]) for g in groups]
[('0', ['1'])]
>>> before = block(x)
>>> fold_scales_(groups[0], torch.rand(8) + 0.5)
>>> torch.allclose(block(x), before, atol=1e-5)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from miaotui.experts import ExpertLinears
from miaotui.modules import LINEAR_TYPES, linear_weight
from miaotui.probing import channel_ratios, edited_output, record_inputs

NO_PRODUCER = "no norm or linear feeds it alone and linearly: no scales to fold"
OUTPUT_TOL = 1e-4  # relative change of the float32 block output a valid fold may cause (rounding only)
RATIO_TOL = 1e-3  # relative distance between a measured channel ratio and the factor it stands for


@dataclass
class FoldGroup:
    """One fold in one block: the producer, its output channels feeding the consumers (in consumer input order),
    the consumers, and whether the producer is a norm computing x * (1 + weight)."""

    producer_name: str
    producer: nn.Module
    rows: torch.Tensor  # (K,) int64
    consumers: list[tuple[str, nn.Module]]
    plus_one: bool = False

    @property
    def channels(self) -> int:
        return len(self.rows)

    @property
    def label(self) -> str:
        return f"{self.producer_name} -> {', '.join(n for n, _ in self.consumers)}"


def consumer_weights(module: nn.Module) -> list[torch.Tensor] | None:
    """The float weights (N, K) whose input columns take a fold's scales, or None if `module` cannot take them."""
    if isinstance(module, LINEAR_TYPES):
        return [linear_weight(module)]
    if isinstance(module, ExpertLinears):
        ups = [e.up for e in module.experts]
        return [linear_weight(m) for m in ups] if all(isinstance(m, LINEAR_TYPES) for m in ups) else None
    weight = module._parameters.get("weight")
    if weight is not None and weight.dim() == 2 and not list(module.children()):  # a router
        return [weight]
    return None


def _is_norm(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 1 and not list(module.children())


def _candidates(block: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(producers, consumers) of a block by name, leaving out what lies inside an experts module."""
    inside = {id(m) for e in block.modules() if isinstance(e, ExpertLinears) for m in e.modules() if m is not e}
    producers, consumers = {}, {}
    for name, m in block.named_modules():
        if not name or id(m) in inside:
            continue
        if isinstance(m, LINEAR_TYPES) or _is_norm(m):
            producers[name] = m
        if consumer_weights(m) is not None:
            consumers[name] = m
    return producers, consumers


def _out_channels(module: nn.Module) -> int:
    return linear_weight(module).shape[0] if isinstance(module, LINEAR_TYPES) else module.weight.shape[0]


def _match_rows(r: torch.Tensor, s: torch.Tensor, part: slice) -> tuple[torch.Tensor | None, str]:
    """The producer channel each consumer channel reads, from r (K,) measured ratios and s (C,) the factors
    (distinct within `part`, 1 elsewhere): (rows (K,), "") or (None, why not)."""
    k = len(r)
    known = ~torch.isnan(r)
    starts = {part.start, part.stop - k} | set(range(part.start, part.stop - k + 1, k))
    for start in sorted(x for x in starts if part.start <= x <= part.stop - k):  # contiguous slices
        if bool(((r - s[start : start + k]).abs() <= RATIO_TOL * s[start : start + k])[known].all()):
            return torch.arange(start, start + k), ""
    if not bool(known.all()):
        return None, "some of its consumers' channels are always zero: their source cannot be told"
    rows = part.start + (r[:, None] - s[None, part]).abs().argmin(1)  # (K,) nearest factor
    if not bool(((s[rows] - r).abs() <= RATIO_TOL * r).all()):
        return None, "its consumers' channels do not follow its channels one to one"
    if len(rows.unique()) != k:
        return None, "a consumer reads some of its channels more than once (grouped-query attention): no scale fits"
    return rows, ""


def _parts(producer: nn.Module, consumers: dict[str, nn.Module]) -> list[slice]:
    """Which of the producer's output channels to scale in one probe: all, and for a fused linear producer
    wider than a consumer's input, its first and its last that many (q of [q | k | v], up of [gate | up])."""
    out = _out_channels(producer)
    parts = [slice(0, out)]
    if isinstance(producer, LINEAR_TYPES):
        widths = {w.shape[1] for m in consumers.values() for w in consumer_weights(m)[:1]}
        for k in sorted(w for w in widths if w < out):
            parts += [slice(0, k), slice(out - k, out)]
    return parts


def _factors(c: int, seed: int) -> torch.Tensor:
    """c distinct factors in [0.5, 2], in random order."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * (torch.randperm(c, generator=gen).float() + 0.5) / c


@torch.no_grad()
def _apply(group: FoldGroup, s: torch.Tensor) -> None:
    p, rows, s = group.producer, group.rows, s.float()
    if isinstance(p, LINEAR_TYPES):
        w = linear_weight(p)  # (out, in) view
        w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
        if p.bias is not None:
            p.bias[rows] = (p.bias[rows].float() / s).to(p.bias.dtype)
    else:
        w, one = p.weight, 1.0 if group.plus_one else 0.0
        w[rows] = ((w[rows].float() + one) / s - one).to(w.dtype)
        if getattr(p, "bias", None) is not None:
            p.bias[rows] = (p.bias[rows].float() / s).to(p.bias.dtype)
    for _, m in group.consumers:
        for w in consumer_weights(m):  # (N, K) views
            w.copy_((w.float() * s[None, :]).to(w.dtype))


def fold_scales_(group: FoldGroup, s: torch.Tensor) -> None:
    """Producer output channels `rows` / s, consumer input channels * s (s: (K,) positive), in place."""
    _apply(group, s)


def _holds(group: FoldGroup, call, x: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether folding random scales into the float32 copy keeps its output; the copy is restored after."""
    saved = [t.detach().clone() for t in _touched(group)]
    try:
        _apply(group, _factors(group.channels, seed=1))
        got = call(x)
        return bool((got - want).norm() <= OUTPUT_TOL * want.norm())
    finally:
        with torch.no_grad():
            for t, v in zip(_touched(group), saved, strict=True):
                t.copy_(v)


def _touched(group: FoldGroup) -> list[torch.Tensor]:
    p = group.producer
    tensors = [p.weight] + ([p.bias] if getattr(p, "bias", None) is not None else [])
    return tensors + [w for _, m in group.consumers for w in consumer_weights(m)]


@torch.no_grad()
def discover_folds(block: nn.Module, x: torch.Tensor, call) -> tuple[list[FoldGroup], dict[str, str]]:
    """The folds that hold in `block` (on its own modules) and {fold: why it was dropped} for those that do not.

    x: a block input (1, T, H); call: the block's BlockCall. Probes run on a float32 copy (module docstring).
    """
    copy, fcall = call.float32()
    xf = x.float()
    producers, consumers = _candidates(copy)
    real = dict(block.named_modules())
    base = record_inputs(fcall, xf, consumers)
    want = fcall(xf)
    groups, dropped, claimed = [], {}, set()
    for i, (pname, p) in enumerate(producers.items()):
        for part in _parts(p, consumers):
            found = _consumers_of(pname, p, part, consumers, fcall, xf, base, dropped, seed=100 + i)
            if not found:
                continue
            group = _checked_group(pname, p, found, consumers, claimed, dropped, fcall, xf, want)
            if group is not None:
                groups.append(FoldGroup(pname, real[pname], group.rows, [(c, real[c]) for c in found], group.plus_one))
                claimed.update(found)
                break
    folded = {g.producer_name for g in groups}  # a producer folded through another part of its output
    return groups, {label: why for label, why in dropped.items() if label.split(" -> ")[0] not in folded}


def _consumers_of(pname, p, part, consumers, call, x, base, dropped, seed) -> dict[str, torch.Tensor]:
    """{consumer: the producer channels it reads} when channels `part` of the producer's output are scaled."""
    s = torch.ones(_out_channels(p))
    s[part] = _factors(part.stop - part.start, seed)
    with edited_output(p, lambda y: y * s.to(y.dtype)):
        new = record_inputs(call, x, consumers)
    found = {}
    for cname, inp in new.items():
        if cname == pname or cname not in base or torch.equal(inp, base[cname]):
            continue
        r = channel_ratios(base[cname], inp)
        if r is None:
            continue  # reached through something that is not per-channel linear: not a consumer
        rows, why = _match_rows(r, s, part)
        if rows is None:
            dropped[f"{pname} -> {cname}"] = why
        else:
            found[cname] = rows
    return found


def _checked_group(pname, p, found, consumers, claimed, dropped, call, x, want) -> FoldGroup | None:
    """The fold of `found` if it keeps the block's output (as a 1 + w norm if need be), else None (and why)."""
    label = f"{pname} -> {', '.join(found)}"
    first = next(iter(found.values()))
    if any(c in claimed for c in found):
        dropped[label] = "its consumers already take scales from an earlier producer"
        return None
    if any(not torch.equal(rows, first) for rows in found.values()):
        dropped[label] = "its consumers read different channels of it"
        return None
    group = FoldGroup(pname, p, first, [(c, consumers[c]) for c in found])
    for plus_one in (False, True) if _is_norm(p) else (False,):
        group.plus_one = plus_one
        if _holds(group, call, x, want):
            return group
    dropped[label] = (
        "folding changes the block's output: the producer also feeds something that cannot take the scales "
        "(e.g. the residual stream)"
    )
    return None


def scaled_layers(group: FoldGroup) -> list[str]:
    """Names of the linear layers whose weights take the group's scales (an experts module: every expert's first
    projection)."""
    names = []
    for name, m in group.consumers:
        if isinstance(m, ExpertLinears):
            names += [f"{name}.experts.{e}.{m.up_name}" for e in range(m.num_experts)]
        else:
            names.append(name)
    return names


def unfolded(names, groups: list[FoldGroup], dropped: dict[str, str]) -> dict[str, str]:
    """{layer name: why no scales were folded into it} for the names not covered by `groups`."""
    covered = {name for g in groups for name in scaled_layers(g)}
    reasons = {}
    for label, why in dropped.items():
        for consumer in label.split(" -> ", 1)[1].split(", "):
            reasons.setdefault(consumer, f"{label}: {why}")
    return {name: _reason(name, reasons) for name in names if name not in covered}


def _reason(name: str, reasons: dict[str, str]) -> str:
    for consumer, why in reasons.items():
        if name == consumer or name.startswith(f"{consumer}."):
            return why
    return NO_PRODUCER
