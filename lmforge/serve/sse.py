"""Server-sent events that stop generating the moment the client goes away.

Starlette's StreamingResponse notices a disconnect only when a send fails, which may be several tokens later
(the transport buffers) and leaves the body iterator unclosed. Here a second task waits for the ASGI
`http.disconnect` message, and the event iterator is always closed, so the engine requests behind it are
aborted at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(Response):
    """A response streaming already-framed events (`event(...)`, `DONE`)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(status_code=200)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx would otherwise buffer the stream
        ]
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async with aclosing(self._events) as events:
                    async for chunk in events:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away while we were sending (ASGI 2.4)
                pass
            tg.cancel_scope.cancel()
