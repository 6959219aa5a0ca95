"""What every route needs: the app's state, reached through the request (no module-level singletons)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import EngineClient, EngineDraining, EngineOverloaded
from lmforge.serve.auth import KeyCache
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.settings import Settings

if TYPE_CHECKING:
    from lmforge.serve.db import Database
    from lmforge.serve.ledger import Ledger
    from lmforge.serve.routes.classify import ServedClassifier
    from lmforge.serve.upstream import Upstream


@dataclass
class ServerState:
    settings: Settings
    engine: EngineClient
    tokenizer: Tokenizer
    metrics: ServerMetrics
    draining: bool = False  # set on shutdown: new generation requests get 503, /ready says 503
    db: Database | None = None  # None = an open server: no auth, no metering
    instance_id: str | None = None  # this process's row in `instances` (metered servers only)
    classifier: ServedClassifier | None = None  # served at /v1/classifications beside the generation model
    upstreams: dict[str, Upstream] = field(default_factory=dict)  # models forwarded to other servers, by name
    ledger: Ledger | None = None  # the thread the request path's database work runs on (with a db)
    keys: KeyCache = field(default_factory=KeyCache)  # the metered routes' keys (see auth.KeyCache)

    def admit(self, num_requests: int) -> None:
        """Refuse work the engine should not queue: 503 while not ready or draining, 429 when the queue is full."""
        stats = self.engine.health()
        if self.draining or stats.draining or not stats.ready:
            raise EngineDraining()
        # Requests wait only when every running slot is taken; with none waiting the engine may have room,
        # and it enforces its own limit (EngineOverloaded) knowing its capacity.
        if stats.num_waiting > 0 and stats.num_waiting + num_requests > self.settings.max_queue:
            raise EngineOverloaded()


def get_state(request: Request) -> ServerState:
    return request.app.state.lmforge
