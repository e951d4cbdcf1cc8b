"""Speculative decoding for greedy requests: a cheap drafter proposes k tokens, the model checks them in one pass.

Two drafters: `NGramDrafter` (prompt lookup: copy what followed the last matching n-gram of the text so far,
free and good on repetitive or extractive text) and `ModelDrafter` (a smaller model with the same vocabulary,
e.g. a quantized or slimmed copy). The target keeps the longest prefix of the draft that matches its own
greedy choices and adds one token of its own, so the output equals plain greedy decoding.

>>> NGramDrafter(max_ngram=2).propose([5, 6, 7, 1, 5, 6], k=3)
[7, 1, 5]
"""

from __future__ import annotations

import torch

from miaotui.engine.runner import ModelRunner
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
        out = [int(logits[0].argmax())]
        dev = self.runner.device
        for i in range(k - 1):
            pos = torch.tensor([len(history) + i], device=dev)
            logits = self.runner.decode(torch.tensor([out[-1]], device=dev), pos)
            out.append(int(logits[0].argmax()))
        return out


def generate_speculative(
    scheduler: Scheduler, request: Request, drafter: NGramDrafter | ModelDrafter, k: int = 4
) -> dict:
    """Run one greedy request (already submitted-checked) on row 0; returns acceptance statistics."""
    if not request.params.greedy or request.params.repetition_penalty != 1:
        raise MiaotuiError("speculative decoding runs greedy requests (temperature 0, no repetition penalty)")
    runner = scheduler.runner
    row = torch.tensor([0])
    drafter.reset()
    logits = runner.extend(row, [request.prompt_ids])  # (1, V)
    scheduler.add_token(request, int(logits[0].argmax()), logits[0])
    proposed = accepted = passes = 0
    while not request.done:
        history = request.prompt_ids + request.tokens
        room = min(request.params.max_tokens - len(request.tokens) - 1, runner.max_len - len(history))
        draft = drafter.propose(history, min(k, room)) if room > 0 else []
        logits = runner.extend(row, [history[-1:] + draft], starts=[len(history) - 1], keep=len(draft) + 1)
        choices = logits[0].argmax(-1).tolist()  # the model's own token after each prefix, (len(draft) + 1,)
        passes += 1
        proposed += len(draft)
        for i, token in enumerate(choices):
            scheduler.add_token(request, token, logits[0, i])
            if request.done or i == len(draft) or draft[i] != token:
                break
            accepted += 1
    return {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_pass": len(request.tokens) / max(passes, 1),
    }
