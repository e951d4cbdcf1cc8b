"""The request bodies the server accepts (OpenAI's completions and chat completions) and their validation.

Unknown fields are ignored, as OpenAI's own clients send extras; every known field is type- and
range-checked here, and the limits that depend on the server (max_tokens, n, context) in `sampling_params`.

>>> CompletionRequest(model="m", prompt="Hi", max_tokens=4).prompts()
['Hi']
>>> try:
...     CompletionRequest(model="m", prompt="Hi", top_p=0)
... except ValueError as e:
...     print(e.errors()[0]["loc"], e.errors()[0]["msg"])
('top_p',) Input should be greater than 0
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from miaotui.engine.sampling import SamplingParams


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the offending field, a machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Number = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    user: StrictStr | None = None
    top_k: StrictInt | None = Field(None, ge=0, description="extension: sample among the k likeliest tokens")
    repetition_penalty: Number | None = Field(None, gt=0, le=10, description="extension: > 1 discourages repeats")
    ignore_eos: StrictBool | None = Field(False, description="extension: generate max_tokens even past end-of-text")

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise RequestError(400, "stop strings must not be empty", "stop")
        return tuple(stop)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(400, f"{name} is not supported; use repetition_penalty instead", name)

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, extra_stop: tuple[str, ...] = ()
    ) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            stop=self.stops() + extra_stop,
            seed=self.seed,
            logprobs=logprobs,
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = (
    StrictStr
    | Annotated[list[StrictStr], Field(min_length=1)]
    | Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]
    | Annotated[
        list[Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]], Field(min_length=1)
    ]
)


class CompletionRequest(_Sampling):
    """POST /v1/completions: text (or token id) prompts."""

    prompt: Prompt
    max_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool | None = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: strings, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise RequestError(400, "echo is not supported", "echo")
        if self.suffix:
            raise RequestError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise RequestError(400, "best_of other than n is not supported", "best_of")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: a conversation rendered with the tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_chat(tokenizer, messages: list[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
    """Prompt token ids for a conversation, and stop strings the format needs.

    With a chat template in the tokenizer, that template (with the generation prompt). Without one, the
    fallback format: each message as "Role: text" separated by blank lines, then "Assistant:"; generation
    stops where the model starts a new "User:" or "System:" turn.
    """
    plain = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids), ()
    text = "".join(f"{FALLBACK_ROLES[m['role']]}: {m['content']}\n\n" for m in plain) + "Assistant:"
    return tokenizer(text)["input_ids"], ("\nUser:", "\nSystem:")
