"""OpenAI response objects (completions, chat completions, their stream chunks, logprobs) from engine requests."""

from __future__ import annotations

import dataclasses
import time

from miaotui.engine.scheduler import Request
from miaotui.serve.chat import ChatRequest, forced_calls, parse_tool_calls


@dataclasses.dataclass
class Shape:
    """What a choice holds beyond the generated text.

    echo: each prompt's text, written before its completions (completions with `echo`); hide_generated: the
    request asked for max_tokens 0 (only the prompt is scored); n: choices per prompt; tools: the chat request
    whose declared tools the output may call.
    """

    echo: list[str] | None = None
    hide_generated: bool = False
    n: int = 1
    tools: ChatRequest | None = None

    def assistant(self, request: Request) -> tuple[str | None, list[dict], str | None]:
        """A chat choice's (content, tool calls, finish reason)."""
        reason, body = finish_reason(request), self.tools
        if body is None or body.choice == "none":
            return request.text, [], reason
        if body.choice in ("named", "required"):
            calls = forced_calls(body, request.text)
            content = None if calls else request.text
        else:
            content, calls = parse_tool_calls(request.text, {t.function.name for t in body.tools})
        if calls and reason == "stop" and body.choice != "named":  # OpenAI: a named function ends with "stop"
            reason = "tool_calls"
        return content, calls, reason


def finish_reason(request: Request) -> str | None:
    """OpenAI's names: "stop" or "length" (an aborted or failed request reports what it got as "length")."""
    reason = request.finish_reason
    return None if reason is None else "stop" if reason == "stop" else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Formatter:
    """Builds the JSON of one response; `kind` is "text_completion" or "chat.completion"."""

    def __init__(self, kind: str, model: str, tokenizer, response_id: str, shape: Shape | None = None):
        self.kind, self.model, self.tokenizer, self.id = kind, model, tokenizer, response_id
        self.created = int(time.time())
        self.chat = kind == "chat.completion"
        self.shape = shape or Shape()

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, entries: list[dict], text_offset: int = 0) -> dict:
        """Logprobs of generated tokens (entries from the engine) in the endpoint's format."""
        if self.chat:
            content = []
            for e in entries:
                piece = self._piece(e["token"])
                top = [
                    {"token": (p := self._piece(t)), "logprob": lp, "bytes": list(p.encode())}
                    for t, lp in e.get("top", [])
                ]
                content.append(
                    {"token": piece, "logprob": e["logprob"], "bytes": list(piece.encode()), "top_logprobs": top}
                )
            return {"content": content}
        tokens = [self._piece(e["token"]) for e in entries]
        offsets, at = [], text_offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                None if e["logprob"] is None else {self._piece(t): lp for t, lp in e.get("top", [])} for e in entries
            ],
            "text_offset": offsets,
        }

    def choice(self, index: int, request: Request) -> dict:
        if self.chat:
            lp = self.logprobs(request.logprobs) if request.logprobs is not None else None
            content, calls, reason = self.shape.assistant(request)
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            return {"index": index, "message": message, "logprobs": lp, "finish_reason": reason}
        text, entries = self.completion(index, request)
        lp = self.logprobs(entries) if entries is not None else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason(request)}

    def completion(self, index: int, request: Request) -> tuple[str, list[dict] | None]:
        """A completion choice's text and logprob entries: the prompt's first with `echo`, the generated ones
        unless max_tokens was 0."""
        text, entries = self.generated(request)
        if self.shape.echo is not None:
            text = self.prompt_text(index) + text
            if entries is not None:
                entries = self.prompt_entries(request) + entries
        return text, entries

    def generated(self, request: Request) -> tuple[str, list[dict] | None]:
        if self.shape.hide_generated:
            return "", [] if request.logprobs is not None else None
        return request.text, request.logprobs

    def prompt_text(self, index: int) -> str:
        return self.shape.echo[index // self.shape.n]

    @staticmethod
    def prompt_entries(request: Request) -> list[dict]:
        """The prompt tokens' logprob entries; the first token's logprob is None (nothing predicts it)."""
        return [{"token": request.prompt_ids[0], "logprob": None}, *request.prompt_logprobs[1:]]

    def response(self, requests: list[Request], prompt_tokens: int) -> dict:
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(i, r) for i, r in enumerate(requests)],
            "usage": usage(prompt_tokens, self.completion_tokens(requests)),
        }

    def chunk(self, index: int, text: str | None, logprobs: list[dict] | None, reason: str | None, first: bool) -> dict:
        """One streamed event for choice `index`: new text (None on the closing event), its logprobs, a reason."""
        lp = self.logprobs(logprobs) if logprobs else None
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": reason}
        return self._envelope([choice])

    def completion_tokens(self, requests: list[Request]) -> int:
        return 0 if self.shape.hide_generated else sum(len(r.tokens) for r in requests)

    def tool_chunk(self, index: int, calls: list[dict], first: bool) -> dict:
        """The streamed event carrying a choice's tool calls (whole, each with its index)."""
        delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
        if first:
            delta = {"role": "assistant", "content": None, **delta}
        return self._envelope([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._envelope([]), "usage": usage(prompt_tokens, completion_tokens)}

    def _envelope(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
