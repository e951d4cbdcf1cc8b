"""Subcommands that run a model: generate."""

from __future__ import annotations

import argparse
import json
import sys

from miaotui.cli.common import (
    EPILOG,
    add_engine_options,
    add_load_options,
    add_parallel_options,
    load,
    load_kwargs,
    number,
    parallel_config,
    positive,
)


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="complete a prompt with the engine",
        description="Complete PROMPT with miaotui's engine (static KV cache; --compile for a compiled decode step). "
        "Greedy by default; --temperature > 0 samples (reproducibly with --seed).",
        epilog=EPILOG,
    )
    p.add_argument("model", help="causal LM folder (plain or optimized) or hub id")
    p.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    p.add_argument("--max-tokens", type=positive, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=number(0), default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument(
        "--top-k",
        type=lambda text: positive(text, minimum=0),
        default=0,
        help="sample among the k likeliest tokens (default 0: off)",
    )
    p.add_argument(
        "--repetition-penalty", type=number(0, above=True), default=1.0, help="> 1 discourages repeats (default 1)"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--json", action="store_true", help="print text, tokens, finish reason and timings as JSON")
    p.add_argument(
        "--draft",
        metavar="ngram|MODEL",
        help="speculative decoding: ngram (prompt lookup) or a smaller model with the same vocabulary; the output "
        "is that of plain decoding (greedy: the same tokens; sampled: the same distribution)",
    )
    p.add_argument("--num-draft", type=positive, default=4, help="tokens proposed per pass (default 4)")
    add_engine_options(p)
    add_load_options(p)
    add_parallel_options(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(a: argparse.Namespace) -> None:
    from miaotui.api import Engine, SamplingParams
    from miaotui.errors import MiaotuiError

    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        repetition_penalty=a.repetition_penalty,
        stop=tuple(a.stop),
        seed=a.seed,
    )
    parallel = parallel_config(a)
    if parallel is not None:  # every rank loads the model; the cache holds the model's context (at most 2048)
        if a.draft is not None:
            raise MiaotuiError("--draft runs in one process; leave out --tp/--pp to decode speculatively")
        engine = Engine(a.model, compile=a.compile, kv_dtype=a.kv_cache, parallel=parallel, **load_kwargs(a))
        with engine:
            _generate(a, engine, prompt, params)
        return
    lm = load(a, a.model)
    need, context = len(lm.tokenizer(prompt)["input_ids"] if prompt else []) + a.max_tokens, lm.context_length
    if context is not None and need > context:
        raise MiaotuiError(
            f"prompt ({need - a.max_tokens} tokens) + --max-tokens ({a.max_tokens}) exceeds the model's context of "
            f"{context} tokens"
        )
    draft = {"draft": a.draft, "num_draft": a.num_draft}
    if a.draft is not None and a.draft != "ngram":
        draft["draft"] = load(a, a.draft)
    engine = Engine(lm, max_len=max(need, 2), compile=a.compile, kv_dtype=a.kv_cache, **draft)
    _generate(a, engine, prompt, params)


def _generate(a: argparse.Namespace, engine, prompt: str, params) -> None:
    import time

    prompt_ids = engine.lm.tokenizer(prompt)["input_ids"] if prompt else []
    if a.stream and not a.json:
        if engine.drafter is None:
            for piece in engine.stream(prompt_ids, params):
                print(piece, end="", flush=True)
        else:
            engine.generate(prompt_ids, params, on_token=lambda request, token, delta: print(delta, end="", flush=True))
        print()
        return
    t0 = time.perf_counter()
    done = engine.generate(prompt_ids, params)[0]
    seconds = time.perf_counter() - t0
    if not a.json:
        print(done.text)
        return
    result = {
        "text": done.text,
        "token_ids": done.token_ids,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "time_to_first_token_s": done.time_to_first_token_s,
        "seconds": seconds,
        "compile_seconds": engine.runner.compile_seconds,
        "speculative": engine.speculative_stats,
    }
    print(json.dumps(result, indent=2))
