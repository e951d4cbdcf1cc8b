"""The OpenAI-compatible server, run as a real subprocess and driven by the real `openai` client and httpx."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REF_LLAMA
from openai import OpenAI

from miaotui.errors import MiaotuiError

KEY = "test-key-123"
MODEL = "ref-llama-16m"
PROMPTS = [
    "The city of",
    "In 1990, the",
    "def main():",
    "Once upon a time",
    "The river flows",
    "import numpy as",
    "She said that",
    "The first",
]


class Server:
    """`miaotui serve` in a subprocess on a free port; stderr (the access log) goes to a file."""

    def __init__(self, log: Path, *args: str, model: Path = REF_LLAMA, key: str | None = KEY):
        self.log_path = log
        cmd = [sys.executable, "-m", "miaotui.cli", "serve", str(model), "--port", "0", "--dtype", "float32", *args]
        if key:
            cmd += ["--api-key", key]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            found = re.search(r"serving on (http://[\d.]+:\d+)", self.log())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> str:
        """The log without /metrics polls."""
        return "\n".join(line for line in self.log().splitlines() if '"/metrics"' not in line)[-3000:]

    def http(self, key: str | None = KEY, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with self.http() as c:
            text = c.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        raise KeyError(name)

    def wait_for(self, name: str, value: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never became {value}:\n{self.events()}"
            time.sleep(0.05)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, ref_llama):
    s = Server(
        tmp_path_factory.mktemp("serve") / "server.log",
        "--max-batch", "8", "--max-len", "128", "--max-tokens-limit", "32", "--max-n", "4", "--max-body", "200000",
    )  # fmt: skip
    yield s
    s.stop()


def test_health_ready_models(server):
    with server.http(key=None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200
    assert [m.id for m in server.openai().models.list()] == [MODEL]


def test_stream_and_plain_give_the_same_text_under_greedy(server):
    client = server.openai()
    for prompt in PROMPTS[:3]:
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "length"
        assert plain.usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_greedy_text_matches_the_engine(server, ref_llama):
    from miaotui.api import Engine, SamplingParams

    engine = Engine(ref_llama, dtype="float32")
    expected = engine.generate(PROMPTS[0], SamplingParams(max_tokens=16))[0].text
    got = server.openai().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert got.choices[0].text == expected


def test_stop_strings_are_cut_in_both_modes(server):
    client = server.openai()
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0).choices[0].text
    stop = full[6:9]  # a piece from the middle of the greedy completion
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert plain.choices[0].text == full[: full.index(stop)]
    assert plain.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_seeded_sampling_n_and_logprobs(server):
    client = server.openai()
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0.9, seed=7, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_32_concurrent_clients_match_sequential(server):
    client = server.openai()
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]  # 32 distinct prompts

    def ask(prompt: str) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential


BAD = [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 33}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": "x", "n": 10**6}, 400, "n"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "seed": 1.5}, 400, "seed"),
    ({"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, None),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "word " * 120, "max_tokens": 32}, 400, "max_tokens"),
    ({"prompt": "x", "model": "other-model"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    with server.http() as c:
        r = c.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
        # this model has no chat template, so no tool support: refused by name
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
    ],
)
def test_bad_chat_requests_get_400(server, body):
    with server.http() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400 and "error" in r.json()


def test_malformed_and_oversized_bodies(server):
    with server.http() as c:
        bad_json = c.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
        not_object = c.post("/v1/completions", json=[1, 2])
        assert not_object.status_code == 400
        rss = server.rss_kib()
        t0 = time.monotonic()
        huge = c.post("/v1/completions", json={"model": MODEL, "prompt": "a" * (1 << 20)})
        many = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 10**6})
        assert huge.status_code == 413 and many.status_code == 400
        assert time.monotonic() - t0 < 5
        assert server.rss_kib() - rss < 20_000  # no memory growth from refused requests


def test_every_route_needs_the_key_except_health_and_ready(server, tiny_models):
    from miaotui.api import Engine
    from miaotui.serve import ServeConfig, create_app

    app = create_app(Engine(tiny_models["llama"], dtype="float32"), ServeConfig(api_key="x"), model_id="m")
    routes = [(m, re.sub(r"\{[^}]+\}", "anything", r.path)) for r in app.routes for m in getattr(r, "methods", ())]
    assert {p for _, p in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics"}
    with server.http(key=None) as anon, server.http(key="wrong") as wrong:
        for method, path in routes:
            for client in (anon, wrong):
                status = client.request(method, path).status_code
                if path in ("/health", "/ready"):
                    assert status == 200, (method, path)
                else:
                    assert status == 401, (method, path)
                    if method != "HEAD":
                        assert client.request(method, path).json()["error"]["code"] == "invalid_api_key"


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.openai().completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    with server.http() as c:
        text = c.get("/metrics").text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name in (
        "miaotui_requests_total",
        "miaotui_queue_depth",
        "miaotui_running_requests",
        "miaotui_time_to_first_token_seconds_count",
        "miaotui_inter_token_latency_seconds_bucket",
        "miaotui_generated_tokens_total",
    ):
        assert name in names
    assert server.metric("miaotui_generated_tokens_total") >= 3
    # compiled by default, for every batch size the scheduler runs, before the server listened
    assert server.metric("miaotui_compile_seconds") > 0
    assert "compiled the decode step for batch sizes 1, 2, 4, 8 in" in server.log()
    # the paged KV cache: 8 rows of 128 positions in 16-token blocks, all back after the requests
    assert server.metric("miaotui_kv_cache_blocks_total") == 8 * 128 // 16
    assert server.metric("miaotui_kv_cache_blocks_used") == 0
    assert "KV cache: 64 blocks of 16 tokens" in server.log()
    # a repeated prompt of 40+ tokens finds its first two blocks in the prefix cache
    hits = server.metric("miaotui_prefix_cache_hit_tokens")
    prompt = "The river runs through the old town and past the mill, " * 4
    for _ in range(2):
        server.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert server.metric("miaotui_prefix_cache_hit_tokens") - hits >= 32
    assert 0 < server.metric("miaotui_prefix_cache_hit_rate") < 1
    assert server.metric("miaotui_preemptions") == 0


def test_access_log_has_no_prompt_text(server):
    secret = "zebra-quartz-7781"
    server.openai().completions.create(model=MODEL, prompt=secret, max_tokens=2, temperature=0)
    time.sleep(0.2)
    log = server.log()
    assert '"route": "/v1/completions"' in log and secret not in log


def test_schema_fuzz_finds_no_server_error(server, tmp_path):
    """Property-based requests generated from the server's OpenAPI schema: none may get a 5xx."""
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
        "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing", "--max-examples", "25",
        "--header", f"Authorization: Bearer {KEY}", "--seed", "1", "--workers", "1", "--request-timeout", "60",
        "--suppress-health-check", "all",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_queue_disconnect_and_sigterm_drain(tmp_path, ref_llama):
    s = Server(tmp_path / "server.log", "--max-batch", "1", "--max-queue", "1", "--max-len", "512")
    try:
        body = {"model": MODEL, "prompt": "The city of", "max_tokens": 400, "temperature": 0}
        # a streaming client holds the only row, then goes away mid-stream: its row is freed
        with s.http() as c, c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()  # kept: closing this iterator closes the connection
            assert next(lines).startswith("data: ")
            s.wait_for("miaotui_running_requests", 1)
        s.wait_for("miaotui_running_requests", 0, timeout=10)

        # the row busy, one request waiting: the next one gets 429 with Retry-After
        results = {}

        def run(name, payload):
            with s.http(timeout=300) as c:
                results[name] = c.post("/v1/completions", json=payload)

        first = threading.Thread(target=run, args=("first", body))
        first.start()
        s.wait_for("miaotui_running_requests", 1)
        second = threading.Thread(target=run, args=("second", {**body, "max_tokens": 4}))
        second.start()
        s.wait_for("miaotui_queue_depth", 1)
        with s.http() as c:
            over = c.post("/v1/completions", json={**body, "max_tokens": 4})
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["type"] == "rate_limit_error"

        # SIGTERM: new requests get 503, the ones in flight finish, the process exits 0
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:
            with s.http(key=None) as c:
                if c.get("/ready").status_code == 503:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with s.http() as c:
            assert c.post("/v1/completions", json=body).status_code == 503
        first.join(timeout=300)
        second.join(timeout=300)
        assert results["first"].status_code == 200 and results["first"].json()["usage"]["completion_tokens"] == 400
        assert results["second"].status_code == 200
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()


def test_serve_refuses_bad_setups(tmp_path, minilm, ref_llama):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "miaotui.cli", "serve"]
    encoder = subprocess.run([*run, str(minilm)], capture_output=True, text=True, env=env, timeout=300)
    assert encoder.returncode == 2 and "causal LM" in encoder.stderr
    missing = subprocess.run([*run, str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    small = subprocess.run(
        [*run, str(ref_llama), "--no-compile", "--kv-cache-memory", "64KiB"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert small.returncode == 2 and "too few for one sequence of 1024 positions" in small.stderr
    unit = subprocess.run([*run, str(ref_llama), "--kv-cache-memory", "lots"], capture_output=True, text=True)
    assert unit.returncode == 2 and "expected a positive size such as 512MiB" in unit.stderr


def test_a_failing_request_fails_alone(tiny_models):
    """An exception while handling one request (here its consumer raises) fails that request, not the others."""
    from miaotui.api import Engine, SamplingParams
    from miaotui.serve.worker import EngineWorker

    engine = Engine(tiny_models["llama"], dtype="float32", max_batch=2)
    expected = engine.generate([5, 6, 7], SamplingParams(max_tokens=6))[0].token_ids
    worker = EngineWorker(engine, max_queue=4)
    worker.start()
    done = threading.Semaphore(0)

    def good(kind, job, token, delta):
        if kind == "done":
            done.release()

    def broken(kind, job, token, delta):
        if kind == "done":
            done.release()
        raise RuntimeError("the consumer broke")

    try:
        bad_job = worker.submit([1, 2, 3], SamplingParams(max_tokens=6), broken)
        good_job = worker.submit([5, 6, 7], SamplingParams(max_tokens=6), good)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        assert bad_job.request.finish_reason == "error" and "consumer broke" in bad_job.request.error
        assert good_job.request.finish_reason == "length" and good_job.request.tokens == expected
        later = worker.submit([5, 6, 7], SamplingParams(max_tokens=6), good)  # the engine still serves
        assert done.acquire(timeout=60) and later.request.tokens == expected
    finally:
        worker.stop()


def test_worker_builds_its_engine_on_its_own_thread(tiny_models):
    """Given a builder, the worker builds (loads, compiles) the engine on the engine thread, where it then
    steps it; a builder's error comes out of start()."""
    from miaotui.api import Engine, SamplingParams
    from miaotui.serve.worker import EngineWorker

    threads = []

    def build():
        threads.append(threading.current_thread().name)
        return Engine(tiny_models["llama"], dtype="float32", max_batch=2, max_len=32, compile=True)

    worker = EngineWorker(build, max_queue=4)
    worker.start()
    done = threading.Event()
    try:
        assert threads == ["miaotui-engine"] and worker.engine.runner.compile_seconds > 0
        job = worker.submit([5, 6, 7], SamplingParams(max_tokens=4), lambda kind, *_: kind == "done" and done.set())
        assert done.wait(timeout=60) and len(job.request.tokens) == 4
    finally:
        worker.stop()

    def broken():
        raise MiaotuiError("no such model")

    with pytest.raises(MiaotuiError, match="no such model"):
        EngineWorker(broken).start()


def test_tensor_parallel_server_matches_one_process(server, tmp_path):
    """`serve --tp 2`: rank 0 serves, rank 1 follows; idle pings keep it within a short collective timeout."""
    s = Server(tmp_path / "tp.log", "--tp", "2", "--dist-timeout", "2", "--max-len", "128", "--max-batch", "4")
    try:
        tp, one = s.openai(), server.openai()

        def ask(client, prompt):
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

        assert ask(tp, PROMPTS[0]) == ask(one, PROMPTS[0])
        time.sleep(3)  # longer than the collective timeout, with nothing to do
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda p: ask(tp, p), PROMPTS[:4])) == [ask(one, p) for p in PROMPTS[:4]]
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()
