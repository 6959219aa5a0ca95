"""The FastAPI app: `create_app(settings, engine, tokenizer)` builds it; nothing is created at import time.

Shutdown (graceful drain): `run(app, settings)` serves with uvicorn; on SIGINT/SIGTERM the app stops admitting
(new generation requests get 503, /ready says 503), uvicorn stops accepting connections, running requests get
up to `settings.drain_timeout_s` to finish, then `run` returns. Starting and stopping the engine is the
caller's job (it owns the engine), and so is opening and closing the database.

With a database the server is metered: at start-up the process registers itself in `instances` and settles the
requests that dead processes left pending (their holds go back to the budgets); then it heartbeats every
`settings.heartbeat_s`, settling again each time, so a replica that was killed is cleaned up by the others.
Every authenticated /v1 response carries OpenAI's x-ratelimit-* headers (see `RateLimitHeaders`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import EngineClient
from lmforge.errors import UserError
from lmforge.serve import errors, metering
from lmforge.serve.db import Database
from lmforge.serve.deps import ServerState
from lmforge.serve.ledger import Ledger
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.middleware import BodySizeLimit, CountRequests
from lmforge.serve.routes import admin, classify, console, openai, ops, usage
from lmforge.serve.settings import Settings
from lmforge.serve.upstream import Upstream

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    engine: EngineClient,
    tokenizer: Tokenizer | None,
    *,
    db: Database | None = None,
    classifier: classify.ServedClassifier | None = None,
) -> FastAPI:
    """`db=None`: an open server (no auth, no metering); with a database, /v1/* needs an API key.
    `classifier`: a text classifier served at /v1/classifications beside the generation model.
    `settings.upstreams`: models forwarded to OpenAI-compatible servers (their API keys are read from the
    environment here). Without a local model (`settings.model_name` None) `engine` is `upstream.NoEngine` and
    `tokenizer` None."""
    upstreams = {u.name: Upstream(u) for u in settings.upstreams}
    if classifier is not None and classifier.name in upstreams:
        raise UserError(f"the classifier and an upstream are both called {classifier.name!r}")
    state = ServerState(
        settings, engine, tokenizer, ServerMetrics(engine), db=db, classifier=classifier, upstreams=upstreams
    )
    if db is not None:
        batch_size = state.metrics.ledger_batch_size
        state.ledger = Ledger(
            db,
            lambda now: engine.health().next_step_in(now),
            lambda kind, n: batch_size.labels(kind=kind).observe(n),
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.draining = False
        heartbeat = None
        for up in upstreams.values():  # one connection pool per upstream, on the serving event loop
            up.open()
        if db is not None:
            state.instance_id = await run_in_threadpool(metering.register_instance, db)
            await _reconcile(db, settings.stale_after_s)
            heartbeat = asyncio.create_task(_heartbeat(db, state.instance_id, settings))
        try:
            yield
        finally:
            state.draining = True  # uvicorn has already let running requests finish (or timed them out)
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                # a process that is gone is no longer "alive": anything it left pending is settled by the next
                # reconcile of any process instead of after stale_after_s
                try:
                    await run_in_threadpool(metering.unregister_instance, db, state.instance_id)
                except Exception:
                    log.exception("could not unregister this server process")
            for up in upstreams.values():
                await up.aclose()
            if state.ledger is not None:  # every request has settled by now (uvicorn drained them)
                state.ledger.close()

    app = FastAPI(title="lmforge", version="0.1.0", lifespan=lifespan)
    app.state.lmforge = state
    app.include_router(openai.router)
    app.include_router(classify.router)
    app.include_router(ops.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    app.include_router(console.router)  # the web console at /console (static files)
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
    if db is not None:
        app.add_middleware(RateLimitHeaders, db=db)
    endpoints = frozenset(
        r.path for r in (*openai.router.routes, *classify.router.routes, *ops.router.routes)
    )
    app.add_middleware(CountRequests, metrics=state.metrics, endpoints=endpoints)
    return app


async def _reconcile(db: Database, stale_after_s: float) -> None:
    """Fail what stopped processes left pending and release its holds (reconcile_stale logs how many)."""
    await run_in_threadpool(metering.reconcile_stale, db, stale_after_s=stale_after_s)


async def _heartbeat(db: Database, instance_id: str, settings: Settings) -> None:
    """Say this process is alive, and settle what stopped ones left, every `heartbeat_s` until cancelled."""
    while True:
        await asyncio.sleep(settings.heartbeat_s)
        try:
            await run_in_threadpool(metering.heartbeat, db, instance_id)
            await _reconcile(db, settings.stale_after_s)
        except Exception:  # a database hiccup must not end the heartbeat: the next one retries
            log.exception("heartbeat failed")


class RateLimitHeaders:
    """OpenAI's x-ratelimit-* headers on every response to an authenticated /v1 request, streams included.

    The route's auth dependency leaves the key in the request's state, and an admission the headers it computed
    in its own transaction; a response that had none (a model list, a refused request) reads the key's current
    window. Headers the response already has (a 429's) are kept; an unauthenticated response gets none.
    """

    def __init__(self, app: ASGIApp, db: Database) -> None:
        self.app = app
        self.db = db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = await self._add_headers(scope, message)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _add_headers(self, scope: Scope, message: Message) -> Message:
        state = scope.get("state") or {}
        key = state.get("api_key")
        existing = [name for name, _ in message.get("headers", [])]
        if key is None or any(name.lower().startswith(b"x-ratelimit-") for name in existing):
            return message
        headers = state.get("ratelimit_headers")
        if headers is None:
            try:
                headers = await run_in_threadpool(metering.ratelimit_headers, self.db, key)
            except Exception:  # the response itself matters more than its headers
                log.exception("could not read the rate-limit window of key %s", key.id)
                return message
        extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        return {**message, "headers": [*message.get("headers", []), *extra]}


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
