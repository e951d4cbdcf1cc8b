"""Where the structured parts of a transformer block live (MLP channels, attention heads), discovered by probing.

Nothing is listed per family. The first block runs on a few random tokens (in float32), once as it is and once
per sampled output channel of each linear layer with that channel changed; which input channels of the other
linear layers then change tells how they connect:
- the MLP: a layer whose input channel j changes only when channel j (of each stacked chunk, for a fused
  gate_up) of its producers changes: those producers are `mlp_in`, the layer `mlp_out`;
- attention: a layer (`attn_out`) whose producers change whole heads of its input: query and key channels
  change head_dim (or a group of heads') channels, value channels change single channels. Their order and
  head_dim follow; a fused projection must be laid out [q | k | v] to have its heads removed.
Which config attribute sets the MLP width, and whether the attention reads head counts and head_dim from the
config, is checked by building the model on the meta device with the changed config.

>>> import miaotui
>>> lm = miaotui.load("path/to/llama")  # doctest: +SKIP
>>> discover_layout(lm.model, lm.arch.blocks)  # doctest: +SKIP
Layout(attn_out='self_attn.o_proj', mlp_in=('mlp.gate_proj', 'mlp.up_proj'), mlp_out='mlp.down_proj', ...)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from miaotui.calibration import probe_block
from miaotui.experts import ExpertLinears, fused_experts
from miaotui.modules import LINEAR_TYPES, linear_weight
from miaotui.probing import changed_channels, edited_output, record_inputs
from miaotui.quantize import PackedLinear

SAMPLES = 4  # output channels probed per linear layer


@dataclass
class Layout:
    """Where the structured parts of one transformer block live (dotted paths inside the block).

    qkv: the query, key and value projections, or one fused projection laid out [q | k | v]; empty when heads
        cannot be removed (`problems["heads"]` says why). attn_out: the attention output projection.
    mlp_in: the projections producing the MLP channels, `mlp_chunks` of them stacked in each (a fused gate_up: 2);
        mlp_out: the projection consuming them; mlp_size: the config attribute holding their number.
    problems: {"mlp" | "heads": why that part cannot be slimmed}.
    """

    attn_out: str | None = None
    mlp_in: tuple[str, ...] = ()
    mlp_out: str | None = None
    qkv: tuple[str, ...] = ()
    mlp_size: str | None = None
    mlp_chunks: int = 1
    head_dim: int | None = None
    problems: dict[str, str] = field(default_factory=dict)


def _edit(c: int):
    def edit(y: torch.Tensor) -> torch.Tensor:
        y = y.clone()
        y[..., c] = y[..., c] * 1.5 + 0.1
        return y

    return edit


class _Probe:
    """A float32 copy of a block with a probe input: which consumer channels change with one producer channel."""

    def __init__(self, block: nn.Module, x: torch.Tensor, call):
        self.block, self.call = call.float32()
        self.x = x.float()
        inside = {
            id(m) for e in self.block.modules() if isinstance(e, ExpertLinears) for m in e.modules() if m is not e
        }
        self.linears = {
            n: m
            for n, m in self.block.named_modules()
            if isinstance(m, LINEAR_TYPES + (PackedLinear,)) and id(m) not in inside
        }
        self.base = record_inputs(self.call, self.x, self.linears)

    @torch.no_grad()
    def changes(self, producer: str, c: int) -> dict[str, torch.Tensor]:
        """{consumer: its input channels that change when output channel c of `producer` does}, local effects
        only (not one spread over every channel through the residual stream)."""
        with edited_output(self.linears[producer], _edit(c)):
            new = record_inputs(self.call, self.x, self.linears)
        out = {}
        for name, inp in new.items():
            if name != producer and name in self.base:
                ch = changed_channels(self.base[name], inp)
                if _local(ch, inp.shape[1]):
                    out[name] = ch
        return out

    def dependencies(self) -> dict[tuple[str, str], list]:
        """{(producer, consumer): [(channel, consumer channels it changes)]} for SAMPLES channels of each linear."""
        deps: dict[tuple[str, str], list] = {}
        for name, m in self.linears.items():
            out = out_features(m)
            for c in sorted({0, out // 3, 2 * out // 3 + 1, out - 1} & set(range(out))):
                for consumer, ch in self.changes(name, c).items():
                    deps.setdefault((name, consumer), []).append((c, ch))
        return deps


def _local(ch: torch.Tensor, width: int) -> bool:
    """Whether a change reached a consumer locally: one channel, a block of them (a head), or evenly spaced ones (a
    value channel read by a group of heads), not every channel nor a scatter (a change spread through the
    residual stream and a ReLU's or GELU's zeros)."""
    if not 0 < len(ch) < width:
        return False
    steps = ch[1:] - ch[:-1]
    return len(ch) == 1 or bool((steps == steps[0]).all())


def out_features(m: nn.Module) -> int:
    """Output features of a float or packed linear layer."""
    return m.out_features if isinstance(m, PackedLinear) else linear_weight(m).shape[0]


def in_features(m: nn.Module) -> int:
    """Input features of a float or packed linear layer."""
    return m.in_features if isinstance(m, PackedLinear) else linear_weight(m).shape[1]


def _is_channelwise(samples: list, out: int, k: int) -> bool:
    return (
        out % k == 0
        and len(samples) >= min(SAMPLES - 1, out)
        and all(len(ch) == 1 and int(ch[0]) == c % k for c, ch in samples)
    )


def _contiguous(ch: torch.Tensor) -> bool:
    return len(ch) > 1 and int(ch[-1] - ch[0]) == len(ch) - 1


def discover_layout(model: nn.Module, blocks_path: str) -> Layout:
    """The Layout of the model's first block (module docstring); `problems` says what cannot be slimmed."""
    blocks = model.get_submodule(blocks_path)
    probe = _Probe(blocks[0], *probe_block(model, blocks[0]))
    linears, deps = probe.linears, probe.dependencies()
    layout = Layout()
    consumers = {c for _, c in deps}
    for c in sorted(consumers, key=list(linears).index):
        k = in_features(linears[c])
        producers = {p: s for (p, cc), s in deps.items() if cc == c}
        channel = [p for p, s in producers.items() if _is_channelwise(s, out_features(linears[p]), k)]
        if channel and len(channel) == len(producers) and layout.mlp_out is None:
            layout.mlp_out, layout.mlp_in = c, tuple(channel)
            layout.mlp_chunks = out_features(linears[channel[0]]) // k
        elif any(_contiguous(ch) for s in producers.values() for _, ch in s) and layout.attn_out is None:
            layout.attn_out = c
            _attention(layout, producers, probe, model.config)
    if fused_experts(blocks[0]) or any(isinstance(m, ExpertLinears) for m in blocks[0].modules()):
        layout.problems["mlp"] = (
            "a mixture-of-experts block: its experts are not split by channels (slim removes whole experts: `experts`)"
        )
    elif layout.mlp_out is None:
        layout.problems["mlp"] = "no MLP found (no layer whose input channels each come from one producer channel)"
    else:
        layout.mlp_size = _width_attr(model, blocks_path, layout)
        if layout.mlp_size is None:
            layout.problems["mlp"] = "no config attribute sets the MLP width"
    if layout.attn_out is None:
        layout.problems.setdefault("heads", "no attention output projection found")
    elif layout.qkv and not _heads_follow_config(model, blocks_path, layout):
        layout.qkv = ()
        layout.problems["heads"] = "the attention does not take its head counts and head_dim from the config"
    return layout


def _attention(layout: Layout, producers: dict, probe: _Probe, config) -> None:
    """Fill qkv and head_dim from the producers of the attention output projection, or say why not."""
    linears = probe.linears
    d = layout.head_dim = min(len(ch) for s in producers.values() for _, ch in s if _contiguous(ch))
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    names = sorted(producers, key=list(linears).index)
    if not heads or in_features(linears[layout.attn_out]) != heads * d:
        layout.problems["heads"] = f"the attention output is not laid out as {heads} heads of {d} channels"
        return
    if len(names) == 1:  # fused: the first channel of q, k and v must act as a query, a key and a value
        starts = {0: d, heads * d: d * heads // kv, (heads + kv) * d: None}
        if all(_acts_as(probe.changes(names[0], c).get(layout.attn_out), size) for c, size in starts.items()):
            layout.qkv = (names[0],)
        else:
            layout.problems["heads"] = f"the fused projection {names[0]} is not laid out as [q | k | v]"
        return
    values = [n for n in names if not any(_contiguous(ch) for _, ch in producers[n])]
    keys_queries = [n for n in names if n not in values]
    if len(values) == 1 and len(keys_queries) == 2:
        q = next((n for n in keys_queries if out_features(linears[n]) == heads * d), keys_queries[0])
        layout.qkv = (q, next(n for n in keys_queries if n != q), values[0])
    else:
        layout.problems["heads"] = f"expected query, key and value projections, found {', '.join(names)}"


def _acts_as(changed: torch.Tensor | None, block: int | None) -> bool:
    """Whether a channel changes `block` contiguous attention-output channels (block None: acts as a value)."""
    if changed is None:
        return False
    return not _contiguous(changed) if block is None else (_contiguous(changed) and len(changed) == block)


def rebuilt_blocks(model: nn.Module, blocks_path: str, changes: dict) -> nn.ModuleList | None:
    """The model's blocks rebuilt on the meta device from its (text) config with `changes`, or None if that fails."""
    try:
        config = copy.deepcopy(model.config)
        text = config.get_text_config()
        for name, value in changes.items():
            setattr(text, name, value)
        with torch.device("meta"):
            rebuilt = type(model)(config)
        return rebuilt.get_submodule(blocks_path)
    except Exception:  # any failure means this config change does not describe the model
        return None


def _rebuilt_block(model: nn.Module, blocks_path: str, changes: dict) -> nn.Module | None:
    """Block 0 of the model rebuilt from its config with `changes`, or None."""
    blocks = rebuilt_blocks(model, blocks_path, changes)
    return None if blocks is None else blocks[0]


def _width_attr(model: nn.Module, blocks_path: str, layout: Layout) -> str | None:
    """The config attribute that sets the MLP width: the one whose change the rebuilt model's shapes follow."""
    block = model.get_submodule(blocks_path)[0]
    width = in_features(block.get_submodule(layout.mlp_out))
    text = model.config.get_text_config()
    names = [n for n, v in vars(text).items() if v == width and not isinstance(v, bool)]
    names += [n for n, v in vars(text).items() if v is None]
    for name in names:
        rebuilt = _rebuilt_block(model, blocks_path, {name: width - 8})
        if rebuilt is not None and in_features(rebuilt.get_submodule(layout.mlp_out)) == width - 8:
            return name
    return None


def _heads_follow_config(model: nn.Module, blocks_path: str, layout: Layout) -> bool:
    """Whether halving the query heads in the config (head_dim given) gives the rebuilt attention that shape."""
    text = model.config.get_text_config()
    heads, d = text.num_attention_heads, layout.head_dim
    kv = getattr(text, "num_key_value_heads", None)
    if heads % 2:
        return True  # nothing to check with: the plan refuses odd splits itself
    changes = {"num_attention_heads": heads // 2, "head_dim": d}
    if kv == heads:
        changes["num_key_value_heads"] = heads // 2
    rebuilt = _rebuilt_block(model, blocks_path, changes)
    return rebuilt is not None and in_features(rebuilt.get_submodule(layout.attn_out)) == heads // 2 * d
