"""OpenAI response objects (completions, chat completions, their stream chunks, logprobs) from engine requests."""

from __future__ import annotations

import time

from miaotui.engine.scheduler import Request


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

    def __init__(self, kind: str, model: str, tokenizer, response_id: str):
        self.kind, self.model, self.tokenizer, self.id = kind, model, tokenizer, response_id
        self.created = int(time.time())
        self.chat = kind == "chat.completion"

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
            "top_logprobs": [{self._piece(t): lp for t, lp in e.get("top", [])} for e in entries],
            "text_offset": offsets,
        }

    def choice(self, index: int, request: Request) -> dict:
        lp = self.logprobs(request.logprobs) if request.logprobs is not None else None
        if self.chat:
            message = {"role": "assistant", "content": request.text}
            return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish_reason(request)}
        return {"index": index, "text": request.text, "logprobs": lp, "finish_reason": finish_reason(request)}

    def response(self, requests: list[Request], prompt_tokens: int) -> dict:
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(i, r) for i, r in enumerate(requests)],
            "usage": usage(prompt_tokens, sum(len(r.tokens) for r in requests)),
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

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._envelope([]), "usage": usage(prompt_tokens, completion_tokens)}

    def _envelope(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
