"""Structured slimming: remove MLP channels, attention heads, whole blocks and experts; the result is a smaller
model of the same family.

The same number of channels and heads go from every block, so the model stays a plain Hugging Face model whose
config (intermediate size, head counts, explicit head_dim, number of layers and per-layer types) says its new
shapes. What goes is chosen from one calibration pass (miaotui.sparsity.importance).

>>> SlimConfig(mlp=0.25).needs_calibration
True
>>> SlimConfig(heads=1.0)
Traceback (most recent call last):
...
ValueError: slim: heads must be a fraction in [0, 1), got 1.0
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.errors import MiaotuiError
from miaotui.recipe import StepConfig, register_step

HEAD_UNITS = ("query", "group")  # query: the same number of query heads from each KV group; group: whole KV groups


@register_step("slim")
@dataclass(frozen=True)
class SlimConfig(StepConfig):
    """Remove a fraction `mlp` of every block's MLP channels, a fraction `heads` of its attention heads (by
    `head_unit`), the `blocks` least important whole blocks, and a fraction `experts` of every mixture-of-experts
    block's experts (the least routed: `miaotui.sparsity.expert_slim`). MLP sizes are rounded to a multiple of
    `round_to` (8 keeps the int8/int4 kernels usable after slimming).

    >>> SlimConfig(blocks=1, mlp=0.125).to_dict()["blocks"]
    1
    """

    mlp: float = 0.0
    heads: float = 0.0
    head_unit: str = "query"
    blocks: int = 0
    round_to: int = 8
    experts: float = 0.0

    def __post_init__(self):
        for name in ("mlp", "heads", "experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"slim: {name} must be a fraction in [0, 1), got {value!r}")
        if self.head_unit not in HEAD_UNITS:
            raise ValueError(f"slim: head_unit {self.head_unit!r} is not supported; choose one of query, group")
        for name in ("blocks", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "round_to"):
                raise ValueError(f"slim: {name} must be a whole number >= {int(name == 'round_to')}, got {value!r}")
        if not (self.mlp or self.heads or self.blocks or self.experts):
            raise ValueError("slim: nothing to remove; set mlp, heads, experts (fractions) or blocks (a count)")

    @property
    def needs_calibration(self) -> bool:
        return True

    def apply(self, lm, *, calibration=None, teacher=None, progress: bool | None = None) -> dict:
        from miaotui.sparsity.expert_slim import plan_experts, slim_experts_

        if calibration is None:
            raise ValueError("slim: importance is measured on calibration text (--calib FILE)")
        rest = self.mlp or self.heads or self.blocks
        if self.experts:  # refuse impossible shapes before tokenizing anything
            plan_experts(lm, self.experts)
        plan = plan_slim(lm, self) if rest else None
        ids = calibration.token_ids(lm)
        summary = {"experts": slim_experts_(lm, self.experts, ids)} if self.experts else {}
        return {**(slim_(lm, self, ids, plan=plan, progress=progress) if rest else {}), **summary}


def _layout(lm):
    from miaotui.sparsity.layout import discover_layout

    return discover_layout(lm.model, lm.arch.blocks)


def plan_slim(lm, cfg: SlimConfig) -> dict:
    """The new sizes, checked against the model's shapes: a MiaotuiError for anything impossible.

    Returns {"blocks": (L, L'), "mlp": (I, I') or None, "heads": (H, KV, H', KV', head_dim) or None}.
    """
    from miaotui.calibration import blocks_of
    from miaotui.modules import LINEAR_TYPES, linear_weight
    from miaotui.quantize import PackedLinear

    blocks = blocks_of(lm)
    for name, m in blocks[0].named_modules():
        if isinstance(m, PackedLinear):
            raise MiaotuiError(f"slim: {name} is a {type(m).__name__}, not a float linear; slim before quantizing")
    config, kind = lm.config, lm.arch.model_type
    from miaotui.sparsity.layout import Layout

    layout = _layout(lm) if cfg.mlp or cfg.heads else Layout()  # dropping blocks needs no layout
    for part, asked in (("mlp", cfg.mlp), ("heads", cfg.heads)):
        if asked and part in layout.problems:
            raise MiaotuiError(f"slim: the {part} of this {kind} cannot be slimmed: {layout.problems[part]}")
    paths = (*layout.mlp_in, layout.mlp_out) if cfg.mlp else ()
    paths += (layout.attn_out, *layout.qkv) if cfg.heads else ()
    for path in paths:
        m = blocks[0].get_submodule(path)
        if not isinstance(m, LINEAR_TYPES):
            raise MiaotuiError(f"slim: {path} is a {type(m).__name__}, not a float linear; slim before quantizing")
    _check_alike(blocks, paths, kind)
    plan: dict = {"blocks": (len(blocks), len(blocks) - cfg.blocks), "mlp": None, "heads": None, "layout": layout}
    if cfg.blocks >= len(blocks):
        raise MiaotuiError(f"slim: removing {cfg.blocks} blocks of {len(blocks)} leaves none")
    if cfg.blocks and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise MiaotuiError(f"slim: this {kind} scales attention by 1/layer index; dropping blocks would change it")
    if cfg.mlp:
        size = linear_weight(blocks[0].get_submodule(layout.mlp_out)).shape[1]
        keep = max(cfg.round_to, round((size - round(cfg.mlp * size)) / cfg.round_to) * cfg.round_to)
        if keep >= size:
            raise MiaotuiError(
                f"slim: mlp {cfg.mlp} removes no channel of {size} (sizes are rounded to multiples of {cfg.round_to})"
            )
        plan["mlp"] = (size, keep)
    if cfg.heads:
        plan["heads"] = _plan_heads(lm, cfg, layout, blocks[0])
    return plan


def _check_alike(blocks, paths: tuple[str, ...], kind: str) -> None:
    """Refuse channel and head slimming when another block lacks block 0's layers of those paths or their shapes
    (e.g. dense blocks before mixture-of-experts ones): one config size would not describe them all."""
    from miaotui.modules import linear_weight

    shapes = {path: linear_weight(blocks[0].get_submodule(path)).shape for path in paths}
    for i, block in enumerate(blocks[1:], 1):
        for path, shape in shapes.items():
            try:
                other = linear_weight(block.get_submodule(path)).shape
            except AttributeError:
                other = None
            if other != shape:
                found = "has no such layer" if other is None else f"has {tuple(other)} there"
                raise MiaotuiError(
                    f"slim: block {i} of this {kind} is not laid out like block 0 ({path} is {tuple(shape)} in "
                    f"block 0; block {i} {found}): channels and heads are removed from blocks alike only; "
                    "`blocks` drops whole blocks, `experts` removes experts"
                )


def _plan_heads(lm, cfg: SlimConfig, layout, block) -> tuple[int, int, int, int, int]:
    from miaotui.modules import linear_weight

    kind = lm.arch.model_type
    heads = lm.config.num_attention_heads
    kv = getattr(lm.config, "num_key_value_heads", None) or heads
    head_dim = layout.head_dim
    if linear_weight(block.get_submodule(layout.attn_out)).shape[1] != heads * head_dim or heads % kv:
        raise MiaotuiError(f"slim: the attention of this {kind} is not laid out as {heads} heads of {head_dim}")
    group = heads // kv
    if cfg.head_unit == "group":
        drop = round(cfg.heads * kv)
        if not 0 < drop < kv:
            raise MiaotuiError(
                f"slim: heads {cfg.heads} with head_unit group removes {drop} of {kv} KV groups; "
                f"choose a fraction that removes between 1 and {kv - 1}"
            )
        return heads, kv, heads - drop * group, kv - drop, head_dim
    drop = round(cfg.heads * group)
    if not 0 < drop < group:
        hint = "; use head_unit: group" if group == 1 else ""
        raise MiaotuiError(
            f"slim: heads {cfg.heads} removes {drop} of the {group} query heads in each of the {kv} KV groups "
            f"(grouped-query layout); choose a fraction that removes between 1 and {group - 1}{hint}"
        )
    return heads, kv, heads - drop * kv, kv, head_dim


def slim_(lm, cfg: SlimConfig, ids, *, plan: dict | None = None, progress: bool | None = None) -> dict:
    """Slim `lm` in place, choosing what goes from calibration token ids (S, T); returns a summary.

    >>> from miaotui.calibration import Calibration
    >>> lm = miaotui.load("path/to/llama")  # doctest: +SKIP
    >>> slim_(lm, SlimConfig(mlp=0.25), Calibration(text).token_ids(lm))["parameters"]  # doctest: +SKIP
    """
    from miaotui.calibration import blocks_of
    from miaotui.modules import linear_weight
    from miaotui.sparsity.importance import channel_scores, choose_heads, measure_importance
    from miaotui.sparsity.surgery import drop_blocks_, slim_heads_, slim_mlp_

    plan = plan or plan_slim(lm, cfg)
    layout, config = plan["layout"], lm.config
    before = _parameters(lm.model)
    imp = measure_importance(lm, layout, ids, progress=progress)
    blocks = blocks_of(lm)
    drop = _blocks_to_drop(lm, imp.block_change.argsort().tolist(), cfg.blocks)
    for i, block in enumerate(blocks):
        if i in drop:
            continue
        if plan["mlp"]:
            size, keep = plan["mlp"]
            scores = channel_scores(imp.mlp_sumsq[i], linear_weight(block.get_submodule(layout.mlp_out)))  # (I,)
            slim_mlp_(block, layout, scores.topk(keep).indices.sort().values, size)
        if plan["heads"]:
            heads, kv, new_heads, new_kv, head_dim = plan["heads"]
            w = linear_weight(block.get_submodule(layout.attn_out))
            scores = channel_scores(imp.attn_sumsq[i], w).view(heads, head_dim).sum(1)  # (H,)
            q, k = choose_heads(scores, num_kv=kv, new_heads=new_heads, new_kv=new_kv)
            slim_heads_(block, layout, q, k, num_heads=heads, num_kv=kv, head_dim=head_dim)
    if drop:
        for name, value in _without_blocks(config, drop).items():
            setattr(config.get_text_config(), name, value)
        drop_blocks_(blocks, drop)
    if plan["mlp"]:
        setattr(config, layout.mlp_size, plan["mlp"][1])
    if plan["heads"]:
        config.head_dim = plan["heads"][4]  # explicit: it no longer follows from hidden_size / heads
        config.num_attention_heads, config.num_key_value_heads = plan["heads"][2:4]
    return {
        "parameters": [before, _parameters(lm.model)],
        "blocks": list(plan["blocks"]),
        "dropped_blocks": drop,
        "block_change": [round(v, 5) for v in imp.block_change.tolist()],
        "mlp_channels": list(plan["mlp"]) if plan["mlp"] else None,
        "heads": [list(plan["heads"][0:2]), list(plan["heads"][2:4])] if plan["heads"] else None,
    }


def _blocks_to_drop(lm, order: list[int], count: int) -> list[int]:
    """The first `count` blocks of `order` (least important first) whose removal the config can describe: the
    model rebuilt from the edited config has the kept blocks' parameters (a config fixing which layers are dense,
    e.g. DeepSeek's first_k_dense_replace, rules out dropping some blocks)."""
    from miaotui.calibration import blocks_of

    blocks, drop = blocks_of(lm), []
    for i in order:
        if len(drop) == count:
            break
        if _describable(lm, blocks, sorted([*drop, i])):
            drop.append(i)
    if len(drop) < count:
        raise MiaotuiError(
            f"slim: only {len(drop)} of the {count} blocks asked for can be dropped from this {lm.arch.model_type} "
            "with its config still describing the rest (its config fixes the layers' kinds)"
        )
    return sorted(drop)


def _without_blocks(config, drop: list[int]) -> dict:
    """The (text) config changes that remove the blocks `drop`: the layer count, and the per-layer types."""
    text = config.get_text_config()
    changes = {"num_hidden_layers": text.num_hidden_layers - len(drop)}
    if isinstance(getattr(text, "layer_types", None), list):
        changes["layer_types"] = [t for i, t in enumerate(text.layer_types) if i not in drop]
    return changes


def _describable(lm, blocks, drop: list[int]) -> bool:
    """Whether the config with blocks `drop` removed rebuilds (on the meta device) the remaining blocks' shapes."""
    from miaotui.sparsity.layout import rebuilt_blocks

    rebuilt = rebuilt_blocks(lm.model, lm.arch.blocks, _without_blocks(lm.config, drop))
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    if rebuilt is None or len(rebuilt) != len(kept):
        return False
    return all(_shapes(a) == _shapes(b) for a, b in zip(rebuilt, kept, strict=True))


def _shapes(block) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in block.named_parameters()]


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
