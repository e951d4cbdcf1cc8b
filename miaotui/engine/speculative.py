"""Speculative decoding: a cheap drafter proposes k tokens, the model checks them all in one pass.

Two drafters: `NGramDrafter` (prompt lookup: copy what followed the last matching n-gram of the text so far,
free and good on repetitive or extractive text) and `ModelDrafter` (a smaller model with the same vocabulary,
e.g. a quantized or slimmed copy). Under greedy decoding the target keeps the longest prefix of the draft that
matches its own choices and adds one token of its own, so the output equals plain greedy decoding. When sampling,
each draft token is kept with the probability the model gives it, and the first rejected one is replaced by a
draw from the model's distribution without it (speculative sampling with a deterministic draft): the tokens follow
exactly the distribution of plain sampling (not the same draws for a seed, as the random numbers are used
differently).

>>> NGramDrafter(max_ngram=2).propose([5, 6, 7, 1, 5, 6], k=3)
[7, 1, 5]
"""

from __future__ import annotations

import torch

from miaotui.engine.runner import ModelRunner
from miaotui.engine.sampling import greedy_ids, pick, verify_draft
from miaotui.engine.scheduler import Request, Scheduler
from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel


class NGramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n = max_ngram..1), copy what followed."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise MiaotuiError("max_ngram must be >= 1")
        self.max_ngram = max_ngram

    def reset(self) -> None:
        pass

    def propose(self, history: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            tail = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):
                if history[start : start + n] == tail:
                    return history[start + n : start + n + k]
        return []


class ModelDrafter:
    """A smaller model with the target's vocabulary drafts greedily, on its own one-row cache."""

    def __init__(self, draft: LoadedModel, target: LoadedModel, max_len: int):
        if draft.model.config.vocab_size != target.model.config.vocab_size:
            raise MiaotuiError(
                f"the draft model's vocabulary ({draft.model.config.vocab_size} tokens) differs from the model's "
                f"({target.model.config.vocab_size}); a draft must share the tokenizer"
            )
        self.runner = ModelRunner(draft, max_batch=1, max_len=max_len)
        self.row = torch.tensor([0])
        self.seen = 0  # history tokens whose keys and values are in the draft's cache

    def reset(self) -> None:
        self.seen = 0

    def propose(self, history: list[int], k: int) -> list[int]:
        if k < 1:
            return []
        start = min(self.seen, len(history) - 1)
        logits = self.runner.extend(self.row, [history[start:]], starts=[start])  # (1, V)
        self.seen = len(history)
        out = [int(greedy_ids(logits[0]))]
        dev = self.runner.device
        for i in range(k - 1):
            pos = torch.tensor([len(history) + i], device=dev)
            logits = self.runner.decode(torch.tensor([out[-1]], device=dev), pos)
            out.append(int(greedy_ids(logits[0])))
        return out


def generate_speculative(
    scheduler: Scheduler, request: Request, drafter: NGramDrafter | ModelDrafter, k: int = 4
) -> dict:
    """Run one request (submitted and checked) on a row of its own; returns acceptance statistics."""
    p = request.params
    if p.logit_bias or p.grammar is not None or p.prompt_logprobs is not None:
        raise MiaotuiError("speculative decoding does not take logit_bias, a grammar or prompt logprobs")
    row = torch.tensor([scheduler.reserve(request)])
    try:
        return _speculate(scheduler, request, drafter, k, row)
    finally:
        scheduler.release(request)


def _speculate(scheduler: Scheduler, request: Request, drafter, k: int, row: torch.Tensor) -> dict:
    runner, p, gen = scheduler.runner, request.params, request.generator
    drafter.reset()
    logits = runner.extend(row, [request.prompt_ids])  # (1, V)
    scheduler.add_token(request, pick(logits[0], p, request.prompt_ids, gen), logits[0])
    proposed = accepted = passes = 0
    while not request.done:
        history = request.prompt_ids + request.tokens
        room = min(request.params.max_tokens - len(request.tokens) - 1, runner.max_len - len(history))
        draft = drafter.propose(history, min(k, room)) if room > 0 else []
        logits = runner.extend(row, [history[-1:] + draft], starts=[len(history) - 1], keep=len(draft) + 1)
        passes += 1
        proposed += len(draft)
        for i in range(len(draft) + 1):  # logits[0, i]: the model after history + draft[:i]
            seen = history + draft[:i]
            if i == len(draft):
                token, kept = pick(logits[0, i], p, seen, gen), False
            else:
                token, kept = verify_draft(logits[0, i], p, seen, gen, draft[i])
            scheduler.add_token(request, token, logits[0, i])
            if request.done or not kept:
                break
            accepted += 1
    return {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_pass": len(request.tokens) / max(passes, 1),
    }
