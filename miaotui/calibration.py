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
import logging
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from miaotui.errors import MiaotuiError
from miaotui.experts import MIN_EXPERT_TOKENS, ExpertLinears, count_routed_tokens, observe_all_experts
from miaotui.loading import LoadedModel
from miaotui.progress import track
from miaotui.self_calibration import cannot_generate, generate_windows

log = logging.getLogger(__name__)


# the fraction of calibration windows the model writes itself, by default: on ref-llama-16m calibrated off-domain,
# 0.75 brings Wanda below magnitude pruning and 2:4 SparseGPT from +21 % to +11 % (docs/benchmarks/quality.md)
DEFAULT_GENERATED = 0.75


@dataclass(frozen=True)
class Calibration:
    """Calibration data for the steps that need it: text, number of windows, tokens per window.

    generated: the fraction of the windows the model writes itself (`miaotui.self_calibration`), sampled from
    the first model `token_ids` gets (the uncompressed one, in a recipe) and kept; the rest are cut from the
    text. Three quarters by default: statistics from text unlike what the model will see mislead the calibrated
    methods, and the model's own samples cover what it was trained on. 1.0 calibrates with no text at all (text
    may then be empty); 0 on the text alone.

    >>> Calibration("some text", samples=4, seqlen=2).samples
    4
    >>> Calibration("", generated=1.0).generated
    1.0
    """

    text: str
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    generated: float = DEFAULT_GENERATED
    _generated: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.generated, bool) or not isinstance(self.generated, int | float):
            raise MiaotuiError(f"calibration: generated must be a fraction in [0, 1], got {self.generated!r}")
        if not 0 <= self.generated <= 1:
            raise MiaotuiError(f"calibration: generated must be a fraction in [0, 1], got {self.generated!r}")
        if self.generated < 1 and not self.text.strip():
            raise MiaotuiError("the calibration text is empty (generated=1 calibrates on generated text only)")
        if self.samples < 1 or self.seqlen < 2:
            raise MiaotuiError("calibration needs at least 1 sample of at least 2 tokens")

    def generated_windows(self, lm: LoadedModel) -> int:
        """How many windows `lm` writes: none where it cannot generate (an encoder: `cannot_generate`), which
        then calibrates on the text alone."""
        n = round(self.samples * self.generated)
        reason = cannot_generate(lm) if n else None
        if reason and not self.text.strip():
            raise MiaotuiError(f"calibration: no text, and the model cannot write its own: {reason}")
        return 0 if reason else n

    def token_ids(self, lm: LoadedModel, progress: bool | None = None) -> torch.Tensor:
        """(samples, seqlen) token ids: windows cut at random from the text, then those the model writes
        (sampled once per model and kept)."""
        n = self.generated_windows(lm)
        rows = []
        if n < self.samples:
            rows.append(calibration_windows(lm, self.text, self.samples - n, self.seqlen, self.seed))
        if n:
            key = (type(lm.model).__name__, lm.tokenizer.name_or_path, len(lm.tokenizer))
            if key not in self._generated:
                check_seqlen(lm, self.seqlen)
                self._generated[key] = generate_windows(lm, n, self.seqlen, seed=self.seed, progress=progress)
            rows.append(self._generated[key])
        return torch.cat(rows)  # (samples, seqlen)


def calibration_summary(lm: LoadedModel, calibration: Calibration | torch.Tensor, ids: torch.Tensor) -> dict:
    """For a step's summary: how many calibration windows, of how many tokens, the model wrote how many."""
    out = {"windows": ids.shape[0], "tokens_per_window": ids.shape[1]}
    if not isinstance(calibration, Calibration):
        return out
    out["generated_windows"] = calibration.generated_windows(lm)
    reason = cannot_generate(lm) if calibration.generated else None
    return {**out, "note": f"text only: {reason}"} if reason else out


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


def check_seqlen(lm: LoadedModel, seqlen: int) -> None:
    """Refuse windows longer than the model's context."""
    context = lm.context_length
    if context is not None and seqlen > context:
        raise MiaotuiError(f"calib-seqlen {seqlen} is larger than the model's context of {context} tokens")


def calibration_windows(
    lm: LoadedModel, text: str, samples: int = 128, seqlen: int = 512, seed: int = 0, overlap: bool = False
):
    """Tokenize `text` once and cut `samples` random windows: (S, seqlen) token ids."""
    if samples < 1 or seqlen < 2:
        raise MiaotuiError("calibration needs at least 1 sample of at least 2 tokens")
    check_seqlen(lm, seqlen)
    ids = torch.tensor(lm.tokenizer(text)["input_ids"], dtype=torch.long)
    return calibration_ids(ids, samples, seqlen, seed, overlap)


def blocks_of(lm: LoadedModel) -> nn.ModuleList:
    """The model's list of transformer blocks (found when it was loaded: `miaotui.arch.find_blocks`)."""
    try:
        return lm.model.get_submodule(lm.arch.blocks)
    except AttributeError as e:
        raise MiaotuiError(f"cannot find the transformer blocks ({lm.arch.blocks}) of {type(lm.model).__name__}") from e


def _to_float32(value):
    """`value` with every floating-point tensor in it (nested in tuples, lists, dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value


@dataclass
class BlockCall:
    """Runs one transformer block as the model calls it: `call(x)` -> the block's output hidden states.

    `call(x, module)` runs another module (a copy of the block) with the same arguments; `float32()` gives a
    float32 copy of the block and a call for it, to check a rewrite of the block in exact arithmetic.
    """

    block: nn.Module
    extra: tuple = ()  # positional arguments after the hidden states, if the model passes any
    kwargs: dict = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        out = (module or self.block)(x, *self.extra, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def float32(self) -> tuple[nn.Module, BlockCall]:
        copy = deepcopy(self.block).float()
        return copy, BlockCall(copy, _to_float32(self.extra), _to_float32(self.kwargs))


def capture_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple, dict]:
    """Run token ids (S, T) through `model` up to `block`: its hidden-state inputs (S tensors of (1, T, H)), and
    the other positional and keyword arguments the model gives it (those of the last row; no KV cache)."""
    inputs: list[torch.Tensor] = []
    kwargs: dict = {}
    extra: list = []
    device = next(model.parameters()).device

    def grab(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        extra[:] = args[1:]
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in ids:
            with contextlib.suppress(_Captured):
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return inputs, tuple(extra), kwargs


@torch.no_grad()
def probe_block(model: nn.Module, block: nn.Module, tokens: int = 16, seed: int = 0) -> tuple[torch.Tensor, BlockCall]:
    """A block's input for `tokens` random token ids through the model, and the call that runs it: (1, T, H)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    inputs, extra, kwargs = capture_inputs(model, block, ids)
    return inputs[0], BlockCall(block, extra, kwargs)


@torch.no_grad()
def run_blockwise(
    lm: LoadedModel,
    ids: torch.Tensor,
    fn: Callable[[int, nn.Module, list[torch.Tensor], BlockCall], None],
    *,
    progress: bool | None = None,
) -> dict:
    """Call fn(index, block, inputs, forward) for each block in order.

    ids: (S, T). inputs: S tensors of (1, T, H) on the model's device, the block's hidden states per sample;
    forward: a BlockCall, forward(x) the block's output hidden states for x, called as the model calls it.
    While fn runs, every expert of the block also sees every token (`miaotui.experts.observe_all_experts`).
    Returns {"experts": what calibration reached} for a mixture-of-experts model, else {}.
    """
    blocks = blocks_of(lm)
    if any(isinstance(m, ExpertLinears) for m in blocks.modules()) and ids.numel() < MIN_EXPERT_TOKENS:
        raise MiaotuiError(
            f"calibrating experts needs at least {MIN_EXPERT_TOKENS} tokens, got {ids.numel()}: give more or "
            "longer calibration samples"
        )
    inputs, extra, kwargs = capture_inputs(lm.model, blocks[0], ids)
    routed: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []  # tokens each expert's statistics rest on
    for index, block in enumerate(track(list(blocks), "calibrating blocks", enabled=progress)):
        forward = BlockCall(block, extra, dict(kwargs))
        with observe_all_experts(block):
            fn(index, block, inputs, forward)
        with count_routed_tokens(block) as counts:
            inputs = [forward(x) for x in inputs]
        experts = {n: m for n, m in block.named_modules() if isinstance(m, ExpertLinears)}
        routed += counts.values()
        seen += [torch.full_like(c, ids.numel()) if experts[n].routed else c for n, c in counts.items()]
    if not routed:
        return {}
    report = expert_report(routed, seen)
    if report["statistics_tokens_per_expert"] < MIN_EXPERT_TOKENS:
        report["warning"] = (
            f"some experts' statistics rest on only {report['statistics_tokens_per_expert']} tokens (fewer than "
            f"{MIN_EXPERT_TOKENS}; a never-reached layer is rounded plainly): give more calibration text"
        )
        log.warning("%s", report["warning"])
    return {"experts": report}


def expert_report(routed: list[torch.Tensor], seen: list[torch.Tensor]) -> dict:
    """What calibration reached in the experts, from the tokens routed to each expert and those its statistics
    rest on (each (E,) per experts module): all tokens under the routed contract (`observe_all_experts`), the
    routed ones under the dense contract (its inputs arrive scaled by the routing weights)."""
    counts, stats = torch.cat(routed).float(), torch.cat(seen).float()  # (modules * E,)
    return {
        "modules": len(routed),
        "experts": int(counts.numel()),
        "statistics_tokens_per_expert": int(stats.min()),
        "routed_tokens_per_expert": {
            "min": int(counts.min()),
            "median": int(counts.median()),
            "max": int(counts.max()),
        },
        f"routed_below_{MIN_EXPERT_TOKENS}": int((counts < MIN_EXPERT_TOKENS).sum()),
    }


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
    memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # one input seen by many layers (all experts' ups)

    def accumulate(name, x):
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        if key not in memo:  # the memo holds x, so its memory cannot be reused by another input meanwhile
            memo[key] = (x, stat(x.float()))  # x: (tokens, K)
        s = memo[key][1]
        sums[name] = sums[name] + s if name in sums else s
        counts[name] += x.shape[0]

    for x in inputs:
        observe_inputs(layers, [x], forward, accumulate)
        memo.clear()
    return sums, counts
