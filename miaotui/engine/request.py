"""One generation request and its state in the engine; `TextStream` turns its tokens into text as they come.

>>> from miaotui.engine.sampling import SamplingParams
>>> r = Request([1, 2, 3], SamplingParams(max_tokens=4))
>>> r.length, r.done
(3, False)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch

from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError

_ids = itertools.count()


class TextStream:
    """Incremental detokenization: the text each new token adds, at constant cost per token.

    Only the last few tokens are decoded each time (a token's text can depend on its neighbours), and text
    that ends inside an incomplete UTF-8 sequence is held back until the sequence completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""
        self.prefix, self.read = 0, 0  # tokens[prefix:read] decode to text already emitted

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)
        self.text += delta
        return delta


class Request:
    """One generation request and its state; `on_token(request, token_id, text_delta)` streams it."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_token: Callable[[Request, int, str], None] | None = None,
    ):
        if not prompt_ids:
            raise MiaotuiError("the prompt is empty: give at least one token")
        self.id = next(_ids)
        self.prompt_ids, self.params, self.on_token = list(prompt_ids), params, on_token
        self.tokens: list[int] = []
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # prompt tokens' logprobs (the first has none: nothing predicts it)
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.matcher = None  # the request's place in its grammar (constrained decoding), set by the scheduler
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the request failed (finish_reason "error")
        self.row: int | None = None
        self.blocks: list[int] = []  # KV cache blocks holding this sequence's positions, in order
        self.hashes: list[bytes] = []  # prefix hashes of the sequence's full blocks (prefix caching)
        self.registered = 0  # blocks keyed for reuse so far
        self.computed = 0  # positions whose keys and values are in the cache
        self.prefilled = False  # the prompt (and, after a preemption, the tokens so far) is in the cache
        self.admitted = 0  # admission order: the latest admitted is preempted first
        self.generator: torch.Generator | None = None
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self._stream: TextStream | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.tokens)

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.tokens
