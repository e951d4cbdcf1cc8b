"""Run the app with uvicorn: JSON access logs, the bound address announced, SIGTERM drains then exits 0.

>>> serve("path/to/causal-lm", ServeConfig(port=8000, api_key="secret"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import uvicorn

from miaotui.checkpoint import load_model
from miaotui.engine.generate import Engine
from miaotui.engine.parallel import ParallelConfig
from miaotui.errors import MiaotuiError
from miaotui.serve.app import create_app
from miaotui.serve.config import ServeConfig
from miaotui.serve.connections import protocol
from miaotui.serve.guard import ServerState
from miaotui.serve.worker import SHUTTING_DOWN, EngineWorker

log = logging.getLogger("miaotui.serve")
FLUSH_S = 5.0  # after the drain timeout: how long the ended requests have to send their answers


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: refuse new requests (503), let in-flight ones finish (up to drain_timeout), then
    end the ones left (streams get an error event and [DONE], others a JSON 503), shut down and exit 0.
    A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float, worker: EngineWorker):
        super().__init__(config)
        self.state, self.drain_timeout, self.worker = state, drain_timeout, worker

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining:
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        log.info('{"event": "draining", "in_flight": %d}', self.state.inflight)
        threading.Thread(target=self._drain, name="miaotui-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state.inflight:
            log.warning('{"event": "drain_timeout", "in_flight": %d}', self.state.inflight)
            self.worker.abort_all(SHUTTING_DOWN)
            deadline = time.monotonic() + FLUSH_S
            while self.state.inflight and time.monotonic() < deadline:  # the handlers send their answers
                time.sleep(0.02)
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(
                    f"miaotui: serving on http://{host}:{port} (Ctrl-C or SIGTERM drains and stops)",
                    file=sys.stderr,
                    flush=True,
                )


def model_id_of(source: str | os.PathLike) -> str:
    """The name clients use: the folder's name, or the hub id as given."""
    path = Path(source)
    return path.resolve().name if path.exists() else str(source)


def serve(model: str | os.PathLike, cfg: ServeConfig, parallel: ParallelConfig | None = None, **load_options) -> None:
    """Load a causal LM, start the engine, and serve until SIGTERM/SIGINT (then drain and return).

    parallel: split the model over tp x pp processes; this one (rank 0) serves, the others follow its steps.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    options = dict(
        max_batch=cfg.max_batch,
        max_len=cfg.max_len,
        compile=cfg.compile,
        kv_dtype=cfg.kv_dtype,
        kv_cache_memory=cfg.kv_cache_memory,
        prefill_chunk=cfg.prefill_chunk,
        prefix_caching=cfg.prefix_caching,
    )
    if parallel is not None and parallel.world_size > 1:
        worker = EngineWorker(Engine(model, parallel=parallel, **options, **load_options), max_queue=cfg.max_queue)
    else:  # loaded and compiled on the engine thread, where it runs (EngineWorker.start)
        worker = EngineWorker(lambda: Engine(load_model(model, **load_options), **options), max_queue=cfg.max_queue)
    worker.start()
    engine, runner = worker.engine, worker.engine.runner
    if runner.compile_seconds is not None:
        sizes = ", ".join(map(str, runner.batch_sizes))
        log.info("compiled the decode step for batch sizes %s in %.1f s", sizes, runner.compile_seconds)
    cache = runner.cache
    log.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB), prefix caching %s, prefill chunk %s",
        cache.num_blocks,
        cache.block_size,
        cache.num_blocks * cache.block_size * cache.token_bytes() / 2**20,
        "on" if cfg.prefix_caching else "off",
        cfg.prefill_chunk or "off",
    )
    app = create_app(worker, cfg, cfg.model_name or model_id_of(model))
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
        http=protocol(cfg.header_timeout),
        limit_concurrency=cfg.max_connections,
    )
    server = DrainingServer(config, app.state.serve, cfg.drain_timeout, worker)
    try:
        server.run()
    finally:
        engine.close()
    if not server.started:
        raise MiaotuiError(f"could not listen on {cfg.host}:{cfg.port} (is the port in use?)")
