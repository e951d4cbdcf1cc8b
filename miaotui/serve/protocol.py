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

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from miaotui.engine.constraints import Grammar
from miaotui.engine.sampling import SamplingParams


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the offending field, a machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Body(BaseModel):
    """A part of a request body: fields OpenAI's clients send that the server does not know are ignored."""

    model_config = ConfigDict(extra="ignore")


def _number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return text


def _token_bias(bias: dict) -> dict:
    for key in bias:
        if not key.isdigit():
            raise ValueError(f"keys are token ids (digits), got {key!r}")
    return bias


Number = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
Text = Annotated[StrictStr, AfterValidator(_utf8)]  # strings the tokenizer reads: valid Unicode only
Stop = Text | Annotated[list[Text], Field(max_length=4)] | None
INT64 = 2**63
LogitBias = Annotated[dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]], AfterValidator(_token_bias)]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: StrictStr = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self) -> Grammar | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Grammar.json_object()
        if self.json_schema is None:
            raise RequestError(400, "response_format json_schema needs a json_schema object", "response_format")
        try:
            return Grammar.json_schema(self.json_schema.schema_, strict=bool(self.json_schema.strict))
        except Exception as e:
            raise RequestError(400, f"response_format: {e}", "response_format") from None


class StreamOptions(Body):
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    user: StrictStr | None = None
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    top_k: StrictInt | None = Field(None, ge=0, lt=2**31, description="extension: sample among the k likeliest tokens")
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

    def grammar(self) -> Grammar | None:
        """The grammar the output must follow (response_format), if any."""
        return self.response_format.grammar() if self.response_format else None

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        extra_stop: tuple[str, ...] = (),
        grammar: Grammar | None = None,
        prompt_logprobs: int | None = None,
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
            prompt_logprobs=prompt_logprobs,
            ignore_eos=bool(self.ignore_eos),
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            grammar=grammar,
        )

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = (
    Text
    | Annotated[list[Text], Field(min_length=1)]
    | Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]
    | Annotated[
        list[Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]], Field(min_length=1)
    ]
)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: text (or token id) prompts."""

    prompt: Prompt
    max_tokens: StrictInt | None = Field(None, ge=0, description="0 only with echo: score the prompt")
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
        if self.max_tokens == 0 and not self.echo:
            raise RequestError(400, "max_tokens 0 needs echo: true (it scores the prompt)", "max_tokens")
        if self.suffix:
            raise RequestError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise RequestError(400, "best_of other than n is not supported", "best_of")
