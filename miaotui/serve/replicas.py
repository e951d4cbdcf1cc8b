"""The Ray Serve application of `miaotui serve --replicas/--autoscale`: engine replicas, the ingress, the run.

See `miaotui.serve.cluster` for the design. Replicas answer forwarded requests by calling their own ASGI app
(the single-process server's, unchanged), so a replica validates, authenticates and streams exactly as
`miaotui serve` does.

>>> serve_cluster("path/to/causal-lm", ServeConfig(), ClusterConfig(replicas=2))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from miaotui.errors import MiaotuiError
from miaotui.serve.cluster import REPORT_EVERY_S, RETRIES, ClusterConfig, MetricsHub, route_key
from miaotui.serve.config import ServeConfig
from miaotui.serve.guard import error_body, key_matches
from miaotui.serve.metrics import CONTENT_TYPE, merge_replica_metrics

APP = "miaotui"
HUB = "miaotui-metrics-hub"
STALL_S = 120.0  # an engine with work that has not stepped for this long is unhealthy


class EngineReplica:
    """One engine and the single-process app around it."""

    def __init__(self, model: str, cfg: dict, load: dict, model_id: str, threads: int, parallel: dict | None = None):
        import ray
        import torch
        from ray import serve

        from miaotui.checkpoint import load_model
        from miaotui.engine.generate import Engine
        from miaotui.serve.app import _warm_up, create_app
        from miaotui.serve.worker import EngineWorker

        torch.set_num_threads(threads)
        self.cfg = ServeConfig(**cfg)
        options = {k: cfg[k] for k in ("max_batch", "max_len", "compile", "kv_cache_memory", "prefill_chunk")}
        options.update(kv_dtype=cfg["kv_dtype"], prefix_caching=cfg["prefix_caching"])
        if parallel:  # tensor/pipeline parallel inside the replica: its ranks are processes it starts
            from miaotui.engine.parallel import ParallelConfig

            engine = Engine(model, parallel=ParallelConfig(**parallel), **options, **load)
            self.worker = EngineWorker(engine, max_queue=self.cfg.max_queue)
        else:
            build = lambda: Engine(load_model(model, **load), **options)  # noqa: E731
            self.worker = EngineWorker(build, max_queue=self.cfg.max_queue)
        self.worker.start()
        self.app = create_app(self.worker, self.cfg, model_id)
        _warm_up(self.worker)
        self.app.state.serve.ready = True
        self.id = serve.get_replica_context().replica_id.unique_id
        self.hub = ray.get_actor(HUB, namespace=APP)
        threading.Thread(target=self._report, name="miaotui-metrics", daemon=True).start()

    def _report(self) -> None:
        while True:
            try:
                self.hub.report.remote(self.id, self.app.state.metrics.render().decode())
            except Exception:  # the hub is gone: the application is shutting down
                return
            time.sleep(REPORT_EVERY_S)

    def check_health(self) -> None:
        """Ray replaces the replica when this raises: the engine thread died, or has work and does not step."""
        if not self.worker.alive:
            raise RuntimeError(f"the engine thread is not running: {self.worker.failed}")
        if self.worker.stalled_for() > STALL_S:
            raise RuntimeError(f"the engine has not stepped for {self.worker.stalled_for():.0f} s")

    async def __call__(self, request: dict):
        """Answer one forwarded HTTP request: yields {"status", "headers"} first, then body chunks (bytes)."""
        messages: asyncio.Queue = asyncio.Queue()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await asyncio.Event().wait()  # until the caller goes away and the task is cancelled

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"],
            "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
            "query_string": request["query"], "root_path": "", "headers": request["headers"],
            "client": ("ray-serve", 0), "server": ("miaotui", 0),
        }  # fmt: skip
        task = asyncio.create_task(self.app(scope, receive, messages.put))
        try:
            while True:
                message = await messages.get()
                if message["type"] == "http.response.start":
                    headers = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
                    yield {"status": message["status"], "headers": [*headers, (b"x-miaotui-replica", self.id.encode())]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        return
        finally:
            if not task.done():
                task.cancel()


def _ingress_app(engines, hub, cfg: ServeConfig):
    """The FastAPI app of the ingress: forwards every request to a replica, answers /health and /metrics."""
    import ray
    from ray import serve

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        if cfg.api_key and not key_matches(request.headers.raw, cfg.api_key.encode()):
            body = error_body("missing or wrong API key: send Authorization: Bearer KEY", "authentication_error")
            return JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})
        texts = await hub.collect.remote()
        status = serve.status().applications.get(APP)
        running = 0
        if status is not None:
            deployment = status.deployments.get("EngineReplica")
            running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        return Response(merge_replica_metrics(texts, running), media_type=CONTENT_TYPE)

    @app.api_route("/{path:path}", methods=["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"])
    async def forward(path: str, request: Request):
        body = await request.body()
        req = {
            "method": request.method, "path": "/" + path, "query": request.url.query.encode(),
            "headers": [(k, v) for k, v in request.headers.raw], "body": body,
            "route_key": route_key("/" + path, body),
        }  # fmt: skip
        for attempt in range(RETRIES):
            stream = engines.options(stream=True).remote(req)
            try:
                head = await stream.__anext__()
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RuntimeError) as e:
                error = e  # no answer began: another replica may take it
                await asyncio.sleep(0.2 * (attempt + 1))
        else:
            body = error_body(f"no replica could take the request: {type(error).__name__}", "service_unavailable")
            return JSONResponse(body, status_code=503, headers={"retry-after": "1"})
        headers = {k.decode(): v.decode() for k, v in head["headers"]}
        sse = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(_rest(stream, sse), status_code=head["status"], headers=headers)

    return app


async def _rest(stream, sse: bool):
    """The body chunks after the head; a replica lost mid-answer ends a stream with an error event."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:
        if not sse:
            raise
        message = f"the replica serving this request failed: {type(e).__name__}"
        yield f"data: {json.dumps(error_body(message, 'service_unavailable', code='replica_failed'))}\n\n".encode()
        yield b"data: [DONE]\n\n"


def build_application(
    model: str, cfg: ServeConfig, cluster: ClusterConfig, load: dict, model_id: str, parallel: dict | None = None
):
    """The bound Ray Serve application (needs a connected Ray)."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    hub = (
        ray.remote(num_cpus=0)(MetricsHub)
        .options(name=HUB, namespace=APP, get_if_exists=True, lifetime="detached")
        .remote()
    )  # detached: an application built by `serve deploy` outlives the task that built it
    router = RequestRouterConfig(request_router_class="miaotui.serve.routing:PrefixAffinityRouter")
    threads = max(1, int(cluster.replica_cpus))
    engine = serve.deployment(EngineReplica, name="EngineReplica", request_router_config=router,
                              **cluster.deployment_options(cfg.max_batch))  # fmt: skip
    engines = engine.bind(str(model), asdict(cfg), load, model_id, threads, parallel)

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress(lambda: _ingress_app(serve.get_deployment_handle("EngineReplica", APP), hub, cfg))
    class Ingress:
        def __init__(self, engines):  # bound to the replicas so that they deploy with it
            self.engines = engines

    return Ingress.bind(engines)


LOAD_OPTIONS = ("dtype", "device", "allow_pickle", "trust_remote_code", "tp", "pp")


def app_builder(args: dict):
    """The application for Ray Serve's own tools: `serve run miaotui.serve.replicas:app_builder model=DIR
    replicas=2`, or `import_path` in a Serve config file (KubeRay's RayService: deploy/kuberay/rayservice.yaml).

    args: `model`, and any field of ServeConfig, of ClusterConfig (`replicas` or `autoscale: [MIN, MAX]`; neither
    gives one replica), load options (dtype, device, allow_pickle, trust_remote_code) and tp / pp (each replica
    split over that many processes).
    """
    from miaotui.serve.server import model_id_of

    model, cfg, cluster, load = parse_app_args(args)
    parallel = {k: load.pop(k) for k in ("tp", "pp") if k in load} or None
    return build_application(model, cfg, cluster, load, cfg.model_name or model_id_of(model), parallel)


def parse_app_args(args: dict) -> tuple[str, ServeConfig, ClusterConfig, dict]:
    """app_builder's arguments, checked: (model, ServeConfig, ClusterConfig, load options)."""
    from dataclasses import fields

    args = dict(args)
    if "model" not in args:
        raise MiaotuiError("the application needs a `model` argument (a folder or hub id)")
    model = str(args.pop("model"))

    def pick(names: set[str]) -> dict:
        return {k: args.pop(k) for k in list(args) if k in names}

    try:
        cfg = ServeConfig(**pick({f.name for f in fields(ServeConfig)}))
        scale = pick({f.name for f in fields(ClusterConfig)})
        if "autoscale" in scale:
            scale["autoscale"] = tuple(scale["autoscale"])
        elif "replicas" not in scale:
            scale["replicas"] = 1
        cluster = ClusterConfig(**scale)
    except (TypeError, ValueError) as e:
        raise MiaotuiError(f"bad application arguments: {e}") from None
    load = pick(set(LOAD_OPTIONS))
    if args:
        raise MiaotuiError(f"unknown application arguments: {', '.join(sorted(args))}")
    return model, cfg, cluster, load


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_cluster(
    model, cfg: ServeConfig, cluster: ClusterConfig, model_id: str, parallel: dict | None = None, **load
) -> None:
    """Start (or join) Ray, deploy the replicas and the ingress on cfg.host:cfg.port, serve until SIGTERM/SIGINT."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MiaotuiError(f"--replicas/--autoscale need Ray Serve: pip install 'miaotui[cluster]' ({e})") from None
    ray.init(address=cluster.ray_address, namespace=APP, include_dashboard=False, logging_level="warning")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        port = cfg.port or _free_port(cfg.host)
        serve.start(http_options={"host": cfg.host, "port": port})
        app = build_application(model, cfg, cluster, load, model_id, parallel)
        serve.run(app, name=APP, route_prefix="/")
        print(f"miaotui: serving on http://{cfg.host}:{port} (Ray Serve; Ctrl-C or SIGTERM stops)", file=sys.stderr)
        sys.stderr.flush()
        stop.wait()
    finally:
        serve.shutdown()
        with contextlib.suppress(ValueError):  # the metrics hub is detached: remove it from a cluster we joined
            ray.kill(ray.get_actor(HUB, namespace=APP))
        ray.shutdown()
