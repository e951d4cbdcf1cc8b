"""The OpenAI-compatible application: routes on an EngineWorker, behind the Guard middleware.

>>> engine = Engine(miaotui.load("path/to/causal-lm"), max_batch=8)  # doctest: +SKIP
>>> app = create_app(engine, ServeConfig(), model_id="my-model")  # doctest: +SKIP
>>> uvicorn.run(app)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from miaotui import __version__
from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.serve.chat import ChatRequest, render_chat, tool_text_start
from miaotui.serve.config import ServeConfig
from miaotui.serve.guard import ERROR_TYPES, Guard, ServerState, access_log, error_body
from miaotui.serve.metrics import CONTENT_TYPE, Metrics
from miaotui.serve.protocol import CompletionRequest, RequestError
from miaotui.serve.responses import Formatter, Shape, finish_reason
from miaotui.serve.worker import SHUTTING_DOWN, EngineFailed, EngineWorker, Job, QueueFull

CHARS_PER_TOKEN_LIMIT = 64  # a text longer than this many characters per context token cannot fit: refuse untokenized


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    body = error_body(message, ERROR_TYPES.get(status, "error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def _held(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not streamed yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@dataclasses.dataclass
class _Choice:
    buf: str = ""
    emitted: int = 0
    logprobs_seen: int = 0
    first: bool = True


def create_app(engine: Engine | EngineWorker, cfg: ServeConfig, model_id: str) -> FastAPI:
    """The ASGI app serving `engine` as `model_id`; its lifespan starts (unless started) and stops the engine
    thread. Given an EngineWorker that builds its engine, start it first (`serve` does)."""
    worker = engine if isinstance(engine, EngineWorker) else EngineWorker(engine, max_queue=cfg.max_queue)
    engine = worker.engine
    tokenizer, max_len = engine.lm.tokenizer, engine.runner.max_len
    state = ServerState()
    compiled = engine.runner.compile_seconds or 0.0
    metrics = Metrics(lambda: worker.waiting, lambda: worker.running, compiled, engine.scheduler.stats)
    worker.observe = metrics.observe
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        await run_in_threadpool(_warm_up, worker)
        state.ready = True
        yield
        state.ready = False
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="miaotui", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker, app.state.serve, app.state.metrics = worker, state, metrics

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        headers = {"retry-after": "1"} if e.status == 429 else None
        return _error(e.status, e.message, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _type_tag(x)]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(": "))
        where, message = ".".join(loc), first["msg"].removeprefix("Value error, ")
        return _error(400, f"{where}: {message}" if where else message, loc[0] if loc else None)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        access_log.exception("request failed")
        return _error(500, f"internal error: {type(e).__name__}", code="internal_error")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready():
        """Ready: the model is loaded, the engine thread runs, and the server is not shutting down."""
        if state.ready and worker.alive and not state.draining:
            return {"status": "ready", "model": model_id}
        return _error(503, "not ready", code="not_ready")

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text: requests, queue depth, running requests, latency histograms, tokens."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "miaotui", "max_model_len": max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        check_model(model)
        return model_card()

    def check_model(name: str) -> None:
        if name != model_id:
            raise RequestError(
                404, f"model {name!r} does not exist; this server has {model_id!r}", "model", "model_not_found"
            )

    def tokenize(prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if len(prompt) > CHARS_PER_TOKEN_LIMIT * max_len:
            raise RequestError(
                400,
                f"the prompt ({len(prompt)} characters) cannot fit the context of {max_len} tokens",
                "prompt",
                "context_length_exceeded",
            )
        return tokenizer(prompt)["input_ids"]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Complete text (or token-id) prompts; `stream: true` sends server-sent events."""
        body.check_supported()
        check_model(body.model)
        prompts = body.prompts()
        if len(prompts) > cfg.max_prompts:
            raise RequestError(400, f"{len(prompts)} prompts; this server takes {cfg.max_prompts} at most", "prompt")
        ids = await run_in_threadpool(lambda: [tokenize(p) for p in prompts])
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if body.echo else None
        shape = Shape(echo=echo, hide_generated=body.max_tokens == 0, n=body.choices_per_prompt)
        scored = body.logprobs if echo is not None else None  # echo with logprobs: score the prompt
        max_tokens = 1 if body.max_tokens == 0 else body.max_tokens  # 0: the one token is not returned
        options = {"grammar": await checked(body.grammar(), "response_format"), "prompt_logprobs": scored}
        return await run(request, body, "text_completion", ids, max_tokens, 16, body.logprobs, (), shape, options)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        """Answer a conversation, rendered with the tokenizer's chat template (or the documented fallback)."""
        body.check_supported()
        body.check_tools()
        check_model(body.model)
        logprobs = body.logprobs_count()
        if sum(len(m.text()) for m in body.messages) > CHARS_PER_TOKEN_LIMIT * max_len:
            raise RequestError(
                400, f"the messages cannot fit the context of {max_len} tokens", "messages", "context_length_exceeded"
            )
        ids, stops = await run_in_threadpool(render_chat, tokenizer, body)
        param = "tools" if body.choice in ("named", "required") else "response_format"
        shape, options = Shape(tools=body if body.tools else None), {"grammar": await checked(body.grammar(), param)}
        max_tokens = body.requested_max_tokens()
        return await run(request, body, "chat.completion", [ids], max_tokens, None, logprobs, stops, shape, options)

    async def checked(grammar, param: str):
        """The grammar, once the engine's grammar compiler accepts it (400 naming `param` if not)."""
        if grammar is not None:
            try:
                await run_in_threadpool(worker.scheduler.grammars.check, grammar)
            except MiaotuiError as e:
                raise RequestError(400, f"{param}: {e}", param) from None
        return grammar

    def plan(body, prompts: list[list[int]], max_tokens: int | None, default: int | None, logprobs, stops, options):
        """Validate against this server's limits; one (prompt ids, SamplingParams) per choice."""
        n = body.choices_per_prompt
        if n > cfg.max_n:
            raise RequestError(400, f"n = {n}; this server allows {cfg.max_n} choices per prompt", "n")
        if n * len(prompts) > cfg.max_queue:
            raise RequestError(400, f"{n * len(prompts)} choices; this server queues {cfg.max_queue} at most", "n")
        limit = min(cfg.max_tokens_limit, max_len - 1)
        if max_tokens is not None and max_tokens > limit:
            raise RequestError(400, f"max_tokens must be <= {limit}, got {max_tokens}", "max_tokens")
        items = []
        for ids in prompts:
            if not ids:
                raise RequestError(400, "the prompt is empty", "prompt")
            wanted = max_tokens if max_tokens is not None else min(default or limit, limit, max(1, max_len - len(ids)))
            if len(ids) + wanted > max_len:
                raise RequestError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({wanted}) exceeds the context of {max_len} tokens",
                    "max_tokens",
                    "context_length_exceeded",
                )
            try:
                base = body.sampling_params(wanted, logprobs, stops, **options)
                worker.check(ids, base)
            except (ValueError, MiaotuiError) as e:
                raise RequestError(400, str(e)) from None
            for i in range(n):
                seed = None if base.seed is None else base.seed + i
                items.append((ids, dataclasses.replace(base, seed=seed)))
        return items

    async def run(request: Request, body, kind, prompts, max_tokens, default, logprobs, stops, shape, options):
        items = plan(body, prompts, max_tokens, default, logprobs, stops, options)
        prompt_tokens = sum(len(ids) for ids in prompts)
        log = {"prompt_tokens": prompt_tokens, "choices": len(items), "stream": bool(body.stream)}
        if cfg.log_prompts:
            log["prompt"] = [tokenizer.decode(ids) for ids in prompts]
        request.state.log = log
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(*event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            jobs = worker.submit_many(items, on_event)
        except QueueFull as e:
            raise RequestError(429, f"the server is busy ({e}); retry later", code="queue_full") from None
        except EngineFailed as e:
            raise RequestError(503, f"the engine is down: {e}", code="engine_failed") from None
        metrics.prompt.inc(prompt_tokens)
        response_id = f"{'chatcmpl' if kind != 'text_completion' else 'cmpl'}-{uuid.uuid4().hex}"
        fmt = Formatter(kind, model_id, tokenizer, response_id, shape)
        deadline = loop.time() + cfg.request_timeout
        all_stops = items[0][1].stop
        if body.stream:
            gen = _stream(jobs, events, fmt, deadline, all_stops, body.include_usage, prompt_tokens, log)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            await _collect(jobs, events, deadline, request)
        finally:
            for job in jobs:
                if not job.request.done:
                    worker.cancel(job)
        log["completion_tokens"] = fmt.completion_tokens([j.request for j in jobs])
        failed = [j.request.error for j in jobs if j.request.finish_reason == "error"]
        if SHUTTING_DOWN in failed:
            return _error(503, f"{SHUTTING_DOWN}: the request was ended", code="shutting_down")
        if failed:
            return _error(500, f"generation failed: {failed[0]}", code="generation_failed")
        return fmt.response([j.request for j in jobs], prompt_tokens)

    async def _collect(jobs: list[Job], events: asyncio.Queue, deadline: float, request: Request) -> None:
        loop, pending = asyncio.get_running_loop(), len(jobs)
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                raise RequestError(504, f"the request took longer than {cfg.request_timeout} s", code="timeout")
            try:
                kind, *_ = await asyncio.wait_for(events.get(), min(0.5, left))
            except TimeoutError:
                if await request.is_disconnected():
                    raise RequestError(499, "the client went away") from None
                continue
            pending -= kind == "done"

    async def _stream(jobs, events, fmt: Formatter, deadline, stops, include_usage, prompt_tokens, log):
        loop = asyncio.get_running_loop()
        index = {job.request.id: i for i, job in enumerate(jobs)}
        choices = [_Choice() for _ in jobs]
        pending = len(jobs)
        try:
            while pending:
                left = deadline - loop.time()
                try:
                    kind, job, token, delta = await asyncio.wait_for(events.get(), max(left, 0))
                except TimeoutError:
                    yield _sse(error_body(f"the request took longer than {cfg.request_timeout} s", "timeout_error"))
                    break
                i = index[job.request.id]
                for event in _choice_events(fmt, i, choices[i], job.request, kind, delta, stops):
                    yield _sse(event)
                pending -= kind == "done"
            completion_tokens = fmt.completion_tokens([j.request for j in jobs])
            log["completion_tokens"] = completion_tokens
            if include_usage:
                yield _sse(fmt.usage_chunk(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the stream ended: free the rows of unfinished requests
            for job in jobs:
                if not job.request.done:
                    worker.cancel(job)

    def openapi() -> dict:  # the schema names the one model served, so generated clients and fuzzers use it
        if app.openapi_schema is None:
            schema = get_openapi(title="miaotui", version=__version__, routes=app.routes)
            for name in ("CompletionRequest", "ChatRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_id]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    routes = [r.path for r in app.routes]
    app.add_middleware(
        Guard, api_key=cfg.api_key, max_body=cfg.max_body_bytes, state=state, metrics=metrics, routes=routes
    )
    return app


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _type_tag(part) -> bool:
    """Parts of a validation error's location that name a union member's type, not a field."""
    return isinstance(part, str) and (part in TYPE_TAGS or "[" in part)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _choice_events(fmt: Formatter, i: int, c: _Choice, r, kind: str, delta: str, stops: tuple[str, ...]):
    """The stream events of choice i for one engine event: "token" (text that cannot be part of a stop string
    or a tool call yet) or "done" (the rest, tool calls, the finish reason; or an error event)."""
    shape = fmt.shape
    if c.first and shape.echo is not None and (kind == "token" or r.finish_reason != "error"):
        entries = fmt.prompt_entries(r) if r.logprobs is not None else None
        yield fmt.chunk(i, fmt.prompt_text(i), entries, None, True)
        c.first = False
    if kind == "token":
        if shape.hide_generated:
            return
        c.buf += delta
        entries = None
        if r.logprobs is not None:
            entries, c.logprobs_seen = r.logprobs[c.logprobs_seen : c.logprobs_seen + 1], c.logprobs_seen + 1
        safe = max(c.emitted, min(len(c.buf) - _held(c.buf, stops), _tool_limit(shape, c.buf)))
        if safe > c.emitted or entries:
            yield fmt.chunk(i, c.buf[c.emitted : safe], entries, None, c.first)
            c.emitted, c.first = safe, False
        return
    if r.finish_reason == "error":
        code = "shutting_down" if r.error == SHUTTING_DOWN else "generation_failed"
        yield error_body(f"generation failed: {r.error}", "internal_error", code=code)
        return
    if fmt.chat:
        content, calls, reason = shape.assistant(r)
        rest = (content or "")[c.emitted :]
        if rest:
            yield fmt.chunk(i, rest, None, None, c.first)
            c.first = False
        if calls:
            yield fmt.tool_chunk(i, calls, c.first)
            c.first = False
        yield fmt.chunk(i, None, None, reason, c.first)
        return
    text, _ = fmt.generated(r)
    yield fmt.chunk(i, text[c.emitted :], None, finish_reason(r), c.first)


def _tool_limit(shape: Shape, text: str) -> int:
    """How much of a chat choice's text may be streamed as content while tool calls may still come."""
    if shape.tools is None or shape.tools.choice == "none":
        return len(text)
    return 0 if shape.tools.choice in ("named", "required") else tool_text_start(text)


def _warm_up(worker: EngineWorker) -> None:
    """One token through the engine, so the first client does not pay for lazy initialisation."""
    done = threading.Event()
    worker.submit([0], SamplingParams(max_tokens=1), lambda kind, *_: kind == "done" and done.set())
    if not done.wait(timeout=600):
        raise MiaotuiError("the engine did not answer a one-token warm-up request within 600 s")
