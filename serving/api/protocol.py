"""Wire models of the OpenAI-compatible API (the shapes the ``openai`` client and vLLM users expect)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from matta.configfile import shorten

MAX_LOGPROBS = 20  # vLLM's default limit; OpenAI's is 5
MAX_STOP_STRINGS = 4


def _json_number(value: Any) -> Any:
    """Numbers must arrive as JSON numbers: pydantic's lax mode would read ``"16"`` or ``true`` as 16
    or 1, which the schema (and a careful client) says is wrong. Integral floats (``1.0``) stay: JSON
    does not tell them apart from integers."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}"[:200])
    return value


# What crosses the process seam must fit MessagePack's integers (msgspec: -2^63 .. 2^64-1) and the
# engine's int64 tensors: a JSON integer may be of any size (10**56 was accepted here and failed in
# core_client.submit with an OverflowError, a 500).
WIRE_INT_MIN, WIRE_INT_MAX = -(2**63), 2**63 - 1


class Clamp:
    """Marks a numeric field whose values beyond the wire's range are clamped into it rather than
    refused, where OpenAI semantics allow (``max_tokens`` beyond the context is served up to the
    context): ``Annotated[int, CLAMP]``."""


CLAMP = Clamp()


def _in_wire_range(value: Any, clamp: bool) -> Any:
    """``value`` (a number, or lists of them) as the engine and the wire can carry it: integers
    within int64 (clamped when ``clamp``), floats finite. Raises ValueError naming the problem."""
    if isinstance(value, list):
        return [_in_wire_range(item, clamp) for item in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not WIRE_INT_MIN <= value <= WIRE_INT_MAX:
        if clamp:
            return min(max(value, WIRE_INT_MIN), WIRE_INT_MAX)
        raise ValueError(f"{value} is outside the integers this server accepts "
                         f"({WIRE_INT_MIN} .. {WIRE_INT_MAX})")
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no infinities, but Python's parser reads 1e400 as one (and NaN, Infinity).
        raise ValueError(f"{value} is not a finite number")
    return value


class WireModel(BaseModel):
    """A request body whose every numeric field, those added later included, is checked to fit what
    the engine and the wire between processes accept (:func:`_in_wire_range`): one check, every field."""

    @field_validator("*", mode="after")
    @classmethod
    def _wire_range(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        return _in_wire_range(value, any(isinstance(m, Clamp) for m in field.metadata))


# Constraints of an optional number go inside its Annotated, before the validator
# (`Annotated[int, Field(ge=0), BeforeValidator(_json_number)] | None`), or pydantic's JSON schema
# gets them wrong.
JsonInt = Annotated[int, BeforeValidator(_json_number)]
JsonFloat = Annotated[float, BeforeValidator(_json_number)]


def _strings_in(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def _valid_unicode(value: Any) -> Any:
    """JSON may carry lone surrogates (``"\\ud800"``), which are not text: refuse them with a
    400 here rather than fail later in the tokenizer or the A/B log."""
    for text in _strings_in(value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"invalid Unicode: a lone surrogate {text[exc.start]!r} at index {exc.start}") from None
    return value


def _nonempty_prompt_lists(schema: dict) -> None:
    """OpenAPI: every list form of ``prompt`` needs an item, token ids are >= 0 (the upper bound,
    the vocabulary, is the checkpoint's: :func:`serving.api.http.document_api` adds it)."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        if branch.get("type") == "array":
            branch["minItems"] = 1
            items = branch["items"]
            if items.get("type") == "array":
                items["minItems"] = 1
                items = items["items"]
            if items.get("type") == "integer":
                items["minimum"] = 0
            if items.get("type") == "string":
                items["minLength"] = 1


def _stop_schema(schema: dict) -> None:
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch["maxItems"] = MAX_STOP_STRINGS
            branch["items"]["minLength"] = 1


class StreamOptions(WireModel):
    include_usage: StrictBool = False


class CompletionRequest(WireModel):
    """``POST /v1/completions``. Unknown fields are ignored, as vLLM does, so newer clients still work."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the checkpoint name (routed) or '<name>:<width>' (pinned)")
    prompt: str | list[str] | list[JsonInt] | list[list[JsonInt]] = Field(
        description="text, a list of texts, token ids, or a list of token-id lists",
        json_schema_extra=_nonempty_prompt_lists,
    )
    # Clamped, not refused, beyond the wire's range: the engine serves it up to the context anyway.
    max_tokens: Annotated[JsonInt, CLAMP] = Field(16, ge=0, description="0 with echo scores the prompt only; "
                                                  "more than the context generates up to the context")
    temperature: JsonFloat = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, json_schema_extra=_stop_schema)
    # +-2^53: every integer a JSON number (a double) holds exactly, so clients in any language agree.
    seed: Annotated[int, Field(ge=-(2**53), le=2**53), BeforeValidator(_json_number)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(_json_number)] | None = None
    echo: StrictBool = False
    user: str | None = None
    # Accepted for compatibility at their neutral values only; anything else is a clear 400 from
    # `_unsupported` (the schema says so too, for generated clients and schemathesis).
    n: JsonInt = Field(1, json_schema_extra={"enum": [1]})
    best_of: JsonInt | None = Field(None, json_schema_extra={"enum": [1, None]})
    presence_penalty: JsonFloat = Field(0.0, json_schema_extra={"enum": [0]})
    frequency_penalty: JsonFloat = Field(0.0, json_schema_extra={"enum": [0]})
    suffix: str | None = Field(None, json_schema_extra={"enum": ["", None]})
    # matta extensions
    latency_slo_ms: Annotated[float, Field(gt=0), BeforeValidator(_json_number)] | None = Field(
        None, description="end-to-end latency target (ms) the scheduler tries to meet")
    ttft_slo_ms: Annotated[float, Field(gt=0), BeforeValidator(_json_number)] | None = Field(
        None, description="time-to-first-token target (ms)")
    tpot_slo_ms: Annotated[float, Field(gt=0), BeforeValidator(_json_number)] | None = Field(
        None, description="time-per-output-token target (ms): mean time between tokens after the first")
    width: str | None = Field(None, description="pin a named width (same as model '<name>:<width>')")

    _unicode = field_validator("model", "prompt", "stop", "user", "suffix", "width")(_valid_unicode)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt list is empty")
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise ValueError("a token-id prompt is empty")
        return prompt

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stop

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported; only n=1 (send the prompt several times instead)")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of={self.best_of} is not supported; only best_of=1")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """The OpenAI/vLLM error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "matta"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    width: str | None = Field(None, description="the pinned width; None for the routed model")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    """An error body as a plain dict, ready for a JSONResponse; the message is cut to a bounded
    length (it may quote what a client sent)."""
    return ErrorResponse(error=ErrorInfo(message=shorten(message), type=type_, param=param,
                                         code=code)).model_dump()


class FeedbackRequest(WireModel):
    """``POST /v1/feedback``: an outcome for an earlier request (by its id) or for a unit."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["request_id"], "not": {"required": ["unit"]}},
                  {"required": ["unit"], "not": {"required": ["request_id"]}}]})

    # Exactly one of request_id and unit; neither takes null (the schema's oneOf can then say so).
    request_id: str = Field(None, min_length=1, max_length=128, description="the id of a completion response")
    unit: str = Field(None, min_length=1, max_length=256, description="the experiment unit (e.g. the user)")
    metric: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    value: JsonFloat = Field(allow_inf_nan=False)

    _unicode = field_validator("request_id", "unit", "metric")(_valid_unicode)

    @model_validator(mode="after")
    def _one_target(self):
        if (self.request_id is None) == (self.unit is None):
            raise ValueError("give exactly one of request_id and unit")
        return self
