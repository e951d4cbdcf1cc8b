"""Prometheus metrics of one server: requests by route and status, queue, latency histograms, tokens.

>>> m = Metrics(queue_depth=lambda: 0, running=lambda: 0)
>>> m.observe("ttft", 0.05)
>>> b"miaotui_time_to_first_token_seconds_count 1.0" in m.render()
True
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


_ENGINE_GAUGES = (
    ("blocks_used", "miaotui_kv_cache_blocks_used", "KV cache blocks held by sequences"),
    ("blocks_free", "miaotui_kv_cache_blocks_free", "KV cache blocks free (empty, or cached and evictable)"),
    ("blocks_total", "miaotui_kv_cache_blocks_total", "KV cache blocks"),
    ("prefix_hit_rate", "miaotui_prefix_cache_hit_rate", "share of prompt tokens found in the prefix cache"),
    ("prefix_hit_tokens", "miaotui_prefix_cache_hit_tokens", "prompt tokens found in the prefix cache"),
    ("preemptions", "miaotui_preemptions", "sequences preempted (blocks released, recomputed later)"),
)


class Metrics:
    """A registry of its own (several servers in one process do not collide)."""

    def __init__(
        self,
        queue_depth: Callable[[], int],
        running: Callable[[], int],
        compile_seconds: float = 0.0,
        engine_stats: Callable[[], dict] | None = None,
    ):
        self.registry = r = CollectorRegistry()
        Gauge("miaotui_compile_seconds", "time spent compiling decode steps at start", registry=r).set(compile_seconds)
        self.requests = Counter(
            "miaotui_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        Gauge("miaotui_queue_depth", "requests waiting for a sequence slot", registry=r).set_function(queue_depth)
        Gauge("miaotui_running_requests", "requests being decoded", registry=r).set_function(running)
        if engine_stats is not None:  # the scheduler's KV cache and prefix cache (`Scheduler.stats`)
            for key, name, doc in _ENGINE_GAUGES:
                Gauge(name, doc, registry=r).set_function(lambda key=key: engine_stats()[key])
        self.ttft = Histogram(
            "miaotui_time_to_first_token_seconds",
            "time from submission to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "miaotui_inter_token_latency_seconds",
            "time between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated = Counter("miaotui_generated_tokens", "completion tokens generated", registry=r)
        self.prompt = Counter("miaotui_prompt_tokens", "prompt tokens accepted", registry=r)

    def observe(self, name: str, value: float) -> None:
        """Engine-side events: ("ttft"|"itl", seconds) or ("tokens", count)."""
        if name == "ttft":
            self.ttft.observe(value)
        elif name == "itl":
            self.itl.observe(value)
        elif name == "tokens":
            self.generated.inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_replica_metrics(texts: dict[str, str], replicas_running: int) -> bytes:
    """Prometheus text of several replicas: each sample once per replica (label `replica`) and once over all of
    them (`replica="all"`: summed, rates averaged), and `miaotui_replicas_running`.

    >>> one = "# TYPE miaotui_queue_depth gauge\\nmiaotui_queue_depth 2.0\\n"
    >>> print(merge_replica_metrics({"a": one, "b": one}, 2).decode().strip())
    # TYPE miaotui_queue_depth gauge
    miaotui_queue_depth{replica="a"} 2.0
    miaotui_queue_depth{replica="b"} 2.0
    miaotui_queue_depth{replica="all"} 4.0
    # TYPE miaotui_replicas_running gauge
    miaotui_replicas_running 2
    """
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, list]] = {}  # name -> (type, [(sample name, labels, value)])
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            kind, samples = families.setdefault(family.name, (family.type, []))
            for s in family.samples:
                if not s.name.endswith("_created"):
                    samples.append((s.name, {**s.labels, "replica": replica}, s.value))
    lines = []
    for name, (kind, samples) in families.items():
        if not samples:
            continue
        lines.append(f"# TYPE {name} {kind}")
        totals: dict[tuple, list[float]] = {}
        for sample, labels, value in samples:
            lines.append(f"{sample}{_labels(labels)} {value}")
            key = (sample, tuple(sorted((k, v) for k, v in labels.items() if k != "replica")))
            totals.setdefault(key, []).append(value)
        for (sample, labels), values in totals.items():  # rates average over replicas, the rest add up
            value = sum(values) / len(values) if sample.endswith("_rate") else sum(values)
            lines.append(f"{sample}{_labels({**dict(labels), 'replica': 'all'})} {value}")
    lines += ["# TYPE miaotui_replicas_running gauge", f"miaotui_replicas_running {replicas_running}"]
    return ("\n".join(lines) + "\n").encode()


def _labels(labels: dict) -> str:
    def escape(value) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"
