"""Constrained decoding: a grammar (a JSON schema, any JSON object, a regex, a Lark grammar) that every generated
token must follow, and logit bias, applied to a request's logits before sampling.

Grammars run on llguidance: for each step it computes the set of tokens that keep the output inside the grammar
(a bitmask, tens of microseconds a token; `benchmarks/bench_grammar.py`), the logits of every other token become
-inf, and the chosen token advances the matcher. The request stops when the grammar is complete.

>>> g = Grammar.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
>>> compiler = GrammarCompiler(tokenizer, vocab_size=32000, eos_ids={2})  # doctest: +SKIP
>>> matcher = compiler.matcher(g)  # doctest: +SKIP
>>> logits = constrained(logits, params, matcher)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from miaotui.errors import MiaotuiError

# compact separators, no free whitespace: small models otherwise fill the output with spaces and newlines
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """A grammar the output must match, in llguidance's serialized form; build one with the class methods.

    >>> Grammar.json_object().kind
    'json'
    >>> Grammar.regex(r"[0-9]+").kind
    'regex'
    """

    source: str
    kind: str

    @classmethod
    def json_schema(cls, schema: dict, strict: bool = True) -> Grammar:
        """Output that parses as JSON and validates against `schema`. strict: objects take no properties
        beyond those listed unless the schema says otherwise (OpenAI's strict mode)."""
        if not isinstance(schema, dict):
            raise MiaotuiError("a JSON schema must be a JSON object")
        from llguidance import LLMatcher

        body = _closed(schema) if strict else schema
        try:
            return cls(LLMatcher.grammar_from_json_schema(body, overrides=JSON_OPTIONS), "json")
        except (ValueError, TypeError) as e:
            raise MiaotuiError(f"invalid JSON schema: {e}") from None

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's JSON mode)."""
        return cls.json_schema({"type": "object"}, strict=False)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        from llguidance import LLMatcher

        return cls(LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        from llguidance import LLMatcher

        return cls(LLMatcher.grammar_from_lark(grammar), "lark")


def _closed(schema):
    """The schema with additionalProperties false on every object schema that does not set it."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self._m, self.vocab_size = matcher, vocab_size
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Which tokens may come next: (V,) bool."""
        self._m.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise MiaotuiError(f"token {token} breaks the grammar: {self._m.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but end-of-text may follow."""
        return self._m.is_stopped()


class GrammarCompiler:
    """Matchers for one tokenizer (its llguidance view is built once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._ll = None
        self._lock = threading.Lock()  # requests are checked on the server's threads, run on the engine's

    def _tokenizer(self):
        with self._lock:
            return self._build()

    def _build(self):
        if self._ll is None:
            try:
                import llguidance.hf
            except ImportError as e:  # a dependency: only a broken install lacks it
                raise MiaotuiError(f"constrained decoding needs llguidance: pip install llguidance ({e})") from e
            try:
                self._ll = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_ids or None
                )
            except Exception as e:
                raise MiaotuiError(f"this tokenizer cannot drive constrained decoding: {e}") from None
        return self._ll

    def check(self, grammar: Grammar) -> None:
        """Raise a MiaotuiError naming the problem if the grammar cannot be used."""
        from llguidance import LLMatcher

        try:
            error = LLMatcher.validate_grammar(grammar.source, self._tokenizer())
        except Exception as e:  # llguidance raises on malformed input it cannot even parse
            error = str(e) or type(e).__name__
        if error:
            raise MiaotuiError(f"invalid {grammar.kind} grammar: {error.splitlines()[0]}")

    def matcher(self, grammar: Grammar) -> Matcher:
        from llguidance import LLMatcher

        m = LLMatcher(self._tokenizer(), grammar.source, log_level=0)
        if m.is_error():
            raise MiaotuiError(f"invalid {grammar.kind} grammar: {m.get_error()}")
        return Matcher(m, self.vocab_size)


def constrained(logits: torch.Tensor, logit_bias: tuple, matcher: Matcher | None) -> torch.Tensor:
    """One row of logits (V,) with the bias added and the tokens the grammar forbids at -inf (fp32).

    >>> constrained(torch.zeros(3), ((1, 5.0), (2, -100.0)), None).tolist()
    [0.0, 5.0, -100.0]
    """
    logits = logits.float().clone()
    if logit_bias:
        ids, bias = zip(*logit_bias, strict=True)
        logits[torch.tensor(ids, device=logits.device)] += torch.tensor(bias, device=logits.device)
    if matcher is not None:
        logits[~matcher.allowed().to(logits.device)] = float("-inf")
    return logits
