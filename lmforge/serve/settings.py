"""The server's settings: frozen dataclasses, filled by the `lmforge serve` command."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.errors import UserError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class UpstreamSettings:
    """A model served by an OpenAI-compatible upstream (another `lmforge serve`, vLLM, llama.cpp's server,
    Ollama), forwarded and metered by this server: one entry of `lmforge serve --upstreams FILE.yaml`.

    The upstream's API key is never part of the settings (they end up in logs and process listings): only the
    name of the environment variable that holds it, read when the server starts.
    """

    name: str  # the name clients send as `model`
    url: str  # the upstream's base URL, /v1 included: http://gpu-box:8000/v1
    model: str = ""  # the upstream's own name for the model; "" = `name`
    api_key_env: str | None = None  # the environment variable holding the upstream's API key; None = no key
    max_tokens: int = 1024  # when a request gives none: the cap sent upstream, and what the budget holds
    timeout_s: float = 600.0  # longest wait for the upstream: to connect, to answer, between streamed chunks
    owned_by: str = "upstream"  # the `owned_by` of the model's card in /v1/models

    def __post_init__(self) -> None:
        where = f"upstream {self.name!r}"
        if not self.name or self.name != self.name.strip():
            raise UserError(f"an upstream needs a name without surrounding spaces, got {self.name!r}")
        url = self.url.strip().rstrip("/")
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
            raise UserError(
                f"{where}: url must be an http(s) base URL like http://host:8000/v1, got {self.url!r}"
            )
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "model", self.model or self.name)
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            raise UserError(
                f"{where}: api_key_env names the environment variable that holds the key (e.g. VLLM_API_KEY), "
                "not the key itself"
            )
        if self.max_tokens < 1:
            raise UserError(f"{where}: max_tokens must be at least 1, got {self.max_tokens}")
        if not self.timeout_s > 0:
            raise UserError(f"{where}: timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class Settings:
    model_name: str | None  # the name clients send for the local model; None = none (a pure gateway)
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 256  # requests waiting in the engine before new ones get 429
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are parsed
    default_max_tokens: int | None = None  # when a request gives none; None = whatever fits in the context
    drain_timeout_s: float = 30.0  # on shutdown, how long running requests may take to finish
    retry_after_s: int = 1  # the Retry-After sent with 429
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are listed ("*" for any)
    admin_token: str | None = None  # Bearer token of the admin API (/admin/v1); None = no admin API
    # Metered servers: how often this process says it is alive (and settles other processes' abandoned
    # requests), and how long a silent process's pending requests are kept before they count as failed.
    heartbeat_s: float = 10.0
    stale_after_s: float = 60.0
    upstreams: tuple[UpstreamSettings, ...] = ()  # models forwarded to OpenAI-compatible servers

    def __post_init__(self) -> None:
        if self.model_name is not None and not self.model_name:
            raise UserError("the served model needs a name")
        names = [u.name for u in self.upstreams]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"upstream names must be unique; given more than once: {', '.join(twice)}")
        local = self.model_name
        for name in names:  # `base:adapter` names the local model's LoRA adapters
            if local is not None and (name == local or name.startswith(local + ":")):
                raise UserError(
                    f"upstream {name!r} has the name of the local model {local!r} (or its adapters)"
                )
        if self.max_queue < 0:
            raise UserError(f"max_queue must be at least 0, got {self.max_queue}")
        if self.max_body_bytes < 1:
            raise UserError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise UserError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")
        if self.drain_timeout_s < 0:
            raise UserError(f"drain_timeout_s must be at least 0, got {self.drain_timeout_s}")
        if self.heartbeat_s <= 0:
            raise UserError(f"heartbeat_s must be positive, got {self.heartbeat_s}")
        if self.stale_after_s <= self.heartbeat_s:
            # a live process must never look dead between two of its own heartbeats
            raise UserError(
                f"the stale-after time ({self.stale_after_s} s) must be longer than the heartbeat interval "
                f"({self.heartbeat_s} s)"
            )
