"""Scale-out on Ray Serve: `miaotui serve --replicas/--autoscale` as a subprocess with a local Ray cluster, driven
by the `openai` client and httpx; the routing key, the metrics merge and the config without Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import MODEL, PROMPTS, Server

from miaotui.engine.generate import Engine
from miaotui.engine.sampling import SamplingParams
from miaotui.serve.cluster import ClusterConfig, route_key
from miaotui.serve.metrics import merge_replica_metrics

ray = pytest.importorskip("ray")  # the dev extra installs it; users: the cluster extra


def test_route_key_follows_the_prompt_start():
    shared = "x" * 3000
    a = route_key("/v1/completions", json.dumps({"prompt": shared + "question one"}).encode())
    b = route_key("/v1/completions", json.dumps({"prompt": [shared + "question two", "other"]}).encode())
    chat = route_key("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": shared}]}).encode())
    assert a == b == chat
    assert route_key("/v1/completions", json.dumps({"prompt": "y" + shared}).encode()) != a
    assert route_key("/v1/completions", b"not json") is None and route_key("/v1/models", b"") is None


def test_metrics_merge_and_config_checks():
    text = "# TYPE miaotui_prefix_cache_hit_rate gauge\nmiaotui_prefix_cache_hit_rate 0.5\n"
    text += "# TYPE miaotui_generated_tokens counter\nmiaotui_generated_tokens_total 10.0\n"
    merged = merge_replica_metrics({"a": text, "b": text.replace("0.5", "0.25")}, 2).decode()
    assert 'miaotui_prefix_cache_hit_rate{replica="all"} 0.375' in merged
    assert 'miaotui_generated_tokens_total{replica="all"} 20.0' in merged and "miaotui_replicas_running 2" in merged
    for bad in ({}, {"replicas": 0}, {"replicas": 2, "autoscale": (1, 2)}, {"autoscale": (2, 1)}):
        with pytest.raises(ValueError):
            ClusterConfig(**bad)


class Cluster(Server):
    def replicas_running(self) -> int:
        return int(self.metric("miaotui_replicas_running"))

    def replica_metric(self, name: str) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with self.http() as c:
            text = c.get("/metrics").text
        return {
            s.labels["replica"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and s.labels.get("replica") != "all"
        }

    def wait_replicas(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.replicas_running() != count:
            assert time.monotonic() < deadline, f"replicas never became {count}:\n{self.events()}"
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ref_llama):
    s = Cluster(
        tmp_path_factory.mktemp("cluster") / "server.log", "--replicas", "2", "--no-compile", "--max-batch", "4",
        "--max-len", "1024",
    )  # fmt: skip
    s.wait_replicas(2, timeout=120)
    yield s
    s.stop()


@pytest.mark.slow
def test_two_replicas_answer_like_one_process(cluster, ref_llama):
    import miaotui

    engine = Engine(miaotui.load(ref_llama, dtype="float32"), max_batch=4, max_len=128)
    client = cluster.openai()
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(
            lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text,
            PROMPTS,
        ))  # fmt: skip
    ids = [engine.lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert served == [r.text for r in engine.generate(ids, SamplingParams(max_tokens=12))]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices[0].message.content is not None
    with cluster.http(key="wrong") as c:
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        assert c.get("/metrics").status_code == 401


@pytest.mark.slow
def test_shared_prefix_lands_on_one_replica(cluster, ref_llama):
    system = (ref_llama.parent / "wikitext-2-raw" / "wiki.test.raw").read_text()[5000:7500]  # ~512 tokens
    before = cluster.replica_metric("miaotui_prefix_cache_hit_tokens")
    with cluster.http() as c:
        served_by = {
            c.post(
                "/v1/completions", json={"model": MODEL, "prompt": f"{system} Question {i}:", "max_tokens": 2}
            ).headers["x-miaotui-replica"]
            for i in range(8)
        }
    assert len(served_by) == 1
    (replica,) = served_by
    time.sleep(5)  # replicas report their metrics every 2 s
    hits = cluster.replica_metric("miaotui_prefix_cache_hit_tokens")
    assert hits[replica] - before.get(replica, 0) >= 7 * 448  # 7 of 8 requests reuse >= 28 blocks of the prefix


@pytest.mark.slow
def test_a_killed_replica_loses_no_request_silently(cluster):
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    def one(i):
        try:
            with cluster.http(timeout=120) as c:
                return c.post("/v1/completions", json={**body, "prompt": f"Request {i}:"}).status_code
        except httpx.HTTPError as e:
            return type(e).__name__

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        time.sleep(1.0)
        pids = subprocess.run(["pgrep", "-f", "ServeReplica:miaotui:EngineReplica"], capture_output=True, text=True)
        os.kill(int(pids.stdout.split()[0]), signal.SIGKILL)
        statuses = [f.result(timeout=180) for f in futures]  # none hangs
    assert all(s in (200, 503) for s in statuses), statuses  # completed, or a clear 503 error
    assert statuses.count(200) >= 25, statuses
    cluster.wait_replicas(2, timeout=180)  # Ray starts a new one
    with cluster.http() as c:
        assert c.post("/v1/completions", json={**body, "prompt": "after"}).status_code == 200


@pytest.mark.slow
def test_autoscaling_follows_the_load(tmp_path, ref_llama):
    s = Cluster(
        tmp_path / "server.log", "--autoscale", "1:2", "--target-ongoing-requests", "2", "--upscale-delay", "2",
        "--downscale-delay", "5", "--no-compile", "--max-batch", "4", "--max-len", "512",
    )  # fmt: skip
    try:
        s.wait_replicas(1, timeout=120)
        body = {"model": MODEL, "prompt": "Load:", "max_tokens": 400, "ignore_eos": True}
        stop, up = time.monotonic() + 150, False

        def load():
            while time.monotonic() < stop and not up:
                with s.http(timeout=300) as c:
                    c.post("/v1/completions", json=body)

        with ThreadPoolExecutor(8) as pool:
            for _ in range(8):
                pool.submit(load)
            while time.monotonic() < stop and not up:
                up = s.replicas_running() == 2
                time.sleep(1)
        assert up, f"no second replica under load:\n{s.events()}"
        s.wait_replicas(1, timeout=120)  # idle again: back to one after the downscale delay
    finally:
        s.stop()


def test_kuberay_manifest_parses_and_its_arguments_check():
    import importlib

    import yaml

    from miaotui.errors import MiaotuiError
    from miaotui.serve.replicas import parse_app_args

    doc = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    model, cfg, cluster, load = parse_app_args(app["args"])
    assert cluster.autoscale == (1, 4) and cfg.max_batch == 32 and load == {"dtype": "bfloat16"}
    with pytest.raises(MiaotuiError, match="unknown application arguments: bogus"):
        parse_app_args({**app["args"], "bogus": 1})
    with pytest.raises(MiaotuiError, match="autoscale"):
        parse_app_args({**app["args"], "autoscale": [3, 1]})


@pytest.mark.slow
def test_tensor_parallel_inside_a_replica(tmp_path, ref_llama):
    import miaotui

    s = Cluster(tmp_path / "server.log", "--replicas", "1", "--tp", "2", "--replica-cpus", "2", "--no-compile",
                "--max-batch", "4", "--max-len", "128")  # fmt: skip
    try:
        s.wait_replicas(1, timeout=180)
        client = s.openai()
        served = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
                  for p in PROMPTS[:3]]  # fmt: skip
    finally:
        s.stop()
    engine = Engine(miaotui.load(ref_llama, dtype="float32"), max_batch=4, max_len=128)
    ids = [engine.lm.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    assert served == [r.text for r in engine.generate(ids, SamplingParams(max_tokens=8))]
