"""Constrained decoding, logit bias and prompt logprobs in the engine; the tool-call parser of the chat route."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import miaotui
from miaotui.engine.constraints import Grammar
from miaotui.engine.generate import Engine
from miaotui.engine.request import Request
from miaotui.engine.sampling import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.serve.chat import parse_tool_calls, tool_text_start

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "label": {"enum": ["red", "green"]},
        "points": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["id", "label", "points", "note"],
}


@pytest.fixture(scope="module")
def ref(ref_llama):
    return miaotui.load(ref_llama, dtype="float32")


def _run(engine: Engine, items: list[tuple[list[int], SamplingParams]]) -> list[Request]:
    s = engine.scheduler
    requests = [s.submit(Request(ids, p)) for ids, p in items]
    while s.has_work():
        s.step()
    return requests


def test_schema_outputs_validate_and_stop_when_complete(ref):
    engine = Engine(ref, max_batch=4, max_len=256)
    prompt = ref.tokenizer("Record:")["input_ids"]
    grammar = Grammar.json_schema(SCHEMA)
    runs = _run(
        engine, [(prompt, SamplingParams(max_tokens=120, temperature=1.0, seed=s, grammar=grammar)) for s in range(6)]
    )
    for r in runs:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert len({r.text for r in runs}) > 1  # sampled: the grammar narrows, it does not decide
    (free,) = _run(engine, [(prompt, SamplingParams(max_tokens=30))])
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)


def test_regex_grammar_and_logit_bias(ref):
    engine = Engine(ref, max_batch=2, max_len=128)
    prompt = ref.tokenizer("The year was")["input_ids"]
    (year,) = _run(engine, [(prompt, SamplingParams(max_tokens=20, grammar=Grammar.regex(r" (19|20)[0-9]{2}")))])
    assert re.fullmatch(r" (19|20)[0-9]{2}", year.text) and year.finish_reason == "stop"
    forced, greedy = _run(
        engine,
        [(prompt, SamplingParams(max_tokens=5, logit_bias=((300, 100.0),))), (prompt, SamplingParams(max_tokens=1))],
    )
    assert forced.tokens == [300] * 5
    (banned,) = _run(engine, [(prompt, SamplingParams(max_tokens=1, logit_bias=((greedy.tokens[0], -100.0),)))])
    assert banned.tokens != greedy.tokens


def test_bad_grammars_and_biases_are_refused_before_any_work(ref):
    engine = Engine(ref, max_batch=1, max_len=64)
    with pytest.raises(MiaotuiError, match="grammar"):
        engine.scheduler.submit(Request([1, 2], SamplingParams(grammar=Grammar.json_schema({"type": "bogus"}))))
    with pytest.raises(MiaotuiError, match="logit_bias"):
        engine.scheduler.submit(Request([1, 2], SamplingParams(logit_bias=((10**6, 1.0),))))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))
    assert not engine.scheduler.has_work()


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_logprobs_equal_a_forward_pass(ref, chunk):
    text = "The history of the city goes back to the Roman period , when a small fort was built on the river ."
    ids = ref.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = ref.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    engine = Engine(ref, max_batch=2, max_len=64, prefill_chunk=chunk)
    _run(engine, [(ids, SamplingParams(max_tokens=1))])  # its blocks are cached: a later hit would skip positions
    scored, other = _run(
        engine, [(ids, SamplingParams(max_tokens=2, prompt_logprobs=3)), (ids[:7], SamplingParams(max_tokens=3))]
    )
    entries = scored.prompt_logprobs
    assert entries[0] is None and len(entries) == len(ids)
    want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert [e["logprob"] for e in entries[1:]] == pytest.approx(want, abs=1e-4)
    assert [e["top"][0][0] for e in entries[1:]] == logp[:-1].argmax(-1).tolist()
    assert other.prompt_logprobs is None and len(other.tokens) == 3


def test_tool_call_parser():
    names = {"get_weather", "get_time"}
    content, calls = parse_tool_calls(
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        names,
    )
    assert content.strip() == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"} and calls[0]["id"].startswith("call_")
    assert parse_tool_calls('[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]', names)[0] is None
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    for text in ('{"name": "unknown", "arguments": {}}', "<tool_call>{broken</tool_call>", '{"a": 1}', "plain"):
        assert parse_tool_calls(text, names) == (text, [])


def test_streaming_holds_back_what_may_become_a_tool_call():
    assert tool_text_start("Sure, here") == len("Sure, here")
    assert tool_text_start("Sure <tool_call>{") == len("Sure ")
    assert tool_text_start("Sure <tool_") == len("Sure ")
    assert tool_text_start('  {"name"') == 0 and tool_text_start("") == 0
