"""The OpenAI fields real clients send (structured outputs, tools, logit_bias, echo with prompt logprobs, prompt
batches) and the server's hardening against hostile input, on a real server subprocess with the `openai` client,
httpx and raw sockets."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time

import httpx
import jsonschema
import pytest
import torch
from openai import BadRequestError
from test_serve import KEY, Server

import miaotui

TEMPLATE = __import__("pathlib").Path(__file__).parent / "data" / "tool_chat_template.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
}


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, ref_llama):
    """ref-llama-16m with a chat template that renders tools (Hermes style, `<tool_call>` blocks)."""
    folder = tmp_path_factory.mktemp("tool-model") / "ref-llama-tools"
    folder.mkdir()
    for f in ref_llama.iterdir():
        (folder / f.name).symlink_to(f)
    shutil.copy(TEMPLATE, folder / "chat_template.jinja")
    return folder


@pytest.fixture(scope="module")
def api(tmp_path_factory, tool_model):
    s = Server(
        tmp_path_factory.mktemp("serve-api") / "server.log", "--max-batch", "4", "--max-len", "512",
        "--max-n", "4", "--max-prompts", "24", "--header-timeout", "1", "--max-connections", "16",
        model=tool_model,
    )  # fmt: skip
    s.model = tool_model.name
    yield s
    s.stop()


def test_json_schema_outputs_validate(api):
    client = api.openai()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):  # sampled: different outputs, every one valid
        r = client.chat.completions.create(
            model=api.model, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=96,
            temperature=0.9, seed=seed, response_format=fmt,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    streamed = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "A person"}], max_tokens=96, temperature=0,
        response_format=fmt, stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    completion = client.completions.create(
        model=api.model, prompt="Person:", max_tokens=96, temperature=0, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    plain = client.completions.create(model=api.model, prompt="Person:", max_tokens=96, temperature=0)
    with pytest.raises(json.JSONDecodeError):  # without the grammar this model writes prose
        json.loads(plain.choices[0].text)


def test_json_object_mode_and_bad_schemas(api):
    client = api.openai()
    for seed in range(4):  # an object may run past max_tokens; every one that stops is complete
        r = client.chat.completions.create(
            model=api.model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=64,
            temperature=0.8, seed=seed, response_format={"type": "json_object"},
        )  # fmt: skip
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    fmt = {"response_format": {"type": "json_object"}}
    r = client.completions.create(
        model=api.model, prompt="A JSON object:", max_tokens=64, temperature=0, extra_body=fmt
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    with api.http() as c:
        for fmt in (
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            {"type": "yaml"},
        ):
            body = {"model": api.model, "prompt": "x", "max_tokens": 4, "response_format": fmt}
            bad = c.post("/v1/completions", json=body)
            assert bad.status_code == 400, (fmt, bad.text)
            assert bad.json()["error"]["param"] == "response_format"


def test_logit_bias(api, tool_model):
    from transformers import AutoTokenizer

    tokenizer, client = AutoTokenizer.from_pretrained(tool_model), api.openai()
    base = client.completions.create(model=api.model, prompt="The city of", max_tokens=1, temperature=0, logprobs=0)
    (greedy,) = tokenizer(base.choices[0].logprobs.tokens[0], add_special_tokens=False)["input_ids"]
    banned = client.completions.create(
        model=api.model, prompt="The city of", max_tokens=1, temperature=0, logit_bias={str(greedy): -100}
    )
    assert banned.choices[0].text != base.choices[0].text
    forced = client.completions.create(
        model=api.model, prompt="The city of", max_tokens=4, temperature=1.0, seed=0, logit_bias={"300": 100},
        logprobs=0,
    )  # fmt: skip
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([300])] * 4
    with api.http() as c:
        for bias in ({"300": 101}, {"x": 1}, {"99999": 1}, {"300": "big"}):
            body = {"model": api.model, "prompt": "x", "max_tokens": 2, "logit_bias": bias}
            bad = c.post("/v1/completions", json=body)
            assert bad.status_code == 400, (bias, bad.text)


def test_echo_scores_the_prompt_like_a_forward_pass(api, ref_llama):
    lm = miaotui.load(ref_llama, dtype="float32")
    ids = lm.tokenizer("The river flows into the sea")["input_ids"]
    with torch.no_grad():
        logp = lm.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    client = api.openai()
    r = client.completions.create(model=api.model, prompt=[ids], max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == lm.tokenizer.decode(ids) and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=2e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    # echo with generated tokens: prompt entries, then one per new token; the text starts with the prompt
    more = client.completions.create(model=api.model, prompt="Hello there", max_tokens=3, echo=True, logprobs=1)
    assert more.choices[0].text.startswith("Hello there") and len(more.choices[0].logprobs.tokens) > 3
    stream = client.completions.create(model=api.model, prompt="Hello there", max_tokens=3, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices).startswith("Hello there")
    with api.http() as c:
        bad = c.post("/v1/completions", json={"model": api.model, "prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_lm_eval_multiple_choice_over_the_server_matches_in_process(api, tool_model, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from test_lm_eval import ROWS, TASKS

    from miaotui.evaluate.lm_eval_adapter import evaluate_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    folder = tmp_path / "tasks"
    folder.mkdir()
    head = (
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    )
    (folder / "tiny_choice.yaml").write_text(head + TASKS["tiny_choice"])
    args = (
        f"model={api.model},base_url={api.url}/v1/completions,tokenizer={tool_model},"
        "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1"
    )
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["tiny_choice"],
        task_manager=TaskManager(include_path=str(folder)),
    )["results"]["tiny_choice"]
    local = evaluate_tasks(str(tool_model), ["tiny_choice"], include_path=folder, dtype="float32")["results"]
    assert served["acc,none"] == local["tiny_choice"]["acc,none"]


def test_forced_tool_calls(api):
    client = api.openai()
    messages = [{"role": "user", "content": "What is the weather in Paris for three days?"}]
    r = client.chat.completions.create(
        model=api.model, messages=messages, max_tokens=80, temperature=0, tools=[WEATHER, TIME], tool_choice="required"
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    named = client.chat.completions.create(
        model=api.model, messages=messages, max_tokens=80, temperature=0.7, seed=1, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the same call streamed arrives whole in one delta
    stream = client.chat.completions.create(
        model=api.model, messages=messages, max_tokens=80, temperature=0, tools=[WEATHER], tool_choice="required",
        stream=True,
    )  # fmt: skip
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather" and deltas[-1].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    # a conversation with the call and its result renders through the template
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    after = client.chat.completions.create(model=api.model, messages=history, max_tokens=8, tools=[WEATHER])
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tool_requests(api):
    with api.http() as c:
        post = lambda **extra: c.post(
            "/v1/chat/completions",
            json={"model": api.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra},
        )
        assert post(tool_choice="required").status_code == 400
        named = {"type": "function", "function": {"name": "nope"}}
        assert post(tools=[WEATHER], tool_choice=named).json()["error"]["param"] == "tool_choice"
        assert post(tools=[WEATHER, WEATHER]).status_code == 400
        assert post(tools=[{"type": "function", "function": {"name": "bad name"}}]).status_code == 400
        bad_args = [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}
        ]}]  # fmt: skip
        r = c.post("/v1/chat/completions", json={"model": api.model, "messages": bad_args, "max_tokens": 4})
        assert r.status_code == 400


def test_a_prompt_list_is_a_batch_not_n(api):
    client = api.openai()
    prompts = [f"Item {i}:" for i in range(20)]  # langchain's default batch, more than --max-n 4
    r = client.completions.create(model=api.model, prompt=prompts, max_tokens=2, temperature=0)
    assert sorted(c.index for c in r.choices) == list(range(20))
    with pytest.raises(BadRequestError, match="24 at most"):
        client.completions.create(model=api.model, prompt=prompts + prompts, max_tokens=2)
    with pytest.raises(BadRequestError, match="choices per prompt"):
        client.completions.create(model=api.model, prompt="x", max_tokens=2, n=5)


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"model": "M", "prompt": "x", "max_tokens": 2, "seed": 18446744073709551616}', "seed"),
        (b'{"model": "M", "prompt": "x", "max_tokens": 2, "seed": -9223372036854775809}', "seed"),
        (b'{"model": "M", "prompt": "\\ud800x", "max_tokens": 2}', "prompt"),
        (b'{"model": "M", "prompt": ["ok", "\\udfffx"], "max_tokens": 2}', "prompt"),
        (b'{"model": "M", "prompt": "x", "max_tokens": 2, "stop": "\\ud800"}', "stop"),
        (b'{"model": "M", "prompt": "x", "max_tokens": 2, "top_k": 1000000000000000000000000000000}', "top_k"),
    ],
)
def test_hostile_completion_fields_get_400(api, raw, param):
    with api.http() as c:
        r = c.post("/v1/completions", content=raw.replace(b'"M"', json.dumps(api.model).encode()))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "messages",
    [
        b'[{"role": "user", "content": "\\ud800x"}]',
        b'[{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]',
        b'[{"role": "user"}]',
        b'[{"role": "user", "content": null}]',
        b'[{"role": "assistant", "content": null}]',
        b'[{"role": "tool", "content": "42"}]',
    ],
)
def test_hostile_messages_get_400(api, messages):
    raw = b'{"model": %s, "max_tokens": 2, "messages": %s}' % (json.dumps(api.model).encode(), messages)
    with api.http() as c:
        r = c.post("/v1/chat/completions", content=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"


def test_seeds_in_range_and_head_requests(api):
    client = api.openai()
    for seed in (-(2**63), 2**63 - 1):
        r = client.completions.create(model=api.model, prompt="x", max_tokens=2, seed=seed, n=2)
        assert len(r.choices) == 2
    with api.http(key=None) as c:
        assert c.head("/health").status_code == 200 and c.head("/ready").status_code == 200


def test_slow_headers_time_out_and_huge_headers_get_431(api):
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        start = time.monotonic()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 431")  # an answer, not a reset
    with httpx.Client(base_url=api.url) as c:  # the server is fine
        assert c.get("/health").status_code == 200


def test_a_large_body_read_with_its_headers_is_not_taken_for_large_headers(api):
    """Headers and 1 MiB of body in one write: the server reads them in chunks of any size (a busy server, large
    ones); the headers are small, so the answer is the body limit's 413, never a 431."""
    host, port = api.url.removeprefix("http://").split(":")
    body = json.dumps({"model": api.model, "prompt": "a" * (1 << 20)}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


def test_connections_beyond_the_cap_get_503(api):
    host, port = api.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(16)]
    try:
        with httpx.Client(base_url=api.url) as c:
            assert c.get("/health").status_code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    with httpx.Client(base_url=api.url) as c:
        assert c.get("/health").status_code == 200


def test_drain_timeout_ends_requests_cleanly(tmp_path, ref_llama):
    """SIGTERM with requests that outlive --drain-timeout: the stream gets an error event and [DONE], the plain
    request a JSON 503, the log one line each and no traceback; the process exits 0."""
    s = Server(tmp_path / "server.log", "--no-compile", "--max-batch", "2", "--max-len", "1024", "--drain-timeout", "1")
    body = {"model": "ref-llama-16m", "prompt": "The city of", "max_tokens": 1000, "ignore_eos": True}
    results, lines = {}, []

    def plain():
        with s.http(timeout=120) as c:
            results["plain"] = c.post("/v1/completions", json=body)

    def streamed():
        with s.http(timeout=120) as c, c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines.extend(line for line in r.iter_lines() if line)

    try:
        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        s.wait_for("miaotui_running_requests", 2)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert s.proc.wait(timeout=60) == 0
        assert results["plain"].status_code == 503 and results["plain"].json()["error"]["code"] == "shutting_down"
        assert lines[-1] == "data: [DONE]" and '"shutting_down"' in lines[-2]
        assert "Traceback" not in s.log()
    finally:
        s.stop()
