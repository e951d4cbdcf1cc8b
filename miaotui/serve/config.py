"""ServeConfig: everything `miaotui serve` can be told, validated before the model loads.

>>> ServeConfig(port=8080, api_key="secret").host
'127.0.0.1'
>>> ServeConfig(max_queue=0)
Traceback (most recent call last):
...
ValueError: max_queue must be >= 1, got 0
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from miaotui.engine.cache import KV_DTYPES
from miaotui.engine.scheduler import PREFILL_CHUNK

API_KEY_ENV = "MIAOTUI_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens, whom it lets in and how much it takes on.

    host/port: where to listen (loopback only unless host says otherwise). api_key: required as
    `Authorization: Bearer KEY` on every route but /health and /ready (default: $MIAOTUI_API_KEY; none = open).
    model_name: the id clients pass as `model` (default: the model folder's name).
    max_batch: sequences decoded together; max_len: positions per sequence (prompt + completion; default the
    model's context, at most 2048). max_queue: requests waiting for a free sequence slot before 429.
    max_tokens_limit: the largest max_tokens a request may ask for. max_n: the most choices (n) per prompt.
    max_prompts: the most prompts in one completions request (a batch). max_body_bytes: larger request bodies
    get 413. max_connections: open connections at most (more get 503). header_timeout: seconds a client has
    to send a request's headers before the connection is closed (slow clients cannot hold connections).
    request_timeout: seconds before a request is aborted.
    drain_timeout: seconds SIGTERM waits for in-flight requests. log_prompts: put prompt text in access logs.
    compile: compile the decode step for every batch size the scheduler runs (1, 2, 4, ... max_batch) before
    the server reports ready. kv_dtype: the KV cache's storage. kv_cache_memory: bytes for the paged KV cache
    (default: room for max_batch sequences of max_len positions). prefill_chunk: prompt tokens computed per
    engine step (None: whole prompts). prefix_caching: reuse the KV cache blocks of shared prompt prefixes.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_batch: int = 32
    max_len: int | None = None
    max_queue: int = 64
    max_tokens_limit: int = 4096
    max_n: int = 16
    max_prompts: int = 64
    max_body_bytes: int = 1 << 20
    max_connections: int = 1024
    header_timeout: float = 10.0
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    compile: bool = True
    kv_dtype: str = "auto"
    kv_cache_memory: int | None = None
    prefill_chunk: int | None = PREFILL_CHUNK
    prefix_caching: bool = True
    log_prompts: bool = False

    def __post_init__(self):
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
        positive = (
            "max_batch",
            "max_queue",
            "max_tokens_limit",
            "max_n",
            "max_prompts",
            "max_body_bytes",
            "max_connections",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("kv_cache_memory", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("request_timeout", "drain_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key:
            raise ValueError(f"api_key must not be empty (unset it, or {API_KEY_ENV}, for an open server)")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
