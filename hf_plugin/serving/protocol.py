"""The request bodies the server accepts, its limits, and its OpenAI-shaped errors.

Every request model forbids fields it does not know: a field the server does not support is answered with a 400
that names it, never silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


MAX_TOP_LOGPROBS = 20
# Past these, scores overflow float32 (temperature divides the logits, alpha multiplies log-probs of up to ~1e2 nats).
MIN_TEMPERATURE = 1e-5
MAX_ALPHA = 1e6


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; larger requests get a 400 before any work is done.

    Args:
        max_prompt_tokens (`int`, *optional*, defaults to 2048): longest prompt, in tokens of the base tokenizer.
        max_tokens (`int`, *optional*, defaults to 512): largest `max_tokens`; also the default of chat requests
            (completions default to 16, as in the OpenAI API). Prompt plus `max_tokens` must also fit in the
            positions of the base model and of the reweighter.
        max_n (`int`, *optional*, defaults to 8): largest `n`.
        max_body_bytes (`int`, *optional*, defaults to 1 MiB): largest request body.
        max_concurrent (`int`, *optional*, defaults to 1): generations running at the same time.
        max_queued (`int`, *optional*, defaults to 64): requests admitted (running or waiting) before new ones are
            refused with a 503.
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 1
    max_queued: int = 64

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive integer, got {value!r}")


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user identifier; accepted and not used
    alpha: float | None = Field(default=None, ge=0.0, le=MAX_ALPHA,
                                description="reweighting strength (an hf-plugin extension)")

    # Before the range checks, which would otherwise refuse NaN for the wrong reason; and no coercion of "0.5" or true.
    @field_validator("temperature", "top_p", "alpha", mode="before")
    @classmethod
    def _finite_number(cls, value):
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("at most 4 stop sequences, none of them empty")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Request):
    """`POST /v1/completions`: one prompt (a string, or a list holding one string)."""

    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a string, or a list of one string)")
            value = value[0]
        return value

    def top_logprobs(self) -> int | None:
        """How many alternatives to return per token, or None for no log-probs."""
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`: the messages are rendered with the base tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_request(model: type[_Request], payload) -> _Request:
    """Validates a decoded JSON body; any problem becomes one 400 naming the fields.

    Args:
        model (`type`): `CompletionRequest` or `ChatCompletionRequest`.
        payload: the decoded JSON body.

    Examples:

    ```python
    >>> from hf_plugin.serving.protocol import APIError, CompletionRequest, parse_request
    >>> parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", "max_tokens": 4, "alpha": 0.5}).alpha
    0.5
    >>> try:
    ...     parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", "logit_bias": {"5": 1}})
    ... except APIError as error:
    ...     print(error.status, error.body()["error"]["message"])
    400 Unsupported field(s): logit_bias.

    ```
    """
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        request = model.model_validate(payload)
    except ValidationError as error:
        problems = error.errors()
        unknown = [".".join(map(str, problem["loc"])) for problem in problems if problem["type"] == "extra_forbidden"]
        if unknown:
            raise APIError(400, f"Unsupported field(s): {', '.join(unknown)}.", param=unknown[0],
                           code="unsupported_field") from None
        problem = problems[0]
        # Drop the names pydantic gives the members of a union ("str", "list[str]") from the field's path.
        where = ".".join(str(part) for part in problem["loc"]
                         if str(part) not in ("str", "int", "float", "bool") and not str(part).startswith(("list[", "function-")))
        raise APIError(400, f"Invalid value for '{where}': {problem['msg']}.", param=where or None,
                       code="invalid_value") from None
    if isinstance(request, ChatCompletionRequest) and request.max_tokens and request.max_completion_tokens:
        raise APIError(400, "Give max_tokens or max_completion_tokens, not both.", param="max_completion_tokens")
    return request
