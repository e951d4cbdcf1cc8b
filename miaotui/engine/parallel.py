"""Tensor parallelism: each rank holds a slice of every block's attention heads and MLP channels.

Megatron-style split of a decoder block over `tp` ranks, where the block's layout (`miaotui.sparsity.layout`,
discovered by probing) puts its parts:
- column-parallel (outputs split): q/k/v projections (whole heads per rank) and the MLP's input projections
  (its channels); fused projections take each rank's piece of every part ([q | k | v], [gate | up]);
- row-parallel (inputs split): the attention output and MLP output projections; their partial sums are added by
  one all-reduce each, so a block costs two all-reduces of (tokens, hidden) per forward.
Embeddings, norms and the LM head stay whole on every rank. Attention reshapes heads with -1 and the engine's
cache sizes itself from the first keys it sees, so a sharded block runs unchanged with H/tp query and Hkv/tp
key/value heads. Packed layers (int8, int4, int3) are split by their own `take`, codes with their scales and zeros;
a shard their kernels cannot run (int4 rows not a multiple of 16, input columns not whole groups) is refused.

>>> ParallelConfig(tp=2, pp=1).world_size
2
>>> check_tensor_parallel(lm.model, lm.arch, 4)  # doctest: +SKIP
Traceback (most recent call last):
miaotui.errors.MiaotuiError: --tp 4: the 6 attention heads do not split evenly over 4 ranks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from miaotui.arch import ArchInfo
from miaotui.errors import MiaotuiError
from miaotui.quantize import PackedLinear
from miaotui.sparsity.layout import Layout, discover_layout, in_features

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class ParallelConfig:
    """How to split a model over processes: `tp` ranks per pipeline stage, `pp` stages of contiguous blocks.

    backend: "gloo" (CPU), "nccl" (CUDA) or "auto" (nccl when the model runs on CUDA).
    timeout_s: a step's collective that waits longer than this fails the run (a rank died or hangs).
    start_timeout_s: how long the ranks may take to load their part of the model and meet.
    """

    tp: int = 1
    pp: int = 1
    backend: str = "auto"
    timeout_s: float = 120.0
    start_timeout_s: float = 600.0

    def __post_init__(self):
        if not isinstance(self.tp, int) or not isinstance(self.pp, int) or self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be positive integers, got tp={self.tp!r} pp={self.pp!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.timeout_s > 0 or not self.start_timeout_s > 0:
            raise ValueError(f"timeouts must be > 0, got {self.timeout_s!r} and {self.start_timeout_s!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def _heads(config, layout: Layout) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a decoder."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return heads, kv, layout.head_dim


def _blocks(model: nn.Module, arch: ArchInfo) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)


def _plan(model: nn.Module, arch: ArchInfo, layout: Layout, rank: int, tp: int) -> dict[str, tuple[int, torch.Tensor]]:
    """Block-relative linear name -> (dim, feature indices) this rank keeps: dim 0 outputs, dim 1 inputs."""
    heads, kv, d = _heads(model.config, layout)
    inter = in_features(_blocks(model, arch)[0].get_submodule(layout.mlp_out))
    q = torch.arange(heads * d).view(tp, -1)[rank]  # this rank's query heads, (heads/tp * d,)
    k = torch.arange(kv * d).view(tp, -1)[rank]
    mlp = torch.arange(inter).view(tp, -1)[rank]
    if len(layout.qkv) == 1:  # fused [q | k | v]
        cols = {layout.qkv[0]: torch.cat([q, heads * d + k, (heads + kv) * d + k])}
    else:
        cols = dict(zip(layout.qkv, (q, k, k), strict=True))
    cols.update({name: torch.cat([mlp + c * inter for c in range(layout.mlp_chunks)]) for name in layout.mlp_in})
    plan = {name: (0, index) for name, index in cols.items()}
    plan[layout.attn_out] = (1, q)
    plan[layout.mlp_out] = (1, mlp)
    return plan


def _layout_problems(model: nn.Module, arch: ArchInfo) -> tuple[Layout | None, list[str]]:
    if arch.kind != "causal-lm":
        return None, ["tensor parallelism runs decoders (causal LMs)"]
    layout = discover_layout(model, arch.blocks)
    problems = [f"its {part} cannot be split: {why}" for part, why in layout.problems.items()]
    if not problems and not layout.qkv:
        problems.append("its attention projections were not found")
    return layout, problems


def tensor_parallel_problems(model: nn.Module, arch: ArchInfo, tp: int) -> list[str]:
    """Why `model` cannot be split over `tp` ranks (empty when it can): layout, heads, widths, packed shards."""
    if tp == 1:
        return []
    layout, problems = _layout_problems(model, arch)
    if problems:
        return problems
    heads, kv, _ = _heads(model.config, layout)
    inter = in_features(_blocks(model, arch)[0].get_submodule(layout.mlp_out))
    if heads % tp:
        problems.append(f"the {heads} attention heads do not split evenly over {tp} ranks")
    if kv % tp:
        problems.append(f"the {kv} key/value heads do not split evenly over {tp} ranks")
    if inter % tp:
        problems.append(f"the MLP's {inter} channels do not split evenly over {tp} ranks")
    if problems:
        return problems
    plan = _plan(model, arch, layout, 0, tp)
    for i, block in enumerate(_blocks(model, arch)):
        for name, (dim, index) in plan.items():
            layer = block.get_submodule(name)
            if isinstance(layer, PackedLinear):
                try:
                    layer.take(dim, index)
                except ValueError as e:
                    where = "outputs" if dim == 0 else "inputs"
                    problems.append(f"layer {arch.blocks}.{i}.{name} split by {where}: {e}")
            elif not isinstance(layer, nn.Linear):
                problems.append(f"layer {arch.blocks}.{i}.{name} is a {type(layer).__name__}, which cannot be split")
    return problems


def check_tensor_parallel(model: nn.Module, arch: ArchInfo, tp: int) -> None:
    """Raise a MiaotuiError listing every reason `model` cannot be split over `tp` ranks."""
    problems = tensor_parallel_problems(model, arch, tp)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise MiaotuiError(f"--tp {tp}: {shown}")


def _take_linear(layer: nn.Module, dim: int, index: torch.Tensor, keep_bias: bool) -> nn.Module:
    if isinstance(layer, PackedLinear):
        piece = layer.take(dim, index)
    else:
        w = layer.weight.index_select(dim, index)  # (n, k)
        piece = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        piece.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        if layer.bias is not None:
            bias = layer.bias[index] if dim == 0 else layer.bias
            piece.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    if not keep_bias:
        piece.bias = None
    return piece


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial product, summed over the tensor-parallel group in place."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner, self.group = inner, group  # the group is bound once the ranks have met

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (..., hidden), this rank's share
        dist.all_reduce(y, group=self.group)
        return y


class _LocalHeads:
    """A view of a config with this rank's head counts (Phi-3's attention reads them from its config)."""

    def __init__(self, config, heads: int, kv_heads: int):
        self._config, self.num_attention_heads, self.num_key_value_heads = config, heads, kv_heads

    def __getattr__(self, name):
        return getattr(self._config, name)


def shard_tensor_parallel_(model: nn.Module, arch: ArchInfo, rank: int, tp: int) -> None:
    """Replace every block's projections by the shard of tensor-parallel rank `rank`, in place (module doc).

    No communication happens here: the row-parallel layers all-reduce over the group later set as their
    `group` (None: the default group). Their bias is kept on rank 0 only, so the all-reduce adds it once.
    """
    check_tensor_parallel(model, arch, tp)
    layout = discover_layout(model, arch.blocks)
    heads, kv, _ = _heads(model.config, layout)
    plan = _plan(model, arch, layout, rank, tp)
    for block in _blocks(model, arch):
        for name, (dim, index) in plan.items():
            parent, _, leaf = name.rpartition(".")
            owner = block.get_submodule(parent)
            piece = _take_linear(getattr(owner, leaf), dim, index, keep_bias=dim == 0 or rank == 0)
            setattr(owner, leaf, piece if dim == 0 else RowParallel(piece))
        attn = block.get_submodule(layout.attn_out.rpartition(".")[0])
        if hasattr(attn, "config"):
            attn.config = _LocalHeads(attn.config, heads // tp, kv // tp)
        for name, value in (("num_heads", heads // tp), ("num_key_value_heads", kv // tp)):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)
