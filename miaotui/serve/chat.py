"""Chat completions: the request body, rendering through the model's chat template, and tool calls.

Tools are rendered by the chat template (`tools=`); a template that never reads `tools` is refused by name. With
`tool_choice` "required" or a named function, the output is constrained by a grammar to a call (a JSON array of
`{"name", "arguments"}`, or the named function's arguments); with "auto" the model's own text is parsed for calls
in the formats chat templates teach: `<tool_call>{...}</tool_call>` blocks (Hermes, Qwen), `[TOOL_CALLS][...]`
(Mistral), or an answer that is nothing but a `{"name", "arguments"|"parameters"}` object or a list of them (Llama).

>>> parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', {"f"})[1][0]["function"]
{'name': 'f', 'arguments': '{"x": 1}'}
>>> parse_tool_calls("Hello", {"f"})
('Hello', [])
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from miaotui.engine.constraints import Grammar
from miaotui.serve.protocol import Body, RequestError, SamplingRequest, Text

FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


class TextPart(Body):
    type: Literal["text"]
    text: Text


class FunctionCall(Body):
    name: StrictStr
    arguments: StrictStr


class ToolCall(Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant's tool calls may stand alone)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it (tool-call arguments as objects)."""
        out: dict = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise RequestError(400, f"tool call {call.id}: arguments are not JSON", "messages") from None
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            out["tool_calls"] = calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


class FunctionDef(Body):
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: StrictStr


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions: a conversation rendered with the tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def choice(self) -> str:
        """ "none", "auto", "required" or "named"."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    def check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise RequestError(400, "tools: function names must be unique", "tools")
        if self.choice in ("required", "named") and not names:
            raise RequestError(400, f"tool_choice {self.choice!r} needs tools", "tool_choice")
        if self.choice == "named" and self.tool_choice.function.name not in names:
            raise RequestError(
                400, f"tool_choice names {self.tool_choice.function.name!r}, not in tools", "tool_choice"
            )
        if self.choice in ("required", "named") and self.response_format and self.response_format.type != "text":
            raise RequestError(400, "response_format cannot be combined with a forced tool call", "response_format")

    def grammar(self) -> Grammar | None:
        """The output's grammar: a forced tool call's, else response_format's."""
        tools = {t.function.name: t.function for t in self.tools or []}
        try:
            if self.choice == "named":
                f = tools[self.tool_choice.function.name]
                return Grammar.json_schema(f.parameters or {"type": "object"})  # no undeclared arguments
            if self.choice == "required":
                return Grammar.json_schema(_calls_schema(tools.values(), bool(self.parallel_tool_calls)))
        except Exception as e:
            raise RequestError(400, f"tools: {e}", "tools") from None
        return super().grammar()


def _calls_schema(functions, parallel: bool) -> dict:
    """A JSON array of calls, each {"name": one of the functions, "arguments": its parameters}."""
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ]
    }
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template]
    return any(t and re.search(r"\btools\b", t) for t in templates)


FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_chat(tokenizer, body: ChatRequest) -> tuple[list[int], tuple[str, ...]]:
    """Prompt token ids for a conversation, and stop strings the format needs.

    With a chat template in the tokenizer, that template (with the generation prompt, and the tools). Without
    one, the fallback format: each message as "Role: text" separated by blank lines, then "Assistant:";
    generation stops where the model starts a new "User:" or "System:" turn.
    """
    if body.tools and not supports_tools(tokenizer):
        raise RequestError(400, "this model's chat template has no tool support: it does not read `tools`", "tools")
    messages = [m.for_template() for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids), ()
    text = "".join(f"{FALLBACK_ROLES[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"], ("\nUser:", "\nSystem:")


def tool_call(name: str, arguments) -> dict:
    """One OpenAI tool call; arguments as JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def forced_calls(body: ChatRequest, text: str) -> list[dict]:
    """The calls in the output of a forced tool choice (constrained: it parses unless cut by max_tokens)."""
    if body.choice == "named":
        return [tool_call(body.tool_choice.function.name, text)]
    try:
        return [tool_call(c["name"], c["arguments"]) for c in json.loads(text)]
    except (json.JSONDecodeError, TypeError, KeyError):
        return []


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
MARKERS = ("<tool_call>", "[TOOL_CALLS]")


def _as_calls(obj, names: set[str]) -> list[dict] | None:
    items = obj if isinstance(obj, list) else [obj]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(tool_call(item["name"], arguments))
    return calls or None


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content left, tool calls) found in a model's free output; calls must name one of `names`."""
    tagged = _TAGGED.findall(text)
    if tagged:
        calls = [c for block in tagged for c in (_as_calls(_json(block), names) or [])]
        if calls:
            content = _TAGGED.sub("", text).strip()
            return content or None, calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        calls = _as_calls(_json(stripped[len("[TOOL_CALLS]") :].strip()), names)
        if calls:
            return None, calls
    if stripped[:1] in "{[" and stripped:
        calls = _as_calls(_json(stripped), names)
        if calls:
            return None, calls
    return text, []


def tool_text_start(text: str) -> int:
    """Where text that may turn out to be a tool call begins (streaming holds it back): a marker, the start of
    a marker at the end, or a whole answer that opens with a JSON bracket; len(text) if none."""
    if not text.strip() or text.lstrip()[:1] in "{[":
        return 0
    found = [i for i in (text.find(m) for m in MARKERS) if i >= 0]
    partial = [len(text) - k for m in MARKERS for k in range(1, len(m)) if text.endswith(m[:k])]
    return min(found + partial, default=len(text))
