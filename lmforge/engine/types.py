"""The engine's plain data: what a request asks for and what comes back. No torch here.

The server builds these (`protocol.py` -> `to_sampling_params()`), the engine consumes them; keeping them free of
tensors lets both sides and their tests construct them cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import UserError

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs


def _number(name: str, value: object) -> float:
    # bool is an int subclass; `temperature=True` is a caller bug, not 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    return value


def _between(name: str, value: object, low: float, high: float) -> None:
    x = _number(name, value)
    if not low <= x <= high:  # also rejects NaN
        raise UserError(f"{name} must be between {low:g} and {high:g}, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request. Ranges follow OpenAI's API; out-of-range values raise UserError.

    Penalty definitions (as vLLM): `repetition_penalty` is HF's (CTRL paper) over prompt + generated tokens,
    dividing positive logits and multiplying negative ones; `frequency_penalty` and `presence_penalty` are
    OpenAI's, over generated tokens only: `logit -= frequency * count + presence * (count > 0)`.
    `stop` strings are matched by the caller, which detokenises; the engine only sees `stop_token_ids`.
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top logprobs per token (0..20); 0 = only the chosen token's; None = none

    def __post_init__(self) -> None:
        max_tokens = _integer("max_tokens", self.max_tokens)
        if max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
        _between("temperature", self.temperature, 0.0, 2.0)
        top_k = _integer("top_k", self.top_k)
        if top_k < -1:
            raise UserError(f"top_k must be -1 or 0 (off) or a positive integer, got {top_k}")
        top_p = _number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be greater than 0 and at most 1, got {self.top_p}")
        _between("min_p", self.min_p, 0.0, 1.0)
        rep = _number("repetition_penalty", self.repetition_penalty)
        if not (rep > 0.0 and math.isfinite(rep)):
            raise UserError(
                f"repetition_penalty must be a positive number (1 = off), got {self.repetition_penalty}"
            )
        _between("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _between("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if self.seed is not None:
            _integer("seed", self.seed)
        if self.logprobs is not None:
            n = _integer("logprobs", self.logprobs)
            if not 0 <= n <= MAX_LOGPROBS:
                raise UserError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {n}")
        # a bare string would otherwise become a tuple of characters
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise UserError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise UserError(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        object.__setattr__(self, "stop", tuple(stop))  # frozen: normalise via object.__setattr__
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the raw model distribution, with the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; empty unless asked for


@dataclass
class RequestOutput:
    """What the engine reports for one request after a step: the tokens new since the last report.

    Token counts are the billing truth: the server never re-tokenises to count usage.
    """

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far, including new_token_ids
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos / stop token), "length", "abort"
    new_logprobs: list[TokenLogprob] | None = None  # one per new token when the request asked for logprobs
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class ModelInfo:
    name: str
    max_seq_len: int
    vocab_size: int
    created: int  # unix time the model was loaded (OpenAI's `created`)
    owned_by: str = "lmforge"
    loras: tuple[str, ...] = ()  # LoRA adapters served over the model, requested as `lora=name`


@dataclass
class EngineStats:
    """A snapshot for /health, /ready and /metrics."""

    ready: bool
    draining: bool
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV-cache blocks in use
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    step_started: float | None = None  # time.monotonic() when the running step began; None between steps
    step_s: float = 0.0  # how long a step takes: the shorter of the last two (a guess that errs short)

    def next_step_in(self, now: float) -> float:
        """Seconds until the running step should end, when the engine takes the requests that came meanwhile;
        0 between steps."""
        if self.step_started is None:
            return 0.0
        return max(0.0, self.step_started + self.step_s - now)


class EngineOverloaded(Exception):
    """The waiting queue is full: the server answers 429 with Retry-After."""


class EngineDraining(Exception):
    """The engine is shutting down or not yet loaded: the server answers 503."""
