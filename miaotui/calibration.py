"""Calibration: feed text through a model block by block, with memory bounded by one block's activations.

`calibration_windows` cuts random token windows out of a text (the GPTQ protocol). `run_blockwise` captures the
inputs of the first transformer block, then for each block calls `fn(index, block, inputs, forward)` (where an
algorithm collects statistics and rewrites the block; `forward(x)` runs the block with the arguments the model
gave it) and feeds the block's new outputs to the next block.

>>> import torch
>>> ids = torch.arange(100)
>>> calibration_ids(ids, samples=3, seqlen=10, seed=0).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel
from miaotui.progress import track


@dataclass(frozen=True)
class Calibration:
    """Calibration data for the steps that need it: text, number of windows, tokens per window.

    >>> Calibration("some text", samples=4, seqlen=2).samples
    4
    """

    text: str
    samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self):
        if not self.text.strip():
            raise MiaotuiError("the calibration text is empty")
        if self.samples < 1 or self.seqlen < 2:
            raise MiaotuiError("calibration needs at least 1 sample of at least 2 tokens")

    def token_ids(self, lm: LoadedModel) -> torch.Tensor:
        """(samples, seqlen) token ids cut at random from the text."""
        return calibration_windows(lm, self.text, self.samples, self.seqlen, self.seed)


class _Captured(Exception):
    """Raised by the hook on the first block once its inputs are stored."""


def calibration_ids(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0, overlap: bool = False) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens from a 1-D token tensor: (S, seqlen).

    Unless `overlap` is allowed (training draws many windows from one text), the text must hold
    samples x seqlen tokens, so that calibration statistics do not rest on the same few tokens.
    """
    if len(ids) <= seqlen:
        raise MiaotuiError(f"calibration text has {len(ids)} tokens; need more than calib-seqlen {seqlen}")
    if not overlap and len(ids) < samples * seqlen:
        raise MiaotuiError(
            f"calibration text has {len(ids)} tokens, fewer than calib-samples x calib-seqlen = {samples} x {seqlen}"
            f" = {samples * seqlen}: the windows would repeat the same text; give a longer --calib file or fewer"
            " or shorter samples"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(
    lm: LoadedModel, text: str, samples: int = 128, seqlen: int = 512, seed: int = 0, overlap: bool = False
):
    """Tokenize `text` once and cut `samples` random windows: (S, seqlen) token ids."""
    if samples < 1 or seqlen < 2:
        raise MiaotuiError("calibration needs at least 1 sample of at least 2 tokens")
    context = lm.context_length
    if context is not None and seqlen > context:
        raise MiaotuiError(f"calib-seqlen {seqlen} is larger than the model's context of {context} tokens")
    ids = torch.tensor(lm.tokenizer(text)["input_ids"], dtype=torch.long)
    return calibration_ids(ids, samples, seqlen, seed, overlap)


def blocks_of(lm: LoadedModel) -> nn.ModuleList:
    """The model's list of transformer blocks (path from the architecture table, under any task head)."""
    for root in (lm.model, getattr(lm.model, lm.model.base_model_prefix, None)):
        if root is not None:
            try:
                return root.get_submodule(lm.arch.blocks)
            except AttributeError:
                continue
    raise MiaotuiError(f"cannot find the transformer blocks ({lm.arch.blocks}) of {type(lm.model).__name__}")


@torch.no_grad()
def run_blockwise(
    lm: LoadedModel,
    ids: torch.Tensor,
    fn: Callable[[int, nn.Module, list[torch.Tensor], Callable], None],
    *,
    progress: bool | None = None,
) -> None:
    """Call fn(index, block, inputs, forward) for each block in order.

    ids: (S, T). inputs: S tensors of (1, T, H) on the model's device, the block's hidden states per sample;
    forward(x): the block's output hidden states for x, called as the model calls it.
    """
    blocks = blocks_of(lm)
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}
    extra: list = []  # positional arguments after the hidden states, if the model passes any

    def grab(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        extra[:] = args[1:]
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in ids:
            with contextlib.suppress(_Captured):
                lm.model(input_ids=row[None].to(lm.device), use_cache=False)
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    for index, block in enumerate(track(list(blocks), "calibrating blocks", enabled=progress)):

        def forward(x: torch.Tensor, block=block) -> torch.Tensor:
            out = block(x, *extra, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        fn(index, block, inputs, forward)
        inputs = [forward(x) for x in inputs]


def observe_inputs(
    layers: dict, inputs: list[torch.Tensor], forward: Callable, fn: Callable[[object, torch.Tensor], None]
) -> None:
    """Run `forward` on each calibration input and call fn(key, x) with the input x (tokens, K) of each layer.

    layers: key -> module; the hooks are removed afterwards, even on error.

    >>> lin, seen = nn.Linear(3, 2), []
    >>> observe_inputs({"lin": lin}, [torch.ones(1, 4, 3)], lin, lambda k, x: seen.append((k, tuple(x.shape))))
    >>> seen
    [('lin', (4, 3))]
    """

    def hook(key):
        return lambda module, args, output: fn(key, args[0].reshape(-1, args[0].shape[-1]))  # (tokens, K)

    handles = [m.register_forward_hook(hook(key)) for key, m in layers.items()]
    try:
        for x in inputs:
            forward(x)
    finally:
        for h in handles:
            h.remove()


def accumulate_inputs(
    layers: dict[str, nn.Module],
    inputs: list[torch.Tensor],
    forward: Callable,
    stat: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Sum `stat(x)` over the calibration inputs x (tokens, K) of each layer, by running `forward` on each input.

    Returns (name -> summed statistic, name -> token count). For example `stat = lambda x: x.T @ x` gives
    the input Gram matrices of GPTQ and SparseGPT, `lambda x: x.pow(2).sum(0)` Wanda's squared input norms.

    >>> lin = nn.Linear(3, 2)
    >>> sums, counts = accumulate_inputs({"lin": lin}, [torch.ones(1, 4, 3)], lin, lambda x: x.sum(0))
    >>> sums["lin"].tolist(), counts["lin"]
    ([4.0, 4.0, 4.0], 4)
    """
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def accumulate(name, x):
        x = x.float()  # (tokens, K)
        s = stat(x)
        sums[name] = sums[name] + s if name in sums else s
        counts[name] += x.shape[0]

    observe_inputs(layers, inputs, forward, accumulate)
    return sums, counts
