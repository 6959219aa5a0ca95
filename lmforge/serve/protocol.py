"""OpenAI's request and response bodies as pydantic models (the subset lmforge serves).

Requests are strict about types (OpenAI rejects `"temperature": "0.5"`) and ignore unknown fields (as OpenAI
does). Ranges are declared here too, so errors name the field and the OpenAPI document states them;
`SamplingParams`, which `to_sampling_params()` builds, checks them again for the engine. vLLM's extras `top_k`,
`min_p`, `repetition_penalty`, `stop_token_ids` and `ignore_eos` are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from lmforge.engine import SamplingParams
from lmforge.errors import UserError

MAX_N = 128  # OpenAI's limit on choices per request
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
# torch.Generator takes 64-bit seeds; choice i of a request uses seed + i
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1 - MAX_N


_TokenId = Annotated[int, Field(ge=0)]
_NonEmpty = Field(min_length=1)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _SamplingRequest(_Request):
    """The fields chat and completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    stop_token_ids: list[_TokenId] | None = None
    ignore_eos: bool = False

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return None

    def to_sampling_params(self, *, default_max_tokens: int) -> SamplingParams:
        """The engine's parameters; raises UserError for values out of range. The caller clamps max_tokens
        to the context once it knows the prompt's length."""
        if self.response_format is not None and self.response_format.type != "text":
            raise UserError(f"response_format type {self.response_format.type!r} is not supported yet")
        max_tokens = self._requested_max_tokens()
        fields: dict[str, Any] = {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "seed": self.seed,
            "logprobs": self._logprobs(),
        }
        # null means "the default", as in OpenAI's API
        return SamplingParams(
            **{k: v for k, v in fields.items() if v is not None}, ignore_eos=self.ignore_eos
        )


class CompletionRequest(_SamplingRequest):
    prompt: (
        str
        | Annotated[list[str], _NonEmpty]
        | Annotated[list[_TokenId], _NonEmpty]
        | Annotated[list[Annotated[list[_TokenId], _NonEmpty]], _NonEmpty]
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # top alternatives; 0 = the chosen only
    echo: bool | None = False
    suffix: str | None = None

    def _logprobs(self) -> int | None:
        if self.echo:
            raise UserError("echo is not supported yet")
        if self.suffix:
            raise UserError("suffix is not supported yet")
        return self.logprobs


class ChatMessage(BaseModel):
    """One message; content is text or a list of text parts (`chat_format.validate_messages` checks them)."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def _requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise UserError("top_logprobs needs logprobs set to true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


# --- responses ----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role": ...} once, then {"content": ...}, finally {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # sent (as null until the last chunk) only with stream_options.include_usage


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A completions response, and (with usage None or omitted) each of its streamed chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """vLLM's card: a LoRA adapter is its own model, `base:adapter`, whose `parent` is the base model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None  # vLLM's context length; None for an upstream model (unknown here)
    root: str | None = None  # the model the card's weights come from (the base, or the adapter's name)
    parent: str | None = None  # an adapter's base model; None for the base itself


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
