"""Serving throughput and latency of `lmforge serve` under concurrent streaming chat load.

    python bench/serve.py [--model smollm2-135m-instruct] [--levels 1,4,16,64] [--requests 32]
                          [--max-tokens 64] [--peer-url http://127.0.0.1:8080 [--peer-name N] [--peer-model M]]
                          [--record]

Starts the server as a subprocess (all cores), waits for /ready, and sends --requests streamed chat requests
(temperature 0, `ignore_eos`, `max_tokens` 64) at each concurrency level, after one warm-up request. Then
a shared-system-prompt run (16 concurrent, 32 requests, one ~400-token system prompt) with prefix caching on
and off (a server restart). Output tokens come from the stream's `usage`; TTFT is request send to the first
content delta, ITL the gaps between content deltas. The levels cycle through QUESTIONS' 64 prompts, --requests
per level: with the defaults, level 16 repeats level 1's questions and level 64 level 4's, so a server with
prefix caching (lmforge, vLLM) finds those prompts cached and pays only their last token's prefill; run one
level alone (`--levels 16`) for fresh prompts. --peer-url runs the same load against an already-running
OpenAI-compatible server instead (no server is started). --record appends the tables to bench/RESULTS.md.
This machine's speed drifts by a third from hour to hour, so every lmforge run also times the engine's own
16-sequence decode step, alone, before the load and after it (bench/decode_step.py --default-only): 16 clients
can get at most 16 tokens a step, and the ratio of the 16-client figure to that ceiling compares across hours.

    python bench/serve.py --metered [--model ...] [--clients 16] [--requests 128] [--rounds 3]
                          [--pg-url postgresql+psycopg://...] [--record]

--metered measures what auth + metering + rate limiting cost: three servers run side by side (`--no-auth`;
metered on a fresh SQLite file; metered on a fresh PostgreSQL database, skipped if none can be reached), each
with a key that has RPM/TPM limits, a price and a budget, so every request takes the whole metered path
(admit, settle; the key is looked up once and then cached). Each round sends --requests non-streamed chat
requests with a 1-token completion from --clients concurrent clients to each server in turn (rotating the
order); the table gives each server's
median requests/s over the rounds, its ratio to the unmetered server's median, and the median of its per-round
ratios to the unmetered server's rate in the same round (drift between rounds cancels out of those), and the CPU
each request costs outside the engine: in the server process (all threads but the engine's, whose OpenMP team
spins between steps) and in PostgreSQL's processes. Those two are steadier than the rates, which swing with how
the clients fall into phase with the engine's steps. Last, each metered server's requests per ledger batch
(admits, settles) over the recorded rounds, from its /metrics (`lmforge_ledger_batch_size`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [
    "Why is the sky blue?", "How do vaccines train the immune system?", "What causes ocean tides?",
    "Explain how a refrigerator keeps food cold.", "What is the difference between weather and climate?",
    "How does a bicycle stay upright?", "Why do leaves change colour in autumn?", "How are rainbows formed?",
    "What is photosynthesis?", "How does compound interest work?", "Why do cats purr?",
    "What makes bread rise?", "How do airplanes stay in the air?", "What is a black hole?",
    "How does the heart pump blood?", "Why is the ocean salty?", "What is inflation in economics?",
    "How do solar panels make electricity?", "Why do we dream?", "How does a compass work?",
    "What is the water cycle?", "How do bees make honey?", "Why do onions make you cry?",
    "What is DNA and what does it do?", "How does a microwave oven heat food?", "Why do stars twinkle?",
    "What causes earthquakes?", "How do noise-cancelling headphones work?", "What is a prime number?",
    "How does GPS know where you are?", "Why does ice float on water?", "What is the greenhouse effect?",
    "How do birds migrate such long distances?", "What does a CPU do?", "Why do we have seasons?",
    "How does soap remove grease?", "What is the theory of evolution?", "How do volcanoes erupt?",
    "Why is exercise good for the brain?", "How does a battery store energy?", "What is a recession?",
    "How do plants know which way is up?", "Why does the moon have phases?", "How is glass made?",
    "What are the main causes of the French Revolution?", "How does the internet route a message?",
    "Give some tips for learning a new language.", "How does a camera lens focus light?",
    "What is machine learning, in simple terms?", "Why do some metals rust?", "How do fish breathe?",
    "What is the Pythagorean theorem used for?", "How does coffee affect the body?",
    "Why do we need sleep?", "How are mountains formed?", "What makes a good password?",
    "How does a thermostat work?", "Why do ships float?", "What is an ecosystem?",
    "How do antibiotics work?", "Describe how to plan a vegetable garden.", "What is gravity?",
    "How does recycling plastic work?", "Why is the Roman Empire important in history?",
]  # fmt: skip

SYSTEM_PROMPT = " ".join(
    [
        "You are Pip, the customer-service assistant of Harbour & Hearth, an online shop that sells kitchenware,",
        "bedding and small home appliances in the UK and Ireland. Be polite, brief and accurate, and never invent",
        "a policy that is not written below. Orders placed before 2 pm on a working day are dispatched the same",
        "day, later ones the next working day. Standard delivery takes three to five working days and costs",
        "£3.95, free over £50; express delivery takes one working day and costs £7.95. We do not deliver to the",
        "Channel Islands or to PO boxes. An order can be changed or cancelled within one hour of placing it, from",
        "the Orders page of the customer's account. Returns: any unused item in its original packaging may be",
        "returned within 30 days of delivery for a full refund; unsealed bedding cannot be returned unless it is",
        "faulty. Return postage is free with the prepaid label in the parcel; refunds reach the original payment",
        "method within five working days of the return arriving at our warehouse in Leeds. Appliances carry a",
        "two-year guarantee: for a faulty item, ask for a photo or short video of the fault and the order number,",
        "then offer a replacement, a repair or a refund, whichever the customer prefers; items under £15 are",
        "refunded without being sent back. Gift cards are valid for two years and cannot be exchanged for cash.",
        "Hearth Club members earn one point per pound spent; 100 points are worth £5 off a future order, and",
        "points expire after eighteen months without a purchase. Never ask for a full card number, a password or",
        "a security code. Complaints you cannot settle go to care@harbourhearth.example, where a person replies",
        "within one working day. If a customer is upset, apologise once, sincerely, then focus on what we can do.",
        "End every reply by asking whether there is anything else you can help with.",
    ]
)
SHOP_QUESTIONS = [
    "My kettle stopped working after three months, what can I do?", "How long does express delivery take?",
    "Can I return a duvet I opened but did not use?", "Do you deliver to Jersey?",
    "Can I pay for my order with a gift card?", "When do my loyalty points expire?",
    "I want to cancel the order I placed twenty minutes ago.", "How long will my refund take?",
    "Is delivery free if I spend £45?", "Can I exchange my gift card for cash?",
    "Do loyalty points work on sale items?", "My blender arrived broken, it cost £12.",
    "How many points do I need for a discount?", "I ordered at 3 pm on Friday, when will it ship?",
    "I am very unhappy with your service and want to complain.", "Can I send my parcel to a PO box?",
]  # fmt: skip


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    done: int = 0
    errors: int = 0
    no_usage: int = 0  # streams without a usage chunk: their tokens were counted from content deltas
    wall: float = 0.0
    cache: tuple[float, float] | None = None  # prefix cache hits, queries during the run


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


class Connection:
    """One load client's keep-alive HTTP/1.1 connection, on bare asyncio streams. The client shares this
    machine's cores with the server, so it must be light: streaming through httpx cost ~230 us of client CPU a
    token and this ~75, which gave the server 2-3% more tokens/s at 16 clients (bench/RESULTS.md, 2026-11-24)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.netloc = parts.hostname or "127.0.0.1", parts.port or 80, parts.netloc
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def sse(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """POST `body` as JSON: the `data:` fields of the server-sent events that answer it (chunked, sized or
        read to the end; any line ending). RuntimeError for a status other than 200."""
        payload = json.dumps(body).encode()
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), self.netloc.encode(), len(payload))
        ) + payload
        while True:
            reused = self.streams is not None
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            writer.write(request)
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if not reused:
                    raise
                # the server had closed this idle keep-alive connection: send it again on a new one
        status = int(head[0].split()[1])
        fields = {
            k.strip().lower(): v.strip().lower() for k, _, v in (h.partition(b":") for h in head[1:] if h)
        }
        chunked, length = fields.get(b"transfer-encoding") == b"chunked", fields.get(b"content-length")
        keep_alive = fields.get(b"connection") != b"close" and (chunked or length is not None)

        async def pieces() -> AsyncIterator[bytes]:
            if chunked:
                while size := int((await reader.readline()).split(b";")[0], 16):
                    yield (await reader.readexactly(size + 2))[:-2]
                await reader.readuntil(b"\r\n")  # the empty line after the last chunk
            elif length is not None:
                yield await reader.readexactly(int(length))
            else:
                yield await reader.read()  # to the end: the server closes the connection

        if status != 200:
            text = b"".join([piece async for piece in pieces()])
            self.close()
            raise RuntimeError(f"HTTP {status}: {text[:200].decode(errors='replace')}")
        pending = b""
        async for piece in pieces():
            pending = (pending + piece).replace(b"\r\n", b"\n")
            *events, pending = pending.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
        if not keep_alive:
            self.close()

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def one_request(conn: Connection, body: dict, st: Stats) -> None:
    t0 = time.perf_counter()
    last: float | None = None
    ttft, gaps, deltas, usage = None, [], 0, None
    try:
        async with asyncio.timeout(600):
            async for data in conn.sse("/v1/chat/completions", body):
                if data == b"[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                usage = chunk.get("usage") or usage
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last, deltas = now, deltas + 1
    except (OSError, EOFError, TimeoutError, ValueError, RuntimeError, asyncio.LimitOverrunError) as e:
        conn.close()  # its state is unknown: the next request opens a new one
        st.errors += 1
        print(f"  request failed: {e!r}", file=sys.stderr)
        return
    st.done += 1
    if ttft is not None:
        st.ttft.append(ttft)
    st.itl.extend(gaps)
    if usage:
        st.tokens += usage["completion_tokens"]
        st.prompt_tokens += usage["prompt_tokens"]
    else:
        st.no_usage += 1
        st.tokens += deltas


# Sent with every chat request so that it runs to max_tokens: vLLM's `ignore_eos` (dropped by --no-ignore-eos for
# servers that refuse it), and with --ban-eos-ids OpenAI's `logit_bias` for servers that ignore it
EOS_FIELDS: dict = {"ignore_eos": True}


def chat_body(model: str, question: str, max_tokens: int, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "model": model,
        "messages": [*messages, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **EOS_FIELDS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def cache_counters(url: str) -> tuple[float, float] | None:
    """The server's prefix cache hits and queries so far, from /metrics; None where it has no such page."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    hits, queries = (_sample(text, f"lmforge_prefix_cache_{k}_total") for k in ("hits", "queries"))
    return (hits, queries) if hits is not None and queries is not None else None


def _sample(text: str, name: str) -> float | None:
    """One sample's value in a Prometheus text page (`name` with its labels, as written), None if absent."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else None


def ledger_batches(url: str) -> dict[str, tuple[float, float]]:
    """The server's ledger batches so far, per kind (admit, settle): (batches, requests), from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        kind: tuple(
            _sample(text, f'lmforge_ledger_batch_size_{s}{{kind="{kind}"}}') or 0.0 for s in ("count", "sum")
        )
        for kind in ("admit", "settle")
    }


async def run_load(url: str, bodies: list[dict], concurrency: int) -> Stats:
    """Warm up with one request, then send `bodies` with at most `concurrency` in flight."""
    st = Stats()
    conns = [Connection(url) for _ in range(concurrency)]
    try:
        warm = {**bodies[0], "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
        await one_request(conns[0], warm, Stats())
        before = cache_counters(url)
        queue = list(reversed(bodies))

        async def worker(conn: Connection) -> None:
            while queue:
                await one_request(conn, queue.pop(), st)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        st.wall = time.perf_counter() - t0
        after = cache_counters(url)
        if before and after:
            st.cache = (after[0] - before[0], after[1] - before[1])
    finally:
        for c in conns:
            c.close()
    return st


def _stat_cpu(proc: Path) -> float:
    """User + system CPU seconds of a /proc/PID or /proc/PID/task/TID entry."""
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU seconds used so far by this machine's PostgreSQL processes (its backends, WAL writer...)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "postgres":
                total += _stat_cpu(proc)
        except OSError:  # exited meanwhile
            pass
    return total


class Server:
    """`lmforge serve` in a subprocess, its log in a temporary file."""

    def __init__(self, model: str, extra: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        threads = str(os.cpu_count() or 1)  # the asyncio client is light: the server gets every core
        cmd = [sys.executable, "-m", "lmforge", "serve", model, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--threads", threads, "--log-level", "warning", *extra]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lmforge-serve-", suffix=".log", delete=False)
        env = {**os.environ, "LMFORGE_THREADS": threads}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        sys.exit(f"server not ready after {timeout:.0f} s:\n{self.tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            sys.exit(
                f"server exited with {self.proc.returncode} mid-run; log {self.log.name}:\n{self.tail()}"
            )

    def stop(self) -> int:
        """SIGTERM, wait for the drain; the exit status (0 expected), with the log shown if it says anything."""
        if self.proc.poll() is not None:
            print(f"server had already exited with {self.proc.returncode}", file=sys.stderr)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc != 0 or self.tail().strip():
            print(
                f"server exit status {rc} after SIGTERM; log {self.log.name}:\n{self.tail()}", file=sys.stderr
            )
        else:
            Path(self.log.name).unlink()  # a clean run leaves nothing behind
        return rc

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server process so far outside its engine: the request path's. The
        engine's thread and its OpenMP team (named lmforge-engine) are left out: their threads spin between
        steps, so what they use says nothing about a request's cost. Linux /proc; nan elsewhere."""
        engine = 0.0
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                try:
                    if (task / "comm").read_text().strip() == "lmforge-engine":
                        engine += _stat_cpu(task)
                except OSError:  # a thread that exited meanwhile (an idle pool thread): not the engine's
                    pass
            # the process's total, which keeps the CPU of threads that have exited
            return _stat_cpu(Path(f"/proc/{self.proc.pid}")) - engine
        except OSError:
            return float("nan")

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])


def ms(x: float) -> str:
    return f"{x * 1e3:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--levels", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument(
        "--requests",
        type=int,
        help="requests per level and per prefix run (default 32; 128 per server and round with --metered)",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--shared-concurrency", type=int, default=16)
    ap.add_argument("--peer-url", help="bench this running OpenAI-compatible server instead of lmforge")
    ap.add_argument("--peer-name", help="--peer-url: the server's name in the table (default: its URL)")
    ap.add_argument(
        "--peer-model", help="--peer-url: the model to request (default: the first of /v1/models)"
    )
    ap.add_argument(
        "--no-ignore-eos", action="store_true", help="leave out `ignore_eos` (for servers that refuse it, e.g. "
        "`transformers serve`); requests may then end before max_tokens, and the table counts the tokens sent"
    )  # fmt: skip
    ap.add_argument(
        "--ban-eos-ids", help="comma-separated token ids sent with OpenAI's `logit_bias` -100, for servers that "
        "ignore `ignore_eos` (llama.cpp's): every request then runs to max_tokens, as on lmforge"
    )  # fmt: skip
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--metered", action="store_true", help="the metering overhead benchmark (see above)")
    ap.add_argument("--clients", type=int, default=16, help="--metered: concurrent clients")
    ap.add_argument("--rounds", type=int, default=3, help="--metered: rounds over the three servers")
    ap.add_argument("--pg-url", default=os.environ.get("LMFORGE_TEST_DATABASE_URL") or DEFAULT_PG_URL)
    args = ap.parse_args()
    if args.metered:
        args.requests = args.requests or 128
        metered_main(args)
        return
    args.requests = args.requests or 32
    if args.no_ignore_eos:
        EOS_FIELDS.clear()
    if args.ban_eos_ids:
        if not args.peer_url:
            sys.exit("--ban-eos-ids is for a --peer-url server: lmforge takes `ignore_eos`")
        EOS_FIELDS["logit_bias"] = {i.strip(): -100 for i in args.ban_eos_ids.split(",") if i.strip()}
    levels = [int(x) for x in args.levels.split(",")]
    model, name = args.model, "lmforge"
    if args.peer_url:
        args.peer_url = args.peer_url.rstrip("/")
        name = args.peer_name or f"peer {args.peer_url}"
        if args.peer_model:
            model = args.peer_model
        else:
            model = httpx.get(f"{args.peer_url}/v1/models", timeout=10).json()["data"][0]["id"]
    else:
        from lmforge import store
        from lmforge.errors import UserError

        try:
            store.resolve(model)
        except UserError as e:
            sys.exit(f"{e} (model store: {store.models_dir()})")

    def serve(extra: list[str]) -> Server | None:
        if args.peer_url:
            return None
        server = Server(model, ["--max-batch", str(max(64, *levels)), "--no-auth", *extra])
        server.wait_ready()
        return server

    level_rows, prefix_rows, exits, rates = [], [], [], {}
    steps = [] if args.peer_url else [step_alone(args.model)]
    server = serve([])
    url = server.url if server else args.peer_url
    for i, c in enumerate(levels):
        qs = [QUESTIONS[(i * args.requests + j) % len(QUESTIONS)] for j in range(args.requests)]
        st = asyncio.run(run_load(url, [chat_body(model, q, args.max_tokens) for q in qs], c))
        if server:
            server.check_alive()
        rates[c] = st.tokens / st.wall
        level_rows.append(
            f"| {name} | {c} | {st.done}/{args.requests} | {st.errors} | {st.tokens} | "
            f"{st.tokens / st.wall:.1f} | {st.done / st.wall:.2f} | {ms(pct(st.ttft, 50))} | "
            f"{ms(pct(st.ttft, 95))} | {ms(pct(st.itl, 50))} | {ms(pct(st.itl, 95))} |"
        )
        print(level_rows[-1] + (f" ({st.no_usage} without usage)" if st.no_usage else ""), flush=True)

    shared = [
        chat_body(model, SHOP_QUESTIONS[j % len(SHOP_QUESTIONS)], args.max_tokens, SYSTEM_PROMPT)
        for j in range(args.requests)
    ]
    for caching in [True, False] if server else [True]:
        if server and not caching:
            exits.append(server.stop())
            server = serve(["--no-prefix-caching"])
        url = server.url if server else args.peer_url
        st = asyncio.run(run_load(url, shared, args.shared_concurrency))
        if server:
            server.check_alive()
        hits = f"{st.cache[0]:.0f} / {st.cache[1]:.0f}" if st.cache else "n/a"
        rate = f"{st.cache[0] / st.cache[1]:.0%}" if st.cache and st.cache[1] else "n/a"
        label = ("on" if caching else "off") if server else "as configured"
        prefix_rows.append(
            f"| {name} | {label} | {st.errors} | {st.prompt_tokens / max(st.done, 1):.0f} | "
            f"{st.tokens / st.wall:.1f} | {ms(pct(st.ttft, 50))} | {ms(pct(st.ttft, 95))} | {hits} | {rate} |"
        )
        print(prefix_rows[-1], flush=True)
    if server:
        exits.append(server.stop())
        steps.append(step_alone(args.model))

    level_table = [
        "| server | concurrency | done | errors | out tokens | out tok/s | req/s "
        "| TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *level_rows,
    ]
    prefix_table = [
        "| server | prefix caching | errors | prompt tokens/req | out tok/s | TTFT p50 ms | TTFT p95 ms "
        "| cache hits / queries (tokens) | hit rate |",
        "|---|---|---|---|---|---|---|---|---|",
        *prefix_rows,
    ]
    exit_note = (
        f"Server exit status after SIGTERM: {', '.join(map(str, exits))} (0 expected)." if exits else ""
    )
    if steps and None not in steps:
        exit_note += "\n\n" + yardstick(steps, rates.get(16))
    print("\n" + "\n".join(level_table) + "\n\n" + "\n".join(prefix_table) + "\n\n" + exit_note)
    if args.record:
        record(args, model, name, level_table, prefix_table, exit_note)
    if any(exits):
        sys.exit(1)


def step_alone(model: str) -> float | None:
    """The default engine's 16-sequence decode step (median ms), timed alone in a subprocess with every core;
    None (and a warning) if that failed: the load's own figures still stand."""
    cmd = [sys.executable, str(ROOT / "bench" / "decode_step.py"), "--model", model, "--batches", "16",
           "--prompt-tokens", "40", "--steps", "30", "--default-only"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(f"bench/decode_step.py failed; no yardstick:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(out.stdout.split()[-1])


def yardstick(steps: list[float], tok_s_16: float | None) -> str:
    """What the machine could do this hour, and the 16-client figure against it."""
    ceiling = 16_000 / statistics.mean(steps)
    text = (
        f"Yardstick: the default engine's 16-sequence decode step alone (40-token prompts) took "
        f"{' ms before the load and '.join(f'{t:.1f}' for t in steps)} ms after it: at most {ceiling:.0f} tok/s "
        "for 16 clients (16 tokens a step)."
    )
    if tok_s_16 is not None:
        text += f" Served at 16 clients: {tok_s_16:.1f} tok/s, {tok_s_16 / ceiling:.2f} of that ceiling."
    return text


# --- --metered: the cost of auth + metering + rate limiting ------------------------------------------------

DEFAULT_PG_URL = "postgresql+psycopg://lmforge:lmforge@127.0.0.1:5432/postgres"


async def tiny_requests(url: str, model: str, secret: str | None, n: int, clients: int) -> tuple[float, int]:
    """`n` non-streamed chat requests with a 1-token completion from `clients` concurrent clients:
    (requests/s, errors)."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    errors = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:

        async def worker(jobs: list[int]) -> None:
            nonlocal errors
            while jobs:
                q = QUESTIONS[jobs.pop() % len(QUESTIONS)]
                body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 1,
                        "temperature": 0}  # fmt: skip
                r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 1:
                    errors += 1
                    print(f"  request failed: HTTP {r.status_code} {r.text[:200]}", file=sys.stderr)

        await worker([0] * 4)  # warm-up: connections, the first request's lazy work
        jobs = list(range(n))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(jobs) for _ in range(clients)))
        return n / (time.perf_counter() - t0), errors


def _provision(url: str, model: str) -> str:
    """Upgrade the database at `url`, give it a tenant with a budget, a price for `model` and a key with RPM and
    TPM limits that the bench never reaches; the key's secret."""
    from lmforge.serve import auth, metering
    from lmforge.serve.db import Database

    db = Database(url)
    try:
        db.upgrade()
        auth.create_tenant(db, "bench")
        metering.set_price(db, model, input_usd="0.15", output_usd="0.60")
        metering.set_budget(db, "bench", "1000000")
        return auth.create_key(db, "bench", rpm=10**6, tpm=10**9)[1]
    finally:
        db.close()


def metered_main(args: argparse.Namespace) -> None:
    import secrets as random_names

    import sqlalchemy as sa

    from lmforge import store
    from lmforge.errors import UserError

    try:
        store.resolve(args.model)
    except UserError as e:
        sys.exit(f"{e} (model store: {store.models_dir()})")
    model = Path(args.model).stem if Path(args.model).exists() else args.model  # the name `serve` gives it
    workdir = Path(tempfile.mkdtemp(prefix="lmforge-bench-metered-"))
    sqlite_url = f"sqlite:///{workdir / 'ledger.db'}"
    pg_admin, pg_name, pg_url = None, f"lmf_bench_{random_names.token_hex(4)}", None
    try:
        pg_admin = sa.create_engine(sa.make_url(args.pg_url), isolation_level="AUTOCOMMIT", pool_size=1)
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{pg_name}"')
        pg_url = sa.make_url(args.pg_url).set(database=pg_name).render_as_string(hide_password=False)
    except Exception as e:  # no PostgreSQL here: bench the other two
        print(
            f"PostgreSQL unavailable ({type(e).__name__}: {str(e).splitlines()[0]}); skipping it",
            file=sys.stderr,
        )
        pg_admin = None
    configs: list[tuple[str, list[str], str | None]] = [("unmetered (--no-auth)", ["--no-auth"], None)]
    servers = []
    try:
        configs.append(("metered, SQLite", ["--database-url", sqlite_url], _provision(sqlite_url, model)))
        if pg_url:
            configs.append(("metered, PostgreSQL", ["--database-url", pg_url], _provision(pg_url, model)))
        # side by side, so each round measures all three under the same background load
        servers = [
            Server(args.model, ["--max-batch", str(max(64, args.clients)), "--kv-cache-mb", "256", *extra])
            for _, extra, _ in configs
        ]
        for server in servers:
            server.wait_ready()
        # one unrecorded round first: every server's first burst at this load runs ~40% slower (oneDNN builds
        # its kernels for the batch shapes it meets), which would only widen the spread of the rounds below
        for i, (_, _, secret) in enumerate(configs):
            asyncio.run(tiny_requests(servers[i].url, model, secret, args.requests, args.clients))
        batches_before = [ledger_batches(server.url) for server in servers[1:]]  # the metered ones
        rates: list[list[float]] = [[] for _ in configs]
        cpu: list[list[float]] = [[] for _ in configs]  # request-path CPU ms per request, each round
        pg_cpu: list[list[float]] = [[] for _ in configs]  # PostgreSQL's CPU ms per request, each round
        errors = 0
        for r in range(args.rounds):
            for i in [(r + j) % len(configs) for j in range(len(configs))]:
                before, pg_before = servers[i].cpu_seconds(), postgres_cpu_seconds()
                rate, failed = asyncio.run(
                    tiny_requests(servers[i].url, model, configs[i][2], args.requests, args.clients)
                )
                servers[i].check_alive()
                rates[i].append(rate)
                cpu[i].append((servers[i].cpu_seconds() - before) / (args.requests + 4) * 1e3)
                pg_cpu[i].append((postgres_cpu_seconds() - pg_before) / (args.requests + 4) * 1e3)
                errors += failed
                print(f"round {r + 1}: {configs[i][0]}: {rate:.1f} req/s", flush=True)
        # requests per ledger batch over the recorded rounds: what metering's per-batch costs are spread over
        per_batch = ["–"]  # the unmetered server has no ledger
        for server, before in zip(servers[1:], batches_before, strict=True):
            after = ledger_batches(server.url)
            admits, settles = (
                (after[k][1] - before[k][1]) / max(after[k][0] - before[k][0], 1) for k in ("admit", "settle")
            )
            per_batch.append(f"{admits:.1f}, {settles:.1f}")
    finally:
        exits = [server.stop() for server in servers]
        if pg_admin is not None:
            with pg_admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
            pg_admin.dispose()
    medians = [statistics.median(x) for x in rates]
    cpu_medians = [statistics.median(x) for x in cpu]
    pg_medians = [statistics.median(x) for x in pg_cpu]
    # each round's ratio to the unmetered server's rate in the same round: the machine's drift between rounds
    # (15% and more here) cancels out of it, so it is the steadier estimate of what metering costs
    paired = [statistics.median(x / base for x, base in zip(xs, rates[0], strict=True)) for xs in rates]
    table = [
        "| server | req/s (median) | req/s per round | vs unmetered (medians) | vs unmetered (median of per-round "
        "ratios) | CPU ms/request: server outside the engine, PostgreSQL (medians) | requests per ledger batch: "
        "admits, settles |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {m:.1f} | {', '.join(f'{x:.1f}' for x in xs)} | {m / medians[0]:.3f}x | {p:.3f}x "
            f"| {c:.2f}, {g:.2f} | {b} |"
            for (name, _, _), m, xs, p, c, g, b in zip(
                configs, medians, rates, paired, cpu_medians, pg_medians, per_batch, strict=True
            )
        ),
    ]
    note = f"Errors: {errors}. Server exit status after SIGTERM: {', '.join(map(str, exits))} (0 expected)."
    print("\n" + "\n".join(table) + "\n\n" + note)
    if args.record:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {importlib.metadata.version('torch')}"
        entry = [
            f"\n## serve.py --metered — {datetime.date.today()} — {machine}",
            "",
            f"`{model}`, non-streamed chat with a 1-token completion, {args.clients} concurrent clients, "
            f"{args.requests} requests per server per round, {args.rounds} rounds after an unrecorded warm-up round "
            "(order rotated each round); "
            f"the three servers run side by side with --threads {os.cpu_count()}, the asyncio client on the same "
            "machine. Metered = admit (key still live, rate window, budget hold, ledger row) + settle, per request; "
            "the key is read once, then cached.",
            "",
            *table,
            "",
            note,
        ]
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(entry) + "\n")
    if errors or any(exits):
        sys.exit(1)


def record(
    args: argparse.Namespace, model: str, name: str, levels: list[str], prefix: list[str], note: str
) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {importlib.metadata.version('torch')}"
    threads = "" if args.peer_url else f"the server with --threads {os.cpu_count()}, "
    eos = "`ignore_eos`" if "ignore_eos" in EOS_FIELDS else "EOS allowed"
    if args.ban_eos_ids:
        eos += f", `logit_bias` -100 on token ids {args.ban_eos_ids}"
    entry = [
        f"\n## serve.py — {datetime.date.today()} — {machine}",
        "",
        f"`{model}` via {name}, streaming chat, temperature 0, {eos}, max_tokens {args.max_tokens}, "
        f"{args.requests} requests per concurrency level (one warm-up request first), {threads}the load "
        "client (bare asyncio streams, one keep-alive connection per client) on the same machine. "
        "TTFT: request sent to first content delta; ITL: gaps between deltas.",
        "",
        *levels,
        "",
        f"Shared ~400-token system prompt, {args.shared_concurrency} concurrent, {args.requests} requests, "
        "different user questions; prefix-cache counters are the run's delta of /metrics.",
        "",
        *prefix,
        "",
        note,
    ]
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(entry) + "\n")


if __name__ == "__main__":
    main()
