"""The request bodies the server accepts, its limits, and its OpenAI-shaped errors.

Every request model forbids fields it does not know: a field the server does not support is answered with a 400
that names it, never silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator


MAX_TOP_LOGPROBS = 20
# OpenAI's range for `logit_bias` values: -100 bans a token, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0
# Past these, scores overflow float32 (temperature divides the logits, alpha multiplies log-probs of up to ~1e2 nats).
MIN_TEMPERATURE = 1e-5
# OpenAI allows 4 stop sequences; evaluation clients send more (lm-evaluation-harness adds EOS to a task's list).
MAX_STOPS = 16
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
        max_prompts (`int`, *optional*, defaults to 32): prompts in one completions request (a list of prompts).
        max_logprobs (`int`, *optional*, defaults to 20): largest `logprobs` / `top_logprobs` (vLLM's
            `--max-logprobs`; OpenAI's cap is 20).
        max_batch (`int`, *optional*, defaults to 16): greedy requests for the same model that may share one batched
            `generate()` call (1: each runs alone). Measured in `benchmarks/serve_load.py`: 3-4x the throughput at 32
            clients, with every greedy answer equal to the one the request gets alone.
    """

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 1
    max_queued: int = 64
    max_prompts: int = 32
    max_logprobs: int = MAX_TOP_LOGPROBS
    max_batch: int = 16

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
    logit_bias: dict[str, float] | None = None
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"values are between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}, got {bias}")
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
        if len(stops) > MAX_STOPS or any(not stop for stop in stops):
            raise ValueError(f"at most {MAX_STOPS} stop sequences, none of them empty")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Request):
    """`POST /v1/completions`: one or several prompts, each a string or a list of token ids.

    `echo` returns the prompt before the completion, and with `logprobs` the log-probs of its tokens (the first has
    none); `max_tokens=0` with `echo` scores the prompt without generating (what log-likelihood evaluation sends).
    `return_tokens_as_token_ids` (vLLM's extension) names tokens `token_id:N` instead of by their text.
    """

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    return_tokens_as_token_ids: bool | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value):
        def ids(item):
            return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        if not (isinstance(value, str) or ids(value) or (isinstance(value, list) and (
                all(isinstance(item, str) for item in value) or all(ids(item) for item in value)))):
            raise ValueError("must be a string, a list of token ids, or a list of either (all of one kind)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

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
    top_logprobs: int | None = Field(default=None, ge=0)

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's route, which lm-evaluation-harness probes): a prompt or chat messages to token ids."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    """`POST /detokenize`: token ids to text."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


def parse_request(model: type[BaseModel], payload) -> BaseModel:
    """Validates a decoded JSON body; any problem becomes one 400 naming the fields.

    Args:
        model (`type`): `CompletionRequest`, `ChatCompletionRequest`, `TokenizeRequest` or `DetokenizeRequest`.
        payload: the decoded JSON body.

    Examples:

    ```python
    >>> from hf_plugin.serving.protocol import APIError, CompletionRequest, parse_request
    >>> parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", "max_tokens": 4, "alpha": 0.5}).alpha
    0.5
    >>> try:
    ...     parse_request(CompletionRequest, {"model": "m", "prompt": "Hi", "frequency_penalty": 1})
    ... except APIError as error:
    ...     print(error.status, error.body()["error"]["message"])
    400 Unsupported field(s): frequency_penalty.

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
    if isinstance(request, TokenizeRequest) and (request.prompt is None) == (request.messages is None):
        raise APIError(400, "Give a prompt or messages to tokenize, one of the two.", param="prompt")
    return request
