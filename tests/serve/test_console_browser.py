"""The web console (/console) in headless Chromium against a real metered `lmforge serve`.

The server is a subprocess on 127.0.0.1 serving the default model (SmolLM2-135M GGUF) with a SQLite ledger in
tmp_path; its tenant, key and price are made with the `lmforge admin` CLI. Chromium is Debian's (/usr/bin/chromium),
driven by Playwright's sync API through the page's accessible labels and roles. What the browser shows is checked
against the ledger read straight from the database. Screenshots of each page go to
`$LMFORGE_TEST_ARTIFACTS/console/` (default: `<repo>/test-artifacts/console/`, gitignored).

Without chromium (or Playwright) the browser tests skip with the reason, unless LMFORGE_REQUIRE_BROWSER=1, where
they fail. The first test needs neither: it checks over plain HTTP that /console serves its files with the right
content types and Content-Security-Policy.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from lmforge.serve.db import Database, usage
from lmforge.serve.metering import format_usd
from lmforge.serve.routes.console import CSP
from tests.serve.servers import free_port, ledger_rows, settled_row, wait_ready

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
MODEL = "smol"
TENANT = "acme"
IN_PRICE, OUT_PRICE = 150_000, 600_000  # $0.15 / $0.60 per million tokens, in micro-USD per million
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24
TIMEOUT_MS = 30_000  # one Playwright wait; the CPU is shared, generation is slow when it is busy


# --- the server ---------------------------------------------------------------------------------------------


class Server:
    """A metered `lmforge serve` subprocess with an admin token; its output in a log file."""

    def __init__(self, model: Path, home: Path, database_url: str, admin_token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "serve.log"
        env = {**_env(home), "LMFORGE_ADMIN_TOKEN": admin_token}
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model), "--served-name", MODEL,
               "--port", str(self.port), "--log-level", "warning", "--kv-cache-mb", "64",
               "--database-url", database_url]  # fmt: skip
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        wait_ready(self.url, self.proc, self.log.read_text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "LMFORGE_THREADS": "1", "LMFORGE_HOME": str(home)}
    for name in ("LMFORGE_DATABASE_URL", "LMFORGE_ADMIN_TOKEN"):
        env.pop(name, None)
    return env


def _admin_cli(home: Path, database_url: str, *args: str) -> str:
    """`lmforge admin ...`: its stdout (the secret, for `key create`)."""
    cmd = [sys.executable, "-m", "lmforge", "admin", *args, "--database-url", database_url]
    done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Deployment:
    def __init__(self, server: Server, db: Database, secret: str, admin_token: str) -> None:
        self.server, self.db, self.secret, self.admin_token = server, db, secret, admin_token
        self.url = server.url

    def rows(self) -> list:
        return ledger_rows(self.db)

    def settled_row(self, request_id: str, timeout: float = 10.0):
        return settled_row(self.db, request_id, timeout, poll_s=0.05)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, smollm2_gguf) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("console")
    database_url = f"sqlite:///{home / 'lmforge.db'}"
    _admin_cli(home, database_url, "tenant", "create", TENANT)  # creates the database: first, alone
    admin_token = secrets.token_urlsafe(24)
    server = Server(smollm2_gguf, home, database_url, admin_token)
    db = Database(database_url)
    try:
        # while the model loads (no request can be served before it is ready, so none goes unpriced)
        secret = _admin_cli(home, database_url, "key", "create", "--tenant", TENANT, "--name", "browser")
        _admin_cli(home, database_url, "price", "set", MODEL, "--input", "0.15", "--output", "0.60")
        assert secret.startswith("lmf-")
        server.wait_ready()
        yield Deployment(server, db, secret, admin_token)
    finally:
        db.close()
        assert server.stop() == 0, server.log.read_text()


# --- the files over plain HTTP ---------------------------------------------------------------------------------


class _Refs(HTMLParser):
    """Every URL the page refers to, and any inline script or style (which the CSP would block)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "action", "formaction") and value is not None:
                self.urls.append(value)
            if name == "style" or name.startswith("on"):
                self.inline.append(f"<{tag} {name}=...>")
        if tag == "style":
            self.inline.append("<style>")
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("<script> with inline code")


def test_console_serves_its_files_with_content_types_and_csp(deployment):
    static = resources.files("lmforge.serve").joinpath("static")
    types = {
        "/console": ("text/html; charset=utf-8", "index.html"),
        "/console/console.css": ("text/css; charset=utf-8", "console.css"),
        "/console/console.js": ("text/javascript; charset=utf-8", "console.js"),
    }
    with httpx.Client(base_url=deployment.url) as client:  # no credentials: the page holds no data
        for path, (content_type, name) in types.items():
            r = client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == content_type, path
            assert r.headers["content-security-policy"] == CSP, path
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.content == static.joinpath(name).read_bytes()  # served from the package's resources

        # the policy: own scripts only (no inline, no eval), nothing fetched from elsewhere, never framed
        policy = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"

        r = client.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/console"
        r = client.get("/console/")
        assert r.status_code == 307 and r.headers["location"] == f"{deployment.url}/console"
        for path in ("/console/secret.txt", "/console/..%2Fapp.py", "/console/%2e%2e%2f__init__.py"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == "not_found"

    # the page works under that policy and offline: it refers only to its own two files, nothing inline
    refs = _Refs()
    refs.feed(static.joinpath("index.html").read_text())
    assert sorted(refs.urls) == ["/console/console.css", "/console/console.js", "data:,"]
    assert refs.inline == []
    for name in ("index.html", "console.css", "console.js"):
        text = static.joinpath(name).read_text()
        external = [u for u in re.findall(r"https?://[^\s\"'`)]+", text) if u != "http://www.w3.org/2000/svg"]
        assert external == [], name
    # server text only ever reaches the page as text
    js = static.joinpath("console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink


# --- in the browser ------------------------------------------------------------------------------------------


def _require_browser() -> None:
    reason = None
    if not CHROMIUM.exists():
        reason = f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "Playwright's Python package is not installed (pip install playwright)"
    if reason is not None:
        if os.environ.get("LMFORGE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _artifacts() -> Path:
    root = os.environ.get("LMFORGE_TEST_ARTIFACTS")
    folder = (Path(root) if root else REPO / "test-artifacts") / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(deployment):
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own sessionStorage) that fails the test on any script error or CSP violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and "Failed to load resource" not in m.text  # refused requests are expected
            else None
        ),
    )
    yield page
    context.close()
    assert problems == []


def _sign_in(page, url: str, token: str) -> None:
    page.goto(url + "/")
    page.get_by_label("API key or admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def _num(text: str) -> int:
    return int(text.replace(",", "").strip())


# Records the assistant reply's length at every DOM change, and whether it was still streaming then.
_RECORD = """() => {
  window.__seen = [];
  const list = document.getElementById("transcript");
  new MutationObserver(() => {
    const replies = list.querySelectorAll(".message.assistant");
    const last = replies[replies.length - 1];
    if (last) window.__seen.push([last.querySelector(".content").textContent.length,
                                  last.classList.contains("streaming")]);
  }).observe(list, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.mark.browser
def test_sign_in_chat_streams_and_usage_matches_the_ledger(deployment, page):
    d, shots = deployment, _artifacts()

    # / leads to the console; a wrong key shows the server's own message
    page.goto(d.url + "/")
    assert page.url == d.url + "/console"
    page.get_by_label("API key or admin token").fill("lmf-not-a-real-key-0000")
    page.get_by_role("button", name="Sign in").click()
    told = httpx.get(d.url + "/v1/models", headers={"Authorization": "Bearer lmf-not-a-real-key-0000"})
    assert told.status_code == 401
    alert = page.get_by_role("alert").filter(has_text="Incorrect API key")
    alert.wait_for()
    assert alert.text_content() == told.json()["error"]["message"]
    page.screenshot(path=shots / "01-sign-in-error.png")

    # sign in: the key lives in sessionStorage, never in the URL
    page.get_by_label("API key or admin token").fill(d.secret)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Playground").wait_for()
    assert page.evaluate("() => Object.values(sessionStorage).join()").count(d.secret) == 1
    assert d.secret not in page.url
    page.reload()  # the session survives a reload of the tab
    page.get_by_role("heading", name="Playground").wait_for()
    assert page.get_by_role("button", name="Tenants & keys").is_hidden()
    model = page.get_by_label("Model", exact=True)
    page.wait_for_function("() => document.getElementById('chat-model').options.length > 0")
    assert model.input_value() == MODEL

    # a chat message: the reply grows while it streams, then the usage the server sent is shown
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(MAX_TOKENS))
    page.get_by_label("Message").fill(QUESTION)
    page.evaluate(_RECORD)
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".message.assistant").last
    reply.locator(".meta").filter(has_text="tokens").wait_for()
    seen = page.evaluate("() => window.__seen")
    while_streaming = sorted({n for n, streaming in seen if streaming and n > 0})
    assert len(while_streaming) >= 2, f"the reply did not grow while streaming: {seen}"
    text = reply.locator(".content").text_content()
    assert text and len(text) > while_streaming[0]
    meta = reply.locator(".meta").text_content()
    request_id = reply.get_attribute("data-request-id")
    assert request_id and request_id.startswith("chatcmpl-") and request_id in meta
    shown_prompt, shown_completion = (
        _num(reply.get_attribute(a)) for a in ("data-prompt-tokens", "data-completion-tokens")
    )
    assert f"{shown_prompt} prompt + {shown_completion} completion" in meta
    page.screenshot(path=shots / "02-playground.png")

    row = d.settled_row(request_id)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (
        "completed",
        shown_prompt,
        shown_completion,
    )
    assert row.cost_pusd == shown_prompt * IN_PRICE + shown_completion * OUT_PRICE > 0

    # stop: the fetch is aborted mid-stream and the server bills what it generated as cancelled
    page.get_by_label("Max tokens").fill("400")
    page.get_by_label("Message").fill("Write a long story about a dragon who learns to bake bread.")
    page.get_by_role("button", name="Send").click()
    story = page.locator(".message.assistant").last
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('.message.assistant')].pop();"
        " return r.classList.contains('streaming') && r.querySelector('.content').textContent.length > 0; }"
    )
    page.get_by_role("button", name="Stop").click()
    story.locator(".meta").filter(has_text="Stopped").wait_for()
    assert page.get_by_role("button", name="Send").is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()
    page.screenshot(path=shots / "03-playground-stopped.png")
    stopped_id = story.get_attribute("data-request-id")
    stopped = d.settled_row(stopped_id)
    assert stopped.status == "cancelled" and 1 <= stopped.completion_tokens < 400

    # the usage page: both requests, with the ledger's numbers
    page.get_by_role("button", name="Usage").click()
    recent = page.locator("#usage-recent tbody tr")
    page.locator(f'#usage-recent tr[data-request-id="{stopped_id}"]').wait_for()
    rows = [r for r in d.rows() if r.status != "pending"]
    assert recent.count() == len(rows) == 2
    for r in rows:
        cells = page.locator(f'#usage-recent tr[data-request-id="{r.request_id}"] td').all_text_contents()
        assert cells[1:] == [
            r.request_id,
            MODEL,
            r.status,
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            format_usd(r.cost_pusd),
        ]
    model_row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODEL, exact=True))
    assert model_row.locator("td").all_text_contents() == [
        str(len(rows)),
        f"{sum(r.prompt_tokens for r in rows):,}",
        f"{sum(r.completion_tokens for r in rows):,}",
        format_usd(sum(r.cost_pusd for r in rows)),
    ]
    today = datetime.now(UTC).date().isoformat()
    bar = page.locator(f'#usage-chart rect[data-date="{today}"]')
    assert _num(bar.get_attribute("data-tokens")) == sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert float(bar.get_attribute("height")) > 0
    page.screenshot(path=shots / "04-usage.png", full_page=True)

    # the reply equals the server's non-streamed answer to the same request (the stream was reassembled whole)
    reference = httpx.post(
        d.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {d.secret}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },  # fmt: skip
        timeout=60,
    ).json()
    assert reference["choices"][0]["message"]["content"] == text
    assert reference["usage"]["prompt_tokens"] == shown_prompt

    # sign out forgets the key and what was shown with it
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key or admin token").wait_for()
    assert page.evaluate("() => sessionStorage.length") == 0
    assert page.locator(".message").count() == 0 and recent.count() == 0


@pytest.mark.browser
def test_admin_creates_tenant_and_key_then_revokes_it(deployment, page):
    d, shots = deployment, _artifacts()
    _sign_in(page, d.url, d.admin_token)
    page.get_by_role("heading", name="Tenants & keys").wait_for()
    assert page.get_by_role("button", name="Playground").is_hidden()

    page.get_by_label("New tenant name").fill("globex")
    page.get_by_role("button", name="Create tenant").click()
    page.locator("#tenants").get_by_role("cell", name="globex", exact=True).wait_for()

    # a key for it, named with markup that must stay text
    name = '<img src=x onerror="window.__pwned=1">'
    page.get_by_label("Tenant", exact=True).select_option("globex")
    page.get_by_label("Key name").fill(name)
    page.get_by_label("Requests per minute (optional)").fill("5")
    page.get_by_role("button", name="Create key").click()
    secret_box = page.get_by_label("Secret", exact=True)
    secret_box.wait_for()
    secret = secret_box.input_value()
    assert secret.startswith("lmf-") and secret != d.secret
    row = page.locator("#keys tbody tr").filter(has_text=secret[:12])
    row.wait_for()
    cells = row.locator("td").all_text_contents()
    assert cells[1:4] == ["globex", name, f"{secret[:12]}…"] and cells[7:9] == ["5 RPM", "active"]
    assert page.locator("#keys img").count() == 0 and page.evaluate("() => window.__pwned") is None
    page.screenshot(path=shots / "05-admin-new-key.png", full_page=True)

    # the secret is real: it opens /v1 with the limit it was given
    r = httpx.get(d.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "5"

    # shown once: dismissed, it is gone from the page
    page.get_by_role("button", name="Done").click()
    assert secret_box.is_hidden() and secret_box.input_value() == ""
    assert secret not in page.content()

    # revoke (after the confirmation dialog): the table says so and the server refuses the key
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Revoke key {secret[:12]}").click()
    row.get_by_text("revoked", exact=True).wait_for()
    r = httpx.get(d.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_revoked"

    # the admin's usage page shows any tenant's month, with the ledger's totals
    page.get_by_role("button", name="Usage").click()
    page.get_by_label("Show tenant").select_option(TENANT)
    page.locator("#stat-requests").wait_for()
    with d.db.read() as conn:
        settled = conn.execute(sa.select(sa.func.count()).where(usage.c.status != "pending")).scalar_one()
    page.wait_for_function(
        f"() => document.querySelector('#stat-requests .value').textContent === '{settled}'"
    )
    page.screenshot(path=shots / "06-admin-usage.png", full_page=True)
