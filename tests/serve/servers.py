"""Helpers the server tests share: a free port, an app served by uvicorn in a thread, waiting for a `lmforge serve`
subprocess to be ready, API keys and the ledger read straight from the database."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import openai
import sqlalchemy as sa
import uvicorn

from lmforge.serve import auth
from lmforge.serve.db import Database, usage


def free_port() -> int:
    """A free port of 127.0.0.1 (uvicorn's port=0 would hide which one it took)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving_app(app, grace_s: float = 5.0) -> Iterator[str]:
    """`app` on a free port of 127.0.0.1 (uvicorn in a thread) for the block: its base URL. The thread must
    have ended once the block is left (the graceful shutdown gives running requests `grace_s`)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=grace_s
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=grace_s + 10)
        assert not thread.is_alive()


def wait_ready(
    url: str, proc: subprocess.Popen, output: Callable[[], str], timeout: float = 120, poll_s: float = 0.1
) -> None:
    """Until `lmforge serve` at `url` answers 200 on /ready; its `output()` in the error if it exits first or
    is not ready within `timeout` (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output()}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    proc.kill()
    raise RuntimeError(f"server not ready:\n{output()}")


def metric(url: str, sample: str) -> float:
    """One sample's value on a server's /metrics page (`name{labels}` as written); KeyError if absent."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    raise KeyError(sample)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0, poll_s: float = 0.01) -> None:
    """Poll `condition` until it holds; fail with `what` (the awaited event) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(poll_s)


def post_and_leave(url: str, path: str, body: dict, secret: str, generating: Callable[[], bool],
                   linger_s: float = 0.2) -> None:  # fmt: skip
    """POST `body` to `url + path` and hang up `linger_s` after `generating()` turns true: a client that leaves
    mid-generation however long the server took to start (a read timeout would race the server's start)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_until(generating, "the server started generating")
        time.sleep(linger_s)


def new_key(db: Database, tenant: str = "acme", **kw) -> tuple[auth.ApiKey, str]:
    """A key of `tenant`, created first when it does not exist yet: the key and its secret."""
    if tenant not in {t.name for t in auth.list_tenants(db)}:
        auth.create_tenant(db, tenant)
    return auth.create_key(db, tenant, **kw)


def sdk(url: str, secret: str, **kw) -> openai.OpenAI:
    """The official client on the server at `url`, without retries (a retry would hide a refusal)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=secret, **({"max_retries": 0} | kw))


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def ledger_rows(db: Database) -> list:
    """Every usage row, oldest first."""
    with db.read() as conn:
        return conn.execute(sa.select(usage).order_by(usage.c.id)).all()


def settled_row(db: Database, request_id: str, timeout: float = 5.0, poll_s: float = 0.02):
    """The ledger row of `request_id` once it is settled (the server settles after the response is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        row = next((r for r in ledger_rows(db) if r.request_id == request_id), None)
        if row is not None and row.status != "pending":
            return row
        assert time.monotonic() < deadline, f"request {request_id} not settled: {row}"
        time.sleep(poll_s)
