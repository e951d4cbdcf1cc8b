"""Continuous batching on a paged KV cache: requests join between steps, leave as soon as they finish.

Each `step()` first prefills: requests being prefilled continue, and waiting requests are admitted (in order) while
a row is free and the cache has the blocks their prompt needs beyond its longest cached prefix (prefix caching,
`miaotui.engine.blocks`). At most `prefill_chunk` prompt tokens are computed per step, so a long prompt is
prefilled over several steps and the others keep decoding in between (chunked prefill). Then one decode step runs
for every prefilled request: it samples, streams text, and retires the finished, whose rows and blocks the next
requests reuse. A sequence that needs a new block when none is free preempts the latest admitted sequence, whose
blocks are released; it waits at the head of the queue and is computed again from its tokens (recompute).

A compiled decode step covers rows 0 up to the last busy one (sequences move down into free rows), run at the
smallest batch size it was compiled for; an eager one covers only the busy rows when at most half are busy.

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

import torch

from miaotui.engine.blocks import BlockManager
from miaotui.engine.constraints import GrammarCompiler, constrained
from miaotui.engine.request import Request, TextStream
from miaotui.engine.runner import ModelRunner
from miaotui.engine.sampling import SamplingParams, greedy_ids, logprob_entries, pick, top_logprobs
from miaotui.errors import MiaotuiError

__all__ = ["Request", "SamplingParams", "Scheduler", "TextStream"]

PREFILL_CHUNK = 256  # prompt tokens computed per step by default


class Scheduler:
    """Run many requests on one runner: `max_batch` sequences at a time within the cache's blocks, the rest wait.

    prefill_chunk: prompt tokens computed per step at most (None: whole prompts at once).
    prefix_caching: reuse the cached blocks of a shared prompt prefix.
    """

    def __init__(self, runner: ModelRunner, *, prefill_chunk: int | None = PREFILL_CHUNK, prefix_caching: bool = True):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise MiaotuiError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self.runner, self.prefill_chunk = runner, prefill_chunk
        self.tokenizer = runner.lm.tokenizer
        eos = runner.lm.model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.grammars = GrammarCompiler(self.tokenizer, runner.config.vocab_size, self.eos)
        cache = runner.cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # row -> request (being prefilled or decoding)
        self.free = list(range(runner.max_batch))
        self.preemptions = 0
        self._order = itertools.count()

    def check(self, request: Request) -> None:
        """Raise a MiaotuiError if the request cannot run on this engine."""
        vocab, p = self.runner.config.vocab_size, request.params
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise MiaotuiError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in p.logit_bias):
            raise MiaotuiError(f"logit_bias token ids must be in [0, {vocab})")
        if p.grammar is not None:
            self.grammars.check(p.grammar)
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
        if request.params.grammar is not None:
            request.matcher = self.grammars.matcher(request.params.grammar)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now (e.g. its client went away); its row and blocks are freed."""
        if request in self.waiting:
            self.waiting.remove(request)
        if not request.done:
            request.finish_reason = "abort"
        if request.row is not None and self.running.get(request.row) is request:
            self._retire(request)

    def abort_all(self, error: str) -> list[Request]:
        """After a failed step: fail every request holding a row, free their rows and blocks; returns them.

        Waiting requests stay queued."""
        failed = list(self.running.values())
        for request in failed:
            if not request.done:
                request.finish_reason, request.error = "error", error
            self._retire(request)
        return [r for r in failed if r.error == error]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        """KV cache blocks used and free, prefix-cache hit rate, preemptions so far."""
        b = self.blocks
        return {
            "blocks_used": b.used,
            "blocks_free": b.available,
            "blocks_total": b.num_blocks,
            "prefix_hit_rate": b.hit_rate,
            "prefix_hit_tokens": b.hit_tokens,
            "preemptions": self.preemptions,
        }

    def step(self) -> list[Request]:
        """Prefill (a chunk), decode one token for everyone prefilled, retire; returns the requests finished."""
        finished = self._prefill()
        if any(r.prefilled for r in self.running.values()):
            finished += self._decode()
        return finished

    # -- admission and prefill -------------------------------------------------------------------------------
    def _admit_next(self) -> Request | None:
        """Give the first waiting request a row and the blocks of its sequence (cached prefix blocks shared), or
        None if no row or not enough free blocks."""
        if not self.waiting or not self.free:
            return None
        request, m = self.waiting[0], self.blocks
        seq = request.sequence
        m.extend_hashes(request.hashes, seq)
        # a request scoring its prompt computes every position: cached blocks would skip some
        cached = m.match(seq, request.hashes) if request.prompt_logprobs is None else []
        reclaimed = sum(1 for b in cached if m.refs[b] == 0)  # cached blocks no one holds count as available
        need = m.blocks_for(len(seq)) - len(cached)
        if need > m.available - reclaimed:
            m.queried_tokens -= len(seq)  # not admitted: this lookup does not count
            m.hit_tokens -= len(cached) * m.block_size
            return None
        self.waiting.popleft()
        m.acquire(cached)
        request.blocks = cached + m.allocate(need)
        request.registered, request.computed = len(cached), len(cached) * m.block_size
        request.row, request.admitted = self.free.pop(0), next(self._order)
        self.running[request.row] = request
        self.runner.cache.set_blocks(request.row, request.blocks)
        return request

    def _prefill(self) -> list[Request]:
        """Compute up to prefill_chunk prompt tokens: of requests being prefilled, then of newly admitted ones."""
        budget = self.prefill_chunk or float("inf")
        chunks = []  # (request, number of tokens)
        pending = sorted((r for r in self.running.values() if not r.prefilled), key=lambda r: r.admitted)
        while budget > 0:
            request = pending.pop(0) if pending else self._admit_next()
            if request is None:
                break
            n = int(min(len(request.sequence) - request.computed, budget))
            chunks.append((request, n))
            budget -= n
        if not chunks:
            return []
        rows = torch.tensor([r.row for r, _ in chunks])
        tokens = [r.sequence[r.computed : r.computed + n] for r, n in chunks]
        scoring = [n for r, n in chunks if self._scores(r)]
        keep = max(scoring) if scoring else None
        logits = self.runner.extend(rows, tokens, [r.computed for r, _ in chunks], keep)  # (b, V) | (b, keep, V)
        if keep is not None:
            for (request, n), row_logits in zip(chunks, logits, strict=True):
                if self._scores(request):
                    self._score_prompt(request, row_logits[keep - n :])
            logits = logits[:, -1]
        done, done_logits = [], []
        for i, (request, n) in enumerate(chunks):
            request.computed += n
            self._register(request)
            if request.computed == len(request.sequence):
                request.prefilled = True
                done.append(request)
                done_logits.append(i)
        if not done:
            return []
        return self._accept(done, logits[torch.tensor(done_logits, device=logits.device)])

    @staticmethod
    def _scores(request: Request) -> bool:
        return request.prompt_logprobs is not None and len(request.prompt_logprobs) < len(request.prompt_ids)

    def _score_prompt(self, request: Request, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that this chunk's logits (n, V) predict."""
        start = request.computed + 1  # logits[j] predicts the token at position computed + j + 1
        targets = request.prompt_ids[start : start + len(logits)]
        entries = logprob_entries(logits[: len(targets)], targets, request.params.prompt_logprobs)
        request.prompt_logprobs.extend(entries)

    def _register(self, request: Request) -> None:
        """Key the request's newly full blocks for reuse."""
        m = self.blocks
        if m.prefix_caching and request.computed // m.block_size > request.registered:
            m.extend_hashes(request.hashes, request.sequence[: request.computed])
            request.registered = m.register(
                request.blocks, request.hashes[: request.computed // m.block_size], request.registered
            )

    # -- decode ---------------------------------------------------------------------------------------------
    def _grow(self, batch: list[Request]) -> list[Request]:
        """Give each request a block for the position it writes next, preempting the latest admitted sequences
        when none is free; returns the requests still running."""
        m = self.blocks
        for request in sorted(batch, key=lambda r: r.admitted):
            if request.row is None or len(request.blocks) * m.block_size > request.computed:
                continue
            while m.available == 0:
                self._preempt(max(self.running.values(), key=lambda r: r.admitted))
            if request.row is None:  # it was the latest admitted itself
                continue
            request.blocks += m.allocate(1)
            self.runner.cache.set_blocks(request.row, request.blocks[-1:], len(request.blocks) - 1)
        return [r for r in batch if r.row is not None]

    def _preempt(self, request: Request) -> None:
        """Release a sequence's row and blocks; it waits at the head of the queue, to be computed again."""
        self._retire(request)
        request.prefilled, request.computed, request.registered = False, 0, 0
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _decode(self) -> list[Request]:
        r = self.runner
        batch = self._grow([q for q in self.running.values() if q.prefilled])
        if not batch:
            return []
        if r.compile_seconds is None and 2 * len(batch) <= r.max_batch:  # eager: only the busy rows do work
            rows = torch.tensor([q.row for q in batch])
            logits = r.extend(rows, [[q.tokens[-1]] for q in batch], [q.length - 1 for q in batch])  # (b, V)
            return self._after_decode(batch, logits)
        if r.varying_batch:
            self._pack()
        n = max(q.row for q in batch) + 1  # the step covers rows 0..n-1
        tokens = torch.zeros(n, dtype=torch.long)
        pos = torch.full((n,), -1, dtype=torch.long)  # other rows (free, or being prefilled) write nothing
        for q in batch:
            tokens[q.row], pos[q.row] = q.tokens[-1], q.length - 1
        logits = r.decode(tokens.to(r.device), pos.to(r.device))  # (n, V)
        rows = [q.row for q in batch]
        if rows != list(range(len(rows))):  # else the first rows as they are, without a gather
            logits = logits[torch.tensor(rows, device=r.device)]
        return self._after_decode(batch, logits[: len(rows)])

    def _after_decode(self, batch: list[Request], logits: torch.Tensor) -> list[Request]:
        for q in batch:
            q.computed += 1
            self._register(q)
        return self._accept(batch, logits)

    def _pack(self) -> None:
        """Move the sequences in rows >= the number running down into free rows below it (their block table
        rows copied), so a compiled step covers only as many rows as run."""
        count = len(self.running)
        high = sorted(row for row in self.running if row >= count)
        if not high:
            return
        low = [row for row in self.free if row < count][: len(high)]  # as many as high: count rows hold them
        for src, dst in zip(high, low, strict=True):
            self.runner.cache.move_row(src, dst)
            request = self.running.pop(src)
            request.row = dst
            self.running[dst] = request
        self.free = sorted(set(self.free) - set(low) | set(high))

    # -- tokens ---------------------------------------------------------------------------------------------
    def _accept(self, batch: list[Request], logits: torch.Tensor) -> list[Request]:
        """Sample one token per request from logits (b, V), stream it, and retire the finished."""
        fast = all(q.params.greedy and q.params.repetition_penalty == 1 and not _constrains(q) for q in batch)
        choices = greedy_ids(logits).tolist() if fast else [None] * len(batch)
        finished = []
        for request, row_logits, token in zip(batch, logits, choices, strict=True):
            try:  # a failure here (sampling, a client's callback) fails this request only
                if token is None:
                    scores = row_logits
                    if _constrains(request):
                        scores = constrained(row_logits, request.params.logit_bias, request.matcher)
                    token = pick(scores, request.params, request.sequence, request.generator)
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
        if request.matcher is not None:
            request.matcher.accept(token)
        complete = request.matcher is not None and request.matcher.finished  # the grammar is complete
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids or complete:
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

    # -- rows -----------------------------------------------------------------------------------------------
    def reserve(self, request: Request) -> int:
        """Give a checked request (not queued) a row and blocks for all its positions, outside the scheduler's
        steps (speculative decoding drives the runner itself); `cancel` or `release` frees them."""
        need = self.blocks.blocks_for(min(self.runner.max_len, len(request.prompt_ids) + request.params.max_tokens))
        if not self.free or need > self.blocks.available:
            raise MiaotuiError("no free row and blocks for the request: finish the running ones first")
        request.row, request.blocks = self.free.pop(0), self.blocks.allocate(need)
        self.running[request.row] = request
        self.runner.cache.set_blocks(request.row, request.blocks)
        return request.row

    def release(self, request: Request) -> None:
        """Free the row and blocks a request holds."""
        if request.row is not None and self.running.get(request.row) is request:
            self._retire(request)

    def _retire(self, request: Request) -> None:
        del self.running[request.row]
        self.free.append(request.row)
        self.free.sort()
        self.blocks.release(request.blocks)
        request.row, request.blocks = None, []


def _constrains(request: Request) -> bool:
    """Whether the request's logits are changed before sampling (logit bias, a grammar)."""
    return bool(request.params.logit_bias) or request.matcher is not None
