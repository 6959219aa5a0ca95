"""The server's settings: one frozen dataclass, filled by the `lmforge serve` command."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import UserError


@dataclass(frozen=True)
class Settings:
    model_name: str  # the name clients send as `model`; any other name is a 404
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

    def __post_init__(self) -> None:
        if not self.model_name:
            raise UserError("the served model needs a name")
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
