"""Continuous batching: requests join free cache rows between decode steps and leave as soon as they finish.

Each `step()` admits waiting requests into free rows (one batched prefill), then runs one decode step for
every running request, samples, streams text, and retires the finished ones, whose rows the next waiting
requests reuse (the lowest free row first, so busy rows stay packed at the front). A compiled decode step covers
rows 0 up to the last busy one, run at the smallest batch size it was compiled for; an eager one covers only the
busy rows when at most half are busy.

>>> import miaotui
>>> from miaotui.engine.runner import ModelRunner
>>> sched = Scheduler(ModelRunner(miaotui.load("path/to/causal-lm"), max_batch=4))  # doctest: +SKIP
>>> req = sched.submit(Request([1, 2, 3], SamplingParams(max_tokens=8)))  # doctest: +SKIP
>>> while sched.has_work():  # doctest: +SKIP
...     sched.step()
>>> req.finish_reason  # doctest: +SKIP
'length'
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable

import torch

from miaotui.engine.runner import ModelRunner
from miaotui.engine.sampling import SamplingParams, greedy_ids, pick, top_logprobs
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
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the request failed (finish_reason "error")
        self.row: int | None = None
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


class Scheduler:
    """Run many requests on one runner; `max_batch` of them at a time, the rest wait in order."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.tokenizer = runner.lm.tokenizer
        eos = runner.lm.model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> request
        self.free = list(range(runner.max_batch))

    def check(self, request: Request) -> None:
        """Raise a MiaotuiError if the request cannot run on this engine."""
        vocab = self.runner.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise MiaotuiError(f"prompt token ids must be in [0, {vocab})")
        need = len(request.prompt_ids) + request.params.max_tokens
        if need > self.runner.max_len:
            raise MiaotuiError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) = {need} "
                f"exceeds the engine's {self.runner.max_len} positions"
            )

    def submit(self, request: Request) -> Request:
        """Queue a request; checks that it fits the cache before any work."""
        self.check(request)
        seed = request.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        request.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        request._stream = TextStream(self.tokenizer)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now (e.g. its client went away); its row is freed."""
        if request in self.waiting:
            self.waiting.remove(request)
        if not request.done:
            request.finish_reason = "abort"
        if request.row is not None and self.running.get(request.row) is request:
            self._retire(request)

    def abort_all(self, error: str) -> list[Request]:
        """After a failed step: fail every request holding or being given a row, free all rows; returns them.

        Waiting requests stay queued. Rows taken by an interrupted admission come back too.
        """
        failed = [r for r in self.running.values() if not r.done]
        for request in failed:
            request.finish_reason, request.error = "error", error
        self.running.clear()
        self.free = list(range(self.runner.max_batch))
        return failed

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        """Admit, decode one token for everyone running, retire; returns the requests finished by this step."""
        finished = self._admit()
        if self.running:
            finished += self._decode()
        return finished

    def _admit(self) -> list[Request]:
        batch = []
        while self.waiting and self.free:
            request = self.waiting.popleft()
            request.row = self.free.pop(0)
            batch.append(request)
        if not batch:
            return []
        for request in batch:
            self.running[request.row] = request
        rows = torch.tensor([r.row for r in batch])
        logits = self.runner.extend(rows, [r.prompt_ids for r in batch])  # (b, V)
        return self._accept(batch, logits)

    def _decode(self) -> list[Request]:
        r = self.runner
        batch = list(self.running.values())
        if r.compile_seconds is None and 2 * len(batch) <= r.max_batch:  # eager: only the busy rows do work
            rows = torch.tensor([q.row for q in batch])
            logits = r.extend(rows, [[q.tokens[-1]] for q in batch], [q.length - 1 for q in batch])  # (b, V)
            return self._accept(batch, logits)
        if r.varying_batch:
            self._pack()
        n = max(self.running) + 1  # the step covers rows 0..n-1
        tokens = torch.zeros(n, dtype=torch.long)
        pos = torch.zeros(n, dtype=torch.long)  # idle rows decode a dummy token at index 0
        for row, request in self.running.items():
            tokens[row], pos[row] = request.tokens[-1], request.length - 1
        logits = r.decode(tokens.to(r.device), pos.to(r.device))  # (n, V)
        rows = [q.row for q in batch]
        if rows != list(range(len(rows))):  # else the first rows as they are, without a gather
            logits = logits[torch.tensor(rows, device=r.device)]
        return self._accept(batch, logits[: len(rows)])

    def _pack(self) -> None:
        """Move the sequences in rows >= the number running down into free rows below it (their cache rows
        copied), so a compiled step covers only as many rows as run."""
        count = len(self.running)
        high = sorted(row for row in self.running if row >= count)
        if not high:
            return
        low = [row for row in self.free if row < count][: len(high)]  # as many as high: count rows hold them
        self.runner.cache.move_rows(high, low)
        for src, dst in zip(high, low, strict=True):
            request = self.running.pop(src)
            request.row = dst
            self.running[dst] = request
        self.free = sorted(set(self.free) - set(low) | set(high))

    def _accept(self, batch: list[Request], logits: torch.Tensor) -> list[Request]:
        """Sample one token per request from logits (b, V), stream it, and retire the finished."""
        fast = all(q.params.greedy and q.params.repetition_penalty == 1 for q in batch)
        choices = greedy_ids(logits).tolist() if fast else [None] * len(batch)
        finished = []
        for request, row_logits, token in zip(batch, logits, choices, strict=True):
            try:  # a failure here (sampling, a client's callback) fails this request only
                if token is None:
                    token = pick(row_logits, request.params, request.prompt_ids + request.tokens, request.generator)
                self.add_token(request, token, row_logits)
            except Exception as e:
                request.finish_reason, request.error = "error", f"{type(e).__name__}: {e}"
            if request.done:
                self._retire(request)
                finished.append(request)
        return finished

    def add_token(self, request: Request, token: int, logits: torch.Tensor | None = None) -> None:
        """Record a generated token: logprobs, stop conditions, streamed text."""
        p = request.params
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        request.tokens.append(token)
        if request.logprobs is not None and logits is not None:
            request.logprobs.append(top_logprobs(logits, token, p.logprobs))
        delta = request._stream.push(token)
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            request.finish_reason = "stop"
        text = request._stream.text
        hits = [i for i in (text.find(s, max(0, len(request.text) - len(s))) for s in p.stop) if i >= 0]
        if hits:  # the text ends before the stop string, even where part of it was streamed already
            request.finish_reason = "stop"
            delta, request.text = text[len(request.text) : min(hits)], text[: min(hits)]
        else:
            request.text += delta
        if request.on_token is not None:
            request.on_token(request, token, delta)
        if not request.done and len(request.tokens) >= p.max_tokens:
            request.finish_reason = "length"

    def _retire(self, request: Request) -> None:
        del self.running[request.row]
        self.free.append(request.row)
        self.free.sort()
