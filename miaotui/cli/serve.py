"""Subcommand that serves a model: serve."""

from __future__ import annotations

import argparse
import dataclasses

from miaotui.cli.common import (
    EPILOG,
    add_engine_options,
    add_load_options,
    add_parallel_options,
    load_kwargs,
    memory_size,
    parallel_config,
    positive,
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def register(sub) -> None:
    from miaotui.engine.scheduler import PREFILL_CHUNK

    p = sub.add_parser(
        "serve",
        help="serve a causal LM behind an OpenAI-compatible HTTP API",
        description="Serve MODEL (plain or optimized folder, or hub id) on miaotui's engine with continuous "
        "batching: POST /v1/completions and /v1/chat/completions (streaming with SSE), GET /v1/models, "
        "/health, /ready and /metrics (Prometheus). Listens on 127.0.0.1 unless --host says otherwise. "
        "SIGTERM or Ctrl-C stops taking requests, finishes the ones in flight, and exits.",
        epilog="The API key can also come from $MIAOTUI_API_KEY. " + EPILOG,
    )
    p.add_argument("model", help="causal LM folder (plain or optimized) or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health and /ready")
    p.add_argument("--model-name", help="the model id clients pass (default: the folder's name)")
    p.add_argument("--max-batch", type=positive, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-len", type=positive, help="positions per sequence (default: the context, at most 2048)")
    p.add_argument("--max-queue", type=positive, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=positive, default=4096, help="largest max_tokens (default 4096)")
    p.add_argument("--max-n", type=positive, default=16, help="most choices (n) per prompt (default 16)")
    p.add_argument("--max-prompts", type=positive, default=64, help="most prompts in one request (default 64)")
    p.add_argument("--max-body", type=positive, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument(
        "--max-connections", type=positive, default=1024, help="open connections at most; more get 503 (default 1024)"
    )
    p.add_argument(
        "--header-timeout", type=_seconds, default=10.0, help="seconds to send a request's headers (default 10)"
    )
    p.add_argument("--request-timeout", type=_seconds, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--drain-timeout", type=_seconds, default=30.0, help="seconds SIGTERM waits (default 30)")
    p.add_argument("--log-prompts", action="store_true", help="include prompt text in the access log")
    add_engine_options(p, compile_default=True)
    p.add_argument(
        "--kv-cache-memory",
        type=memory_size,
        help="memory for the paged KV cache, e.g. 512MiB or 4GiB (default: room for --max-batch sequences of "
        "--max-len positions); sequences take 16-token blocks as they grow, and the latest admitted is preempted "
        "and recomputed when none is left",
    )
    p.add_argument(
        "--prefill-chunk",
        type=lambda text: positive(text, minimum=0),
        default=PREFILL_CHUNK,
        help=f"prompt tokens computed per engine step, so long prompts do not stall streams being decoded "
        f"(default {PREFILL_CHUNK}; 0: whole prompts at once)",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes seen before, e.g. a shared system prompt (default on)",
    )
    add_load_options(p)
    add_parallel_options(p)
    _add_cluster_options(p)
    p.set_defaults(func=cmd_serve)


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    if not (low.isdigit() and high.isdigit()) or not 1 <= int(low) <= int(high):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas with 1 <= MIN <= MAX, got {text!r}")
    return int(low), int(high)


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "scale-out on Ray Serve (pip install 'miaotui[cluster]')",
        "Several engine replicas behind this one endpoint; requests sharing a prompt prefix go to the same replica "
        "unless it is full. Without --ray-address a local Ray cluster starts and stops with the command.",
    )
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive, help="serve with this many replicas")
    scale.add_argument("--autoscale", type=_range, metavar="MIN:MAX", help="replicas following the load")
    g.add_argument("--target-ongoing-requests", type=_seconds, default=16.0,
                   help="autoscale: requests in flight per replica to aim for (default 16)")  # fmt: skip
    g.add_argument("--upscale-delay", type=_seconds, default=5.0, help="autoscale: seconds of load before adding")
    g.add_argument("--downscale-delay", type=_seconds, default=30.0, help="autoscale: idle seconds before removing")
    g.add_argument("--replica-cpus", type=_seconds, default=1.0, help="CPUs per replica (its threads; default 1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    g.add_argument("--ray-address", help="join this Ray cluster (e.g. auto, ray://head:10001)")


def cmd_serve(a: argparse.Namespace) -> None:
    from miaotui.serve import ServeConfig, serve

    cfg = ServeConfig(
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        model_name=a.model_name,
        max_batch=a.max_batch,
        max_len=a.max_len,
        max_queue=a.max_queue,
        max_tokens_limit=a.max_tokens_limit,
        max_n=a.max_n,
        max_prompts=a.max_prompts,
        max_body_bytes=a.max_body,
        max_connections=a.max_connections,
        header_timeout=a.header_timeout,
        request_timeout=a.request_timeout,
        drain_timeout=a.drain_timeout,
        compile=a.compile,
        kv_dtype=a.kv_cache,
        kv_cache_memory=a.kv_cache_memory,
        prefill_chunk=a.prefill_chunk or None,
        prefix_caching=a.prefix_caching,
        log_prompts=a.log_prompts,
    )
    if a.replicas or a.autoscale:
        return _serve_cluster(a, cfg)
    serve(a.model, cfg, parallel_config(a), **load_kwargs(a))


def _serve_cluster(a: argparse.Namespace, cfg) -> None:
    from miaotui.errors import MiaotuiError
    from miaotui.serve.cluster import ClusterConfig
    from miaotui.serve.replicas import serve_cluster
    from miaotui.serve.server import model_id_of

    try:
        cluster = ClusterConfig(
            replicas=a.replicas, autoscale=a.autoscale, target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay, downscale_delay_s=a.downscale_delay, replica_cpus=a.replica_cpus,
            replica_gpus=a.replica_gpus, ray_address=a.ray_address,
        )  # fmt: skip
    except ValueError as e:
        raise MiaotuiError(str(e)) from None
    parallel = parallel_config(a)
    parallel = dataclasses.asdict(parallel) if parallel is not None else None  # each replica split over processes
    serve_cluster(a.model, cfg, cluster, cfg.model_name or model_id_of(a.model), parallel, **load_kwargs(a))
