"""Scale-out on Ray Serve: replicas of the server behind one endpoint, a fixed count or autoscaled.

Two deployments. `EngineReplica` runs the whole single-process server (its app, validation, API key, engine
thread) and answers forwarded HTTP requests as a stream: the response's status and headers, then its body in
chunks. `Ingress` takes every HTTP request on Ray Serve's proxy, keys it by its prompt's first characters and
hands it to a replica through a deployment handle whose `PrefixAffinityRouter` sends equal keys to the same
replica (rendezvous hashing) unless its queue is full, then to the least loaded; so a shared prefix stays in one
replica's prefix cache. A replica that dies or fails before answering is tried again elsewhere (a request whose
answer had begun gets an error event or a 503); Ray replaces a replica whose health check fails (engine thread
dead or stalled). `/metrics` shows every replica's metrics (label `replica`), their sums, and the replica count.

>>> serve_cluster("path/to/causal-lm", ServeConfig(port=8000), ClusterConfig(replicas=2))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("miaotui.serve")
ROUTE_CHARS = 2048  # characters of the prompt that key its route (~512 tokens)
REPORT_EVERY_S = 2.0  # replicas send their metrics this often
RETRIES = 3  # replicas tried for a request that got no answer yet


@dataclass(frozen=True)
class ClusterConfig:
    """How many replicas, and what each gets.

    replicas: a fixed count; autoscale: (min, max) replicas following ongoing requests per replica
    (target_ongoing_requests), adding after upscale_delay_s and removing after downscale_delay_s of the load
    staying above or below it. replica_cpus / replica_gpus: Ray resources per replica (its torch threads = cpus).
    ray_address: join that cluster ("auto", "ray://host:10001", ...); None starts a local one for the command.

    >>> ClusterConfig(autoscale=(3, 1))
    Traceback (most recent call last):
    ...
    ValueError: autoscale needs 1 <= min <= max, got (3, 1)
    """

    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ray_address: str | None = None

    def __post_init__(self):
        if (self.replicas is None) == (self.autoscale is None):
            raise ValueError("give either replicas or autoscale")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale needs 1 <= min <= max, got {self.autoscale}")
        if self.replica_cpus <= 0 or self.replica_gpus < 0 or self.target_ongoing_requests <= 0:
            raise ValueError("replica_cpus and target_ongoing_requests must be > 0, replica_gpus >= 0")

    def deployment_options(self, max_batch: int) -> dict:
        scaling = {"num_replicas": self.replicas}
        if self.autoscale is not None:
            low, high = self.autoscale
            scaling = {"autoscaling_config": {
                "min_replicas": low, "max_replicas": high, "initial_replicas": low,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            }}  # fmt: skip
        return {
            **scaling,
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            "max_ongoing_requests": 2 * max_batch,  # beyond it a prefix's replica counts as overloaded
            "health_check_period_s": 5.0,
            "health_check_timeout_s": 30.0,
        }


def route_key(path: str, body: bytes) -> str | None:
    """A hash of the prompt's first ROUTE_CHARS characters (first prompt; chat: the messages' text), or None.

    >>> route_key("/v1/completions", b'{"prompt": "abc"}') == route_key("/v1/completions", b'{"prompt": ["abc"]}')
    True
    """
    try:
        body_json = json.loads(body) if path.endswith("completions") else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body_json, dict):
        return None
    prompt = body_json.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = " ".join(map(str, prompt[: ROUTE_CHARS // 4]))
    messages = body_json.get("messages")
    if isinstance(messages, list):
        prompt = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    if not isinstance(prompt, str):
        return None
    return hashlib.sha256(prompt[:ROUTE_CHARS].encode("utf-8", "replace")).hexdigest()


class MetricsHub:
    """A Ray actor holding each replica's latest metrics text."""

    def __init__(self):
        self.texts: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def collect(self, max_age_s: float = 5 * REPORT_EVERY_S) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {k: v for k, v in self.texts.items() if now - v[0] <= max_age_s}
        return {k: text for k, (_, text) in self.texts.items()}
