"""The FastAPI app: `create_app(settings, engine, tokenizer)` builds it; nothing is created at import time.

Shutdown (graceful drain): `run(app, settings)` serves with uvicorn; on SIGINT/SIGTERM the app stops admitting
(new generation requests get 503, /ready says 503), uvicorn stops accepting connections, running requests get
up to `settings.drain_timeout_s` to finish, then `run` returns. Starting and stopping the engine is the
caller's job (it owns the engine).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import EngineClient
from lmforge.serve import errors
from lmforge.serve.deps import ServerState
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.middleware import BodySizeLimit, CountRequests
from lmforge.serve.routes import openai, ops
from lmforge.serve.settings import Settings


def create_app(settings: Settings, engine: EngineClient, tokenizer: Tokenizer) -> FastAPI:
    state = ServerState(settings, engine, tokenizer, ServerMetrics(engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.draining = False
        yield
        state.draining = True  # uvicorn has already let running requests finish (or timed them out)

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan)
    app.state.lmforge = state
    app.include_router(openai.router)
    app.include_router(ops.router)
    errors.install(app, retry_after_s=settings.retry_after_s)
    # added innermost first: requests are counted with whatever status the limit or CORS gave them
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    endpoints = frozenset(r.path for r in (*openai.router.routes, *ops.router.routes))
    app.add_middleware(CountRequests, metrics=state.metrics, endpoints=endpoints)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, but a shutdown signal first marks the app as draining."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would die with 143.
        # The drain is the orderly exit the signal asked for: forget the signal and let the CLI exit 0.
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True  # before uvicorn closes: keep-alive clients get 503, not a hang
        super().handle_exit(sig, frame)


def run(app: FastAPI, settings: Settings, *, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then drain (see the module docstring) and return."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    DrainingServer(config, app.state.lmforge).run()
