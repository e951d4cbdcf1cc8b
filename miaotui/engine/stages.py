"""Pipeline parallelism: each stage holds a contiguous run of blocks and passes hidden states to the next.

Stage s keeps blocks `stage_bounds(n, stages)[s]`; the blocks of other stages become pass-throughs holding no
weights. The first block of a stage (after the first) replaces its input by the hidden states received from the
previous stage, and the last block of a stage (before the last) sends its output on. Only the first stage keeps
the token embeddings and only the last the final norm's output head, so every rank runs the model's own forward
(rotary embeddings and masks included) and the stages run one after another: a pipeline for models that do not
fit, not for speed.

>>> stage_bounds(6, 4)
[(0, 2), (2, 4), (4, 5), (5, 6)]
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from miaotui.arch import ArchInfo
from miaotui.errors import MiaotuiError


def stage_bounds(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) block ranges, the first stages one block longer when they do not divide."""
    if stages > num_layers:
        raise MiaotuiError(f"--pp {stages}: the model has only {num_layers} blocks, fewer than the stages")
    size, extra = divmod(num_layers, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + size + (s < extra)
        bounds.append((start, end))
        start = end
    return bounds


class PassThrough(nn.Module):
    """A block owned by another stage: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class ReceiveInput(nn.Module):
    """The first block of a stage: runs on the hidden states received from rank `src`."""

    def __init__(self, block: nn.Module, src: int):
        super().__init__()
        self.block, self.src, self.group = block, src, None  # the group is bound once the ranks have met

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        received = torch.empty_like(hidden_states)  # (b, q, hidden)
        dist.recv(received, src=self.src, group=self.group)
        return self.block(received, *args, **kwargs)


class SendOutput(nn.Module):
    """The last block of a stage: sends its output (b, q, hidden) to rank `dst` as well as returning it."""

    def __init__(self, block: nn.Module, dst: int):
        super().__init__()
        self.block, self.dst, self.group = block, dst, None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.block(*args, **kwargs)  # (b, q, hidden)
        dist.send(out.contiguous(), dst=self.dst, group=self.group)
        return out


class ZeroEmbedding(nn.Module):
    """Token embeddings of a later stage: zeros of the right shape (its first block receives the real ones)."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.hidden, self.dtype = hidden, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.hidden, dtype=self.dtype, device=ids.device)  # (b, q, hidden)


class NoHead(nn.Module):
    """The output head of an earlier stage: zeros of the logits' shape (the last stage computes them)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.vocab)  # (b, q, V)


def split_stages_(
    model: nn.Module, arch: ArchInfo, stage: int, stages: int, prev_rank: int | None, next_rank: int | None
) -> tuple[int, int]:
    """Keep only stage `stage`'s blocks of `model`, wired to the ranks before and after it; returns its bounds."""
    blocks = model.get_submodule(arch.blocks)
    start, end = stage_bounds(len(blocks), stages)[stage]
    for i in range(len(blocks)):
        if not start <= i < end:
            blocks[i] = PassThrough()
    if stage > 0:
        blocks[start] = ReceiveInput(blocks[start], prev_rank)
        emb = model.get_input_embeddings()
        model.set_input_embeddings(ZeroEmbedding(emb.embedding_dim, emb.weight.dtype))
    if stage < stages - 1:
        blocks[end - 1] = SendOutput(blocks[end - 1], next_rank)
        model.set_output_embeddings(NoHead(model.config.get_text_config().vocab_size))
    return start, end
