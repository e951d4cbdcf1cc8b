"""Expert slimming: remove the experts the router uses least, for a smaller mixture of experts.

Routing is counted on calibration text (tokens routed to each expert, per experts module); every experts module
keeps its most used experts, in their order. The experts' weights, the router's rows for them (weight, bias and
any per-expert correction), the expert counts the modules and the config hold all shrink, so the result is a
plain Hugging Face model of the same family with fewer experts. Which config attribute holds the expert count is
found by rebuilding the model on the meta device from the changed config; a family whose rebuilt model does not
take the new count (or whose routing constraints it breaks: grouped routing over a count that no longer divides)
is refused before anything changes.

>>> import miaotui
>>> lm = miaotui.load("path/to/moe")  # doctest: +SKIP
>>> slim_experts_(lm, 0.5, calibration_ids)["experts"]  # doctest: +SKIP
[8, 4]
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from miaotui.calibration import blocks_of
from miaotui.errors import MiaotuiError
from miaotui.experts import ExpertLinears, expert_modules, num_experts, routing_layers
from miaotui.loading import LoadedModel
from miaotui.quantize import PackedLinear


def _count_attrs(obj, count: int) -> list[str]:
    """Names of `obj`'s int attributes about experts (their name says so) equal to `count`."""
    return [
        n
        for n, v in vars(obj).items()
        if "expert" in n and isinstance(v, int) and not isinstance(v, bool) and v == count
    ]


def plan_experts(lm: LoadedModel, fraction: float) -> tuple[int, int, list[str]]:
    """(experts, experts kept, config attributes to change), or a MiaotuiError saying why it cannot be done."""
    modules = expert_modules(lm.model)
    if not modules:
        raise MiaotuiError("slim: experts needs a mixture-of-experts model; this one has no experts")
    for name, m in modules:
        if any(isinstance(x, PackedLinear) for x in m.modules()):
            raise MiaotuiError(f"slim: {name} is quantized; slim before quantizing")
    total = num_experts(modules[0][1])
    keep = total - round(fraction * total)
    if not 0 < keep < total:
        raise MiaotuiError(f"slim: experts {fraction} removes {total - keep} of {total} experts; keep at least one")
    text = lm.config.get_text_config()
    attrs = _count_attrs(text, total)
    if not attrs or not _rebuilds(lm.model, {a: keep for a in attrs}, keep):
        raise MiaotuiError(
            f"slim: this {lm.arch.model_type} cannot be rebuilt with {keep} experts (its config holds the count in "
            f"{', '.join(attrs) or 'no attribute miaotui can find'}, or its routing needs more)"
        )
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        if isinstance(getattr(text, name, None), int) and getattr(text, name) > keep:
            raise MiaotuiError(f"slim: tokens are routed to {getattr(text, name)} experts; keep at least that many")
    return total, keep, attrs


def _rebuilds(model: nn.Module, changes: dict, keep: int) -> bool:
    """Whether the model, rebuilt on the meta device from its config with `changes`, has `keep` experts."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    for name, value in changes.items():
        setattr(text, name, value)
    try:
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception:  # any failure means the config does not describe a model with that many experts
        return False
    return all(num_experts(m) == keep for _, m in expert_modules(rebuilt))


@torch.no_grad()
def routed_counts(lm: LoadedModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert on token ids (S, T): {experts module name: (E,) counts}."""
    counts: dict[str, torch.Tensor] = {}

    def hook(name, e):
        def count(module, args):
            if len(args) >= 2:  # routed: (hidden, top_k_index, top_k_weights)
                idx = args[1].flatten()
                counts[name] += torch.bincount(idx[idx < e].cpu(), minlength=e)[:e]
            else:  # dense: (E*T, H), zero rows where a token is not routed
                counts[name] += (args[0].reshape(e, -1, args[0].shape[-1]).abs().amax(-1) > 0).sum(1).cpu()

        return count

    handles = []
    for name, m in expert_modules(lm.model):
        e = num_experts(m)
        counts[name] = torch.zeros(e, dtype=torch.long)
        handles.append(m.register_forward_pre_hook(hook(name, e)))
    try:
        for row in ids:
            lm.model(input_ids=row[None].to(lm.device))
    finally:
        for h in handles:
            h.remove()
    return counts


def _take(t: torch.Tensor, keep: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().index_select(0, keep.to(t.device)).contiguous(), requires_grad=t.requires_grad)


def _slim_module(module: nn.Module, keep: torch.Tensor, total: int) -> None:
    """Keep experts `keep` of one experts module (fused 3-D weights, or ExpertLinears)."""
    if isinstance(module, ExpertLinears):
        module.experts = nn.ModuleList(module.experts[i] for i in keep.tolist())
        module.num_experts = len(keep)
        return
    for name, p in list(module._parameters.items()):
        if p is not None and p.shape[0] == total:
            setattr(module, name, _take(p, keep))
    for name in _count_attrs(module, total):
        setattr(module, name, len(keep))


def _slim_routers(model: nn.Module, prefix: str, keep: torch.Tensor, total: int) -> None:
    """The routers beside experts module `prefix`: their rows (and per-expert biases) for the kept experts."""
    parent_name = prefix.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    for name in _count_attrs(parent, total):
        setattr(parent, name, len(keep))
    for router_name in routing_layers(parent):
        router = parent.get_submodule(router_name)
        if router.weight.shape[0] != total:
            continue  # a shared expert's (1, H) gate
        for name, p in list(router.named_parameters(recurse=False)) + list(router.named_buffers(recurse=False)):
            if p.shape[0] == total:
                new = _take(p, keep) if isinstance(p, nn.Parameter) else p.index_select(0, keep.to(p.device))
                setattr(router, name, new)
        for name in _count_attrs(router, total):
            setattr(router, name, len(keep))
        if isinstance(router, nn.Linear):
            router.out_features = len(keep)


@torch.no_grad()
def slim_experts_(lm: LoadedModel, fraction: float, ids: torch.Tensor) -> dict:
    """Remove `fraction` of every experts module's experts, the least routed on token ids (S, T); returns a
    summary (expert counts, parameters, the experts kept and their routed tokens per module)."""
    total, keep_n, attrs = plan_experts(lm, fraction)
    before = sum(p.numel() for p in lm.model.parameters())
    counts = routed_counts(lm, ids)
    kept = {}
    for name, module in expert_modules(lm.model):
        keep = counts[name].topk(keep_n).indices.sort().values  # (E',) most used, in order
        _slim_module(module, keep, total)
        _slim_routers(lm.model, name, keep, total)
        kept[name] = keep.tolist()
    text = lm.config.get_text_config()
    for name in attrs:
        setattr(text, name, keep_n)
    blocks_of(lm)  # the model is still whole
    share = {n: round(c[kept[n]].sum().item() / max(c.sum().item(), 1), 4) for n, c in counts.items()}
    return {
        "experts": [total, keep_n],
        "parameters": [before, sum(p.numel() for p in lm.model.parameters())],
        "kept": kept,
        "routed_share_kept": share,  # fraction of the calibration routing that went to the kept experts
    }
