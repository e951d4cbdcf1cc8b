"""The engine's front door: `Engine(model).generate(prompts, params)` and `Engine.stream(prompt, params)`.

>>> import miaotui
>>> engine = Engine(miaotui.load("path/to/causal-lm", dtype="float32"), max_batch=4)  # doctest: +SKIP
>>> done = engine.generate(["Once upon a time", "The city of"], SamplingParams(max_tokens=16))  # doctest: +SKIP
>>> [c.text for c in done]  # doctest: +SKIP
>>> for delta in engine.stream("Hello", SamplingParams(max_tokens=8, temperature=0.8, seed=0)):  # doctest: +SKIP
...     print(delta, end="")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from miaotui.checkpoint import load_model
from miaotui.engine.launch import start_parallel
from miaotui.engine.parallel import ParallelConfig
from miaotui.engine.runner import ModelRunner
from miaotui.engine.sampling import SamplingParams
from miaotui.engine.scheduler import PREFILL_CHUNK, Request, Scheduler
from miaotui.engine.speculative import ModelDrafter, NGramDrafter, generate_speculative
from miaotui.errors import MiaotuiError
from miaotui.loading import LoadedModel

GREEDY = SamplingParams()


@dataclass(frozen=True)
class Completion:
    """One finished generation: text (stop strings cut), token ids, why it ended, counts, timings."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence, stop string or id), "length" (max_tokens) or "abort"
    prompt_tokens: int
    logprobs: list[dict] | None
    time_to_first_token_s: float | None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def completion_of(request: Request) -> Completion:
    ttft = request.first_token_time - request.submitted if request.first_token_time is not None else None
    return Completion(
        request.text, list(request.tokens), request.finish_reason, len(request.prompt_ids), request.logprobs, ttft
    )


class Engine:
    """Generate with a decoder model: paged KV cache with prefix caching, chunked prefill, continuous batching,
    compiled decode.

    model: a LoadedModel or anything `miaotui.load` takes (folder, optimized folder, hub id).
    max_batch: sequences decoded together; more prompts than that wait for free rows.
    max_len: positions per sequence (prompt + new tokens); default the model's context, at most 2048.
    compile: compile the decode step (CUDA graphs on GPU); slower start, faster steps.
    kv_dtype: "auto", "int8" or "fp8" key/value storage.
    kv_cache_memory: bytes for the paged KV cache (default: room for max_batch sequences of max_len positions);
        sequences take blocks as they grow, the latest admitted is preempted (and recomputed) when none is left.
    prefill_chunk: prompt tokens computed per step at most (None: whole prompts), so long prompts do not stall
        the sequences decoding. prefix_caching: reuse the cached keys and values of a prompt's prefix.
    draft: speculative decoding (greedy and sampled requests): "ngram" (prompt lookup) or a smaller model with the
        same vocabulary (LoadedModel or path); `num_draft` tokens proposed per pass. Statistics of the last
        call are in `speculative_stats`.
    parallel: split the model over tp x pp processes (`ParallelConfig`); this process becomes rank 0 and starts
        the others, which load `model` (a folder or hub id) themselves. `close()` (or a `with` block) stops them.
    """

    def __init__(
        self,
        model: LoadedModel | str | os.PathLike,
        *,
        max_batch: int = 1,
        max_len: int | None = None,
        compile: bool = False,
        kv_dtype: str = "auto",
        kv_cache_memory: int | None = None,
        prefill_chunk: int | None = PREFILL_CHUNK,
        prefix_caching: bool = True,
        draft: str | LoadedModel | os.PathLike | None = None,
        num_draft: int = 4,
        parallel: ParallelConfig | None = None,
        **load_options,
    ):
        options = {
            "max_batch": max_batch,
            "max_len": max_len,
            "compile": compile,
            "kv_dtype": kv_dtype,
            "kv_cache_memory": kv_cache_memory,
        }
        if parallel is not None and parallel.world_size > 1:
            if isinstance(model, LoadedModel) or draft is not None:
                raise MiaotuiError(
                    "a parallel engine loads the model on every rank: give a folder or hub id (not a loaded "
                    "model) and no draft model"
                )
            self.runner = start_parallel(model, parallel, load_options=load_options, **options)
            lm = self.runner.lm
        else:
            lm = model if isinstance(model, LoadedModel) else load_model(model, **load_options)
            self.runner = ModelRunner(lm, **options)
        self.lm = lm
        self.scheduler = Scheduler(self.runner, prefill_chunk=prefill_chunk, prefix_caching=prefix_caching)
        if num_draft < 1:
            raise MiaotuiError("num_draft must be >= 1")
        self.num_draft, self.speculative_stats = num_draft, None
        if draft is None or draft == "ngram":
            self.drafter = NGramDrafter() if draft == "ngram" else None
        else:
            draft_lm = draft if isinstance(draft, LoadedModel) else load_model(draft, **load_options)
            self.drafter = ModelDrafter(draft_lm, lm, self.runner.max_len)

    def close(self) -> None:
        """Stop the other ranks of a parallel engine (nothing to do for a single-process one)."""
        self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text, or ids as given)."""
        if isinstance(prompt, str):
            if not prompt:
                raise MiaotuiError("the prompt is empty")
            return self.lm.tokenizer(prompt)["input_ids"]
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = GREEDY,
        *,
        on_token: Callable[[Request, int, str], None] | None = None,
    ) -> list[Completion]:
        """Complete each prompt (text or token ids); returns one Completion per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise MiaotuiError("no prompts given")
        per = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise MiaotuiError(f"{len(per)} sampling parameter sets for {len(prompts)} prompts")
        requests = [Request(self.encode(p), sp, on_token) for p, sp in zip(prompts, per, strict=True)]
        for r in requests:  # validate every request before any work
            self.scheduler.check(r)
        speculative = [r for r in requests if self.drafter is not None]
        for r in requests:
            self.scheduler.submit(r)
            if r in speculative:
                self.scheduler.waiting.remove(r)
        try:
            while self.scheduler.has_work():
                self.scheduler.step()
            if speculative:
                stats = [generate_speculative(self.scheduler, r, self.drafter, self.num_draft) for r in speculative]
                self.speculative_stats = _total(stats)
        except BaseException:
            for r in requests:
                self.scheduler.cancel(r)
            raise
        return [completion_of(r) for r in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams = GREEDY) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated."""
        pieces: list[str] = []
        request = self.scheduler.submit(Request(self.encode(prompt), params, lambda r, t, d: pieces.append(d)))
        try:
            while not request.done:
                self.scheduler.step()
                yield from (p for p in pieces if p)
                pieces.clear()
        finally:
            self.scheduler.cancel(request)


def _total(stats: list[dict]) -> dict:
    proposed, accepted = sum(s["proposed"] for s in stats), sum(s["accepted"] for s in stats)
    return {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_pass": sum(s["tokens_per_pass"] for s in stats) / len(stats),
    }
