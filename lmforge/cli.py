"""The `lmforge` command: one thin command per verb; heavy imports happen inside commands.

User errors (lmforge.errors.UserError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import math
import sys
from typing import Annotated

import typer

from lmforge.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, fine-tune, compress, evaluate and serve Transformer language models.",
)

DEFAULT_MODEL = "smollm2-135m-instruct"

Model = Annotated[
    str, typer.Argument(help="Model name in the store, or a path to an HF folder / .gguf file.")
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
Threads = Annotated[int, typer.Option(help="CPU threads (0 = all cores).")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability (0 = off).")]
RepPen = Annotated[float, typer.Option(help="HF repetition penalty over prompt and output (1 = off).")]
FreqPen = Annotated[float, typer.Option(help="OpenAI frequency penalty (-2..2).")]
PresPen = Annotated[float, typer.Option(help="OpenAI presence penalty (-2..2).")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Seed = Annotated[int | None, typer.Option(help="Seed: same seed, same text.")]


@app.command()
def pull(
    source: Annotated[
        str, typer.Argument(help="A registered name, a local HF folder or .gguf, or hf:ORG/NAME.")
    ],
    name: Annotated[str | None, typer.Option(help="Name to store it under.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a model of the same name.")] = False,
) -> None:
    """Fetch a model into the local store."""
    from lmforge import store

    entry = store.pull(source, name=name, force=force)
    typer.echo(f"{entry.name}: {entry.format}, {entry.size_bytes / 1e6:.1f} MB at {entry.path}")


@app.command()
def models() -> None:
    """List the models in the store."""
    from rich.console import Console
    from rich.table import Table

    from lmforge import store

    entries = store.list_models()
    if not entries:
        typer.echo(f"no models in {store.models_dir()}; try `lmforge pull {DEFAULT_MODEL}`")
        return
    table = Table("name", "format", "size", "source", "pulled")
    for e in entries:
        table.add_row(e.name, e.format, f"{e.size_bytes / 1e6:.1f} MB", e.source, e.pulled_at[:19])
    Console().print(table)


def _load(model: str, device: str, dtype: str, threads: int):
    from lmforge import checkpoint, runtime, store

    runtime.set_threads(threads or None)
    dev = runtime.resolve_device(device)
    ck = checkpoint.load(store.resolve(model), device=dev, dtype=runtime.resolve_dtype(dtype, dev))
    if hasattr(ck.model, "labels"):  # a models.classifier.SequenceClassifier: it has no LM head
        raise UserError(
            f"{model} is a text classifier, not a language model; use `lmforge classify {model} TEXT`"
        )
    return ck


_SAMPLING_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "seed",
)


def _params(options: dict):
    """SamplingParams from a command's sampling options (the same names in every command)."""
    from lmforge.engine.types import SamplingParams

    kw = {k: options[k] for k in _SAMPLING_OPTIONS}
    kw["stop"] = tuple(kw["stop"] or ())
    return SamplingParams(**kw)


def _stream(ck, prompt_ids: list[int], params) -> str:
    """Generate, printing text as it comes; returns the full text."""
    from lmforge.data.textstream import TextStream
    from lmforge.engine.generate import generate

    stream = TextStream(ck.tokenizer, params.stop, prompt_ids=prompt_ids)
    for tok in generate(ck.model, prompt_ids, params, eos_ids=ck.eos_ids):
        sys.stdout.write(stream.add(tok.id))
        sys.stdout.flush()
        if stream.stopped:
            break
    sys.stdout.write(stream.flush())
    sys.stdout.flush()
    return stream.text


@app.command()
def generate(
    model: Model,
    prompt: Annotated[str, typer.Argument(help="Text to continue (raw: no chat template).")],
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPen = 1.0,
    frequency_penalty: FreqPen = 0.0,
    presence_penalty: PresPen = 0.0,
    stop: Stop = None,
    seed: Seed = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
) -> None:
    """Continue a prompt, streaming the text to the terminal."""
    params = _params(locals())
    ck = _load(model, device, dtype, threads)
    prompt_ids = ck.tokenizer.encode(prompt, add_bos=ck.tokenizer.add_bos_token)
    from lmforge.engine.generate import check_prompt

    check_prompt(prompt_ids, ck.config.max_seq_len)
    sys.stdout.write(prompt)
    _stream(ck, prompt_ids, params)
    sys.stdout.write("\n")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Model name or path.")] = DEFAULT_MODEL,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.95,
    min_p: MinP = 0.0,
    repetition_penalty: RepPen = 1.0,
    frequency_penalty: FreqPen = 0.0,
    presence_penalty: PresPen = 0.0,
    stop: Stop = None,
    seed: Seed = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
) -> None:
    """Talk with a model in the terminal (its chat template; /reset clears the history, /exit quits)."""
    params = _params(locals())
    ck = _load(model, device, dtype, threads)
    if ck.tokenizer.chat_template is None:
        raise UserError(f"{model} has no chat template; use `lmforge generate` for plain text completion")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    typer.echo(f"Chatting with {ck.name}. /reset clears the conversation, /exit quits.", err=True)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = list(start)
            typer.echo("(conversation cleared)", err=True)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        text = ck.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt_ids = ck.tokenizer.encode(text)
        if len(prompt_ids) >= ck.config.max_seq_len:
            messages.pop()
            typer.echo(
                f"error: the conversation is {len(prompt_ids)} tokens, past the model's context of "
                f"{ck.config.max_seq_len}; /reset to start over",
                err=True,
            )
            continue
        try:
            reply = _stream(ck, prompt_ids, params)
        except KeyboardInterrupt:
            reply = "(interrupted)"
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model name or path.")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_name: Annotated[str | None, typer.Option(help="Model name clients send (default: MODEL).")] = None,
    classifier: Annotated[
        str | None, typer.Option(help="Also serve a classifier folder at /v1/classifications: NAME=PATH.")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="Serve a PEFT LoRA adapter as model SERVED_NAME:NAME: NAME=PATH (repeatable)."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most sequences decoded together.")] = 64,
    max_batched_tokens: Annotated[
        int, typer.Option(help="Token budget per step (chunks long prompts).")
    ] = 512,
    kv_cache_mb: Annotated[
        float, typer.Option(help="Memory for the paged KV cache, in MiB (see also --dense-decode-mb).")
    ] = 1024.0,
    dense_decode_mb: Annotated[
        float | None,
        typer.Option(
            help="At most this much memory, in MiB, on top of --kv-cache-mb, for a dense copy of the decoding "
            "sequences' keys and values, taken only while a batch fits in it; it spares batched decode "
            "a gather per step (0: off) [default: a quarter of --kv-cache-mb]",
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait before new ones get 429.")] = 256,
    batch_wait_ms: Annotated[
        float, typer.Option(help="When idle, wait while requests keep arriving this close (at most 10x).")
    ] = 3.0,
    prefix_caching: Annotated[bool, typer.Option(help="Reuse the KV of shared prompt prefixes.")] = True,
    pack_weights: Annotated[
        bool,
        typer.Option(
            help="Keep oneDNN-packed copies of the weights (CPU fp32): faster decoding, 2x weight memory."
        ),
    ] = True,
    fused_kernels: Annotated[
        bool,
        typer.Option(
            help="Norms, SwiGLU and decode attention as C kernels built with the system's cc on first use "
            "(CPU fp32, AVX2; PyTorch's ops where they cannot load)."
        ),
    ] = True,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds running requests get to finish on SIGTERM.")
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Keys and usage ledger (default: $LMFORGE_DATABASE_URL, else SQLite in LMFORGE_HOME)."
        ),
    ] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar="LMFORGE_ADMIN_TOKEN", help="Bearer token of the admin API (/admin/v1)."),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve openly: no API keys, no metering, no database.")
    ] = False,
    heartbeat: Annotated[float, typer.Option(help="Seconds between this process's heartbeats.")] = 10.0,
    stale_after: Annotated[
        float,
        typer.Option(help="Seconds without a heartbeat before a process's pending requests are failed."),
    ] = 60.0,
    upstreams: Annotated[
        str | None,
        typer.Option(
            help="Also serve the models of OpenAI-compatible servers (vLLM, llama.cpp, Ollama, lmforge) listed "
            "in this YAML file: [{name, url, model, api_key_env, max_tokens, timeout_s}, ...]."
        ),
    ] = None,
    no_model: Annotated[
        bool,
        typer.Option(
            "--no-model", help="Load no local model: a gateway serving only --upstreams (and --classifier)."
        ),
    ] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Metered by default: every /v1 request needs an API key (`lmforge admin key create`), and is rate-limited,
    checked against its tenant's budget and written to the usage ledger. Models of other servers
    (--upstreams) are forwarded and metered the same way; with --no-model the server is only that gateway.
    """
    if not (0 <= batch_wait_ms < math.inf):
        raise UserError(f"--batch-wait-ms must be a number of ms, at least 0, got {batch_wait_ms}")
    if not (0 < kv_cache_mb < math.inf):
        raise UserError(f"--kv-cache-mb must be a positive number, got {kv_cache_mb}")
    if dense_decode_mb is not None and not (0 <= dense_decode_mb < math.inf):
        raise UserError(f"--dense-decode-mb must be 0 (off) or a positive number, got {dense_decode_mb}")
    import asyncio
    from pathlib import Path

    from lmforge.serve.app import create_app, run
    from lmforge.serve.settings import Settings

    if no_auth and (database_url or admin_token):
        raise UserError("--no-auth serves without a database: drop --database-url and --admin-token")
    if no_model and (model != DEFAULT_MODEL or served_name or lora):
        raise UserError("--no-model serves no local model: drop MODEL, --served-name and --lora")
    if no_model and not (upstreams or classifier):
        raise UserError("--no-model needs something to serve: --upstreams FILE.yaml (or --classifier)")
    loras = [spec.partition("=") for spec in lora or ()]
    for name, _, path in loras:  # before the model loads: a typo fails in a second, not a minute
        if not name or not path or not Path(path).is_dir():
            raise UserError(f"--lora takes NAME=PATH with PATH a PEFT adapter folder, got {name}={path}")
    settings = Settings(
        model_name=None if no_model else served_name or (Path(model).stem if Path(model).exists() else model),
        host=host,
        port=port,
        max_queue=max_queue,
        drain_timeout_s=drain_timeout,
        admin_token=admin_token or None,
        heartbeat_s=heartbeat,
        stale_after_s=stale_after,
        upstreams=_upstreams(upstreams) if upstreams else (),
    )
    db = None
    if not no_auth:  # before the model loads: a database that is not ready fails in a second, not a minute
        from lmforge import store
        from lmforge.serve.db import database_url as resolve_url
        from lmforge.serve.db import open_database

        db = open_database(resolve_url(database_url, store.home()))
    if no_model:  # a pure gateway: no model to load, no engine to run
        import time
        from functools import partial

        from lmforge import runtime
        from lmforge.serve.routes.classify import load_served
        from lmforge.serve.upstream import NoEngine

        try:
            engine = NoEngine(created=int(time.time()))
            # loaded off the main thread, as the engine's model is below: one OpenMP team per process
            served = runtime.run_in_thread(partial(load_served, classifier, device, dtype))
            app_ = create_app(settings, engine, None, db=db, classifier=served)
            run(app_, settings, log_level=log_level)
        finally:
            if db is not None:
                db.close()
        return
    from lmforge import runtime
    from lmforge.engine import AsyncEngine, EngineConfig, LLMEngine  # torch: after the quick checks
    from lmforge.serve.routes.classify import load_served

    def build():
        served = load_served(classifier, device, dtype)
        ck = _load(model, device, dtype, threads)
        config = EngineConfig(
            max_num_seqs=max_batch,
            max_num_batched_tokens=max_batched_tokens,
            kv_cache_mb=kv_cache_mb,
            dense_decode_mb=dense_decode_mb,
            enable_prefix_caching=prefix_caching,
            pack_weights=pack_weights,
            fused_kernels=fused_kernels,
        )
        llm = LLMEngine(ck.model, config, eos_ids=ck.eos_ids)
        for name, _, path in loras:
            llm.add_lora(name, path)
        return served, ck, llm

    # off the main thread, whose OpenMP team would otherwise outlive the loading and slow the engine's
    served_classifier, ck, llm = runtime.run_in_thread(build)
    engine = AsyncEngine(llm, settings.model_name, max_waiting=max_queue, batch_wait_s=batch_wait_ms / 1000)
    engine.start()
    try:
        app_ = create_app(settings, engine, ck.tokenizer, db=db, classifier=served_classifier)
        run(app_, settings, log_level=log_level)
    finally:
        asyncio.run(engine.shutdown(drain_timeout=0))
        if db is not None:
            db.close()


def _upstreams(path: str) -> tuple:
    """`serve --upstreams FILE.yaml`: a list of upstream models as `serve.settings.UpstreamSettings`, checked
    before any model loads (unknown keys refused with the nearest valid one, the API keys' variables set)."""
    import os
    from pathlib import Path

    import yaml

    from lmforge import config_io
    from lmforge.serve.settings import UpstreamSettings

    try:
        entries = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read the --upstreams file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path} must hold a list of upstream models: - {{name: ..., url: http://host/v1}}")
    found = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "url"} <= set(entry):
            raise UserError(
                f"{path}: upstream {i + 1} must be a mapping with at least name and url, got {entry!r}"
            )
        try:
            upstream = config_io.from_dict(UpstreamSettings, entry, prefix=f"upstreams[{i}].")
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        if upstream.api_key_env is not None and not os.environ.get(upstream.api_key_env):
            raise UserError(
                f"{path}: upstream {upstream.name!r} reads its API key from ${upstream.api_key_env}, which is not set"
            )
        found.append(upstream)
    return tuple(found)


# ----------------------------------------------------------------------------------- database and admin

db_app = typer.Typer(no_args_is_help=True, help="The database of API keys, prices, budgets and usage.")
app.add_typer(db_app, name="db")
admin_app = typer.Typer(
    no_args_is_help=True, help="Tenants, API keys, prices, budgets and usage reports of a metered server."
)
app.add_typer(admin_app, name="admin")
tenant_app = typer.Typer(
    no_args_is_help=True, help="Tenants: the customers keys, budgets and usage belong to."
)
admin_app.add_typer(tenant_app, name="tenant")
key_app = typer.Typer(no_args_is_help=True, help="API keys (a secret is shown once, at creation).")
admin_app.add_typer(key_app, name="key")
price_app = typer.Typer(no_args_is_help=True, help="Prices per model, in dollars per million tokens.")
admin_app.add_typer(price_app, name="price")
budget_app = typer.Typer(no_args_is_help=True, help="Monthly spending limits per tenant.")
admin_app.add_typer(budget_app, name="budget")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy URL (default: $LMFORGE_DATABASE_URL, else SQLite in LMFORGE_HOME)."),
]
TenantName = Annotated[str, typer.Option("--tenant", help="Tenant name.")]


def _admin_db(database_url: str | None):
    """The database, ready (SQLite is upgraded in place; PostgreSQL must be upgraded with `lmforge db upgrade`)."""
    from lmforge import store
    from lmforge.serve.db import database_url as resolve_url
    from lmforge.serve.db import open_database

    return open_database(resolve_url(database_url, store.home()))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _when(value) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None) -> None:
    """Create or migrate the tables to the newest schema (run it before serving on PostgreSQL)."""
    from lmforge import store
    from lmforge.serve.db import Database
    from lmforge.serve.db import database_url as resolve_url

    db = Database(resolve_url(database_url, store.home()))
    try:
        db.upgrade()
        current, _ = db.revision()
    finally:
        db.close()
    typer.echo(f"{db.display_url}: schema at revision {current}")


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="Tenant name.")], database_url: DatabaseUrl = None
) -> None:
    """Create a tenant."""
    from lmforge.serve import auth

    tenant = auth.create_tenant(_admin_db(database_url), name)
    typer.echo(f"tenant {tenant.name!r} created (id {tenant.id})")


@tenant_app.command("list")
def tenant_list(database_url: DatabaseUrl = None) -> None:
    """List the tenants."""
    from lmforge.serve import auth

    rows = [[str(t.id), t.name, _when(t.created_at)] for t in auth.list_tenants(_admin_db(database_url))]
    _print_table(["id", "name", "created (UTC)"], rows)


@key_app.command("create")
def key_create(
    tenant: TenantName,
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
    expires: Annotated[
        str | None, typer.Option(help="Last day the key works (YYYY-MM-DD, UTC) or an ISO 8601 time.")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Allow only this model (repeatable; default: all). Shell-style patterns match several: "
            "'smollm2-135m-instruct:*' is the base's LoRA adapters, 'llama-*' every name starting so.",
        ),
    ] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute (default: unlimited).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute, prompt + max_tokens.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key: prints the secret (once: only its hash is stored) on stdout, the details on stderr."""
    from lmforge.serve import auth
    from lmforge.serve.metering import parse_when

    expires_at = parse_when(expires, what="--expires", end_of_day=True) if expires else None
    key, secret = auth.create_key(
        _admin_db(database_url), tenant, name=name, expires_at=expires_at, models=model, rpm=rpm, tpm=tpm
    )
    typer.echo(secret)
    typer.echo(
        f"key {key.id} ({key.prefix}...) for tenant {key.tenant!r}; store the secret now, it is not shown again",
        err=True,
    )


@key_app.command("revoke")
def key_revoke(
    key: Annotated[str, typer.Argument(help="Key id, prefix (lmf-XXXXXXXX) or the whole secret.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke an API key: requests with it get 403 from then on."""
    from lmforge.serve import auth

    revoked = auth.revoke_key(_admin_db(database_url), key)
    typer.echo(f"key {revoked.id} ({revoked.prefix}...) of tenant {revoked.tenant!r} revoked")


@key_app.command("list")
def key_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List API keys (prefixes only; secrets are never stored)."""
    from lmforge.serve import auth

    rows = []
    for k in auth.list_keys(_admin_db(database_url), tenant):
        status = "revoked" if k.revoked_at else f"expires {_when(k.expires_at)}" if k.expires_at else "active"
        limits = " ".join(f"{n}={v}" for n, v in (("rpm", k.rpm), ("tpm", k.tpm)) if v is not None) or "-"
        models = ",".join(k.models) if k.models is not None else "*"
        rows.append([str(k.id), k.tenant, k.prefix, k.name or "-", status, models, limits])
    _print_table(["id", "tenant", "prefix", "name", "status", "models", "limits"], rows)


@price_app.command("set")
def price_set(
    model: Annotated[str, typer.Argument(help="Model name as clients send it.")],
    input_: Annotated[str, typer.Option("--input", help="Dollars per million prompt tokens, e.g. 0.15.")],
    output: Annotated[str, typer.Option("--output", help="Dollars per million completion tokens.")],
    effective: Annotated[
        str | None, typer.Option(help="From this date (YYYY-MM-DD, UTC) or ISO time; default now.")
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Set a model's price; requests keep the price in force when they started."""
    from lmforge.serve import metering

    when = metering.parse_when(effective, what="--effective") if effective else None
    price = metering.set_price(
        _admin_db(database_url), model, input_usd=input_, output_usd=output, effective_from=when
    )
    typer.echo(
        f"{price.model}: ${metering.format_price(price.input_uusd_per_mtok)} input, "
        f"${metering.format_price(price.output_uusd_per_mtok)} output per million tokens "
        f"from {_when(price.effective_from)} UTC"
    )


@price_app.command("list")
def price_list(database_url: DatabaseUrl = None) -> None:
    """List prices, history and scheduled changes included."""
    from lmforge.serve import metering

    rows = [
        [
            p.model,
            _when(p.effective_from),
            metering.format_price(p.input_uusd_per_mtok),
            metering.format_price(p.output_uusd_per_mtok),
        ]
        for p in metering.list_prices(_admin_db(database_url))
    ]
    _print_table(["model", "effective from (UTC)", "input $/1M", "output $/1M"], rows)


@budget_app.command("set")
def budget_set(
    tenant: TenantName,
    usd: Annotated[str, typer.Option("--usd", help="Limit in dollars, e.g. 25.")],
    month: Annotated[str | None, typer.Option(help="YYYY-MM (UTC; default this month).")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Limit a tenant's spending in a month; requests that could exceed it get 429 insufficient_quota."""
    from lmforge.serve import metering

    b = metering.set_budget(_admin_db(database_url), tenant, usd, month=month)
    typer.echo(
        f"{b.tenant} {b.month}: budget ${metering.format_usd(b.limit_pusd)}, "
        f"spent ${metering.format_usd(b.spent_pusd)}, held ${metering.format_usd(b.reserved_pusd)}"
    )


@budget_app.command("list")
def budget_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's budgets.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """List budgets with what is spent and held against them."""
    from lmforge.serve.metering import format_usd, list_budgets

    rows = [
        [b.tenant, b.month, format_usd(b.limit_pusd), format_usd(b.spent_pusd), format_usd(b.reserved_pusd)]
        for b in list_budgets(_admin_db(database_url), tenant)
    ]
    _print_table(["tenant", "month", "budget $", "spent $", "held $"], rows)


@admin_app.command("usage")
def admin_usage(
    tenant: TenantName,
    month: Annotated[str | None, typer.Option(help="YYYY-MM (UTC; default this month).")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="CSV for invoicing instead of a table.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """A tenant's usage in a month: requests, tokens and cost per model, and totals."""
    from lmforge.serve import metering

    month = metering.parse_month(month) if month else metering.month_of(metering.utcnow())
    report = metering.usage_report(_admin_db(database_url), tenant, month)
    if csv:
        typer.echo(metering.usage_csv(report), nl=False)
        return
    typer.echo(f"tenant {report.tenant}, {report.month} (UTC)")
    rows = [
        [
            m.model,
            str(m.requests),
            str(m.prompt_tokens),
            str(m.completion_tokens),
            metering.format_usd(m.cost_pusd),
        ]
        for m in (*report.models, report.totals)
    ]
    _print_table(["model", "requests", "prompt tokens", "completion tokens", "cost $"], rows)
    b = report.budget
    limit = "none" if b.limit_pusd is None else f"${metering.format_usd(b.limit_pusd)}"
    typer.echo(
        f"budget {limit}; spent ${metering.format_usd(b.spent_pusd)}; {report.pending} request(s) running"
    )


# --------------------------------------------------------------------------------------------- training

data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")
app.add_typer(data_app, name="data")


def _tokenizer_spec(name: str):
    """--tokenizer: "bpe", "bytes", a tokenizer folder / tokenizer.json, or a model name or path in the store."""
    from pathlib import Path

    if name in ("bpe", "bytes") or Path(name).is_dir() or name.endswith(".json"):
        return name
    from lmforge import store
    from lmforge.data.tokenizer import Tokenizer

    model = store.model_file(store.resolve(name))
    if model.is_dir():
        return str(model)
    from lmforge.models.gguf_reader import read_gguf

    return Tokenizer.from_gguf_metadata(read_gguf(model).metadata)


@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Files, folders or globs (.txt, .md, .jsonl, .parquet, ...).")
    ] = None,
    out: Annotated[str, typer.Option(help="Output folder.")] = "",
    source: Annotated[
        str | None, typer.Option(help="A built-in corpus instead of inputs: python-stdlib.")
    ] = None,
    text_field: Annotated[str, typer.Option(help="JSON field holding the text (.jsonl).")] = "text",
    text_column: Annotated[str, typer.Option(help="Column holding the text (.parquet).")] = "text",
    tokenizer: Annotated[
        str, typer.Option(help="bpe (train one), bytes, a tokenizer folder/json, or a model name or path.")
    ] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size of a trained BPE.")] = 8192,
    special_tokens: Annotated[
        list[str] | None,
        typer.Option(help="Special token of a trained BPE (repeatable; first ends documents)."),
    ] = None,
    scrub_pii: Annotated[
        bool, typer.Option(help="Replace e-mails, phone numbers, ... with placeholders.")
    ] = False,
    val_fraction: Annotated[float, typer.Option(help="Share of documents for validation.")] = 0.005,
    workers: Annotated[int, typer.Option(help="Tokenizing processes (0 = all cores).")] = 0,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 100_000_000,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad input instead of skipping it.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    max_documents: Annotated[int | None, typer.Option(help="Stop after this many documents.")] = None,
) -> None:
    """Turn text files into token shards for `lmforge train`."""
    import os

    from lmforge.data.prepare import PrepareConfig, run

    extra = {"special_tokens": tuple(special_tokens)} if special_tokens else {}
    cfg = PrepareConfig(
        inputs=tuple(inputs or ()),
        out=out,
        source=source,
        text_field=text_field,
        text_column=text_column,
        tokenizer=_tokenizer_spec(tokenizer),
        vocab_size=vocab_size,
        scrub_pii=scrub_pii,
        val_fraction=val_fraction,
        workers=workers or os.cpu_count() or 1,
        shard_tokens=shard_tokens,
        strict=strict,
        seed=seed,
        max_documents=max_documents,
        **extra,
    )
    typer.echo(run(cfg).format())


def _print_train_result(result) -> None:
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
    typer.echo(f"{result.stopped} after {result.steps} steps; val loss {val}; run folder {result.run_dir}")
    if result.store_name:
        typer.echo(f"model stored as {result.store_name!r}: lmforge generate {result.store_name} 'PROMPT'")
    if result.sample:
        typer.echo("sample (greedy):\n" + result.sample)


@app.command()
def train(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=3e-4 model.n_layer=6.")
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="A YAML recipe (see recipes/).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in out_dir from its last checkpoint.")
    ] = False,
) -> None:
    """Pretrain a model (from scratch or `init_from=MODEL`) on prepared data; run it under torchrun for DDP."""
    from lmforge import config_io
    from lmforge.train import pretrain
    from lmforge.train.config import TrainConfig

    cfg = config_io.load(TrainConfig, config, overrides or [])
    result = pretrain.run(cfg, resume=resume)
    if result.model_dir is not None:  # rank 0
        _print_train_result(result)


runs_app = typer.Typer(no_args_is_help=True, help="Inspect training runs.")
app.add_typer(runs_app, name="runs")
RunsDir = Annotated[str, typer.Option(help="Folder holding the runs.")]


@runs_app.command("list")
def runs_list(runs_dir: RunsDir = "runs") -> None:
    """Table of the runs: name, steps, best val loss, status."""
    from rich.console import Console
    from rich.table import Table

    from lmforge.train import runs

    found = runs.list_runs(runs_dir)
    if not found:
        typer.echo(f"no runs in {runs_dir}/; start one with `lmforge train` or `lmforge quickstart`")
        return
    table = Table("name", "steps", "best val loss", "status")
    for r in found:
        steps = f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step)
        best = f"{r.best_val_loss:.4f}" if r.best_val_loss is not None else "-"
        table.add_row(r.name, steps, best, r.status)
    Console().print(table)


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="Run name (in runs/) or folder.")], runs_dir: RunsDir = "runs"
) -> None:
    """A run's resolved config, status and last metrics."""
    import json

    from lmforge.train import runs

    shown = runs.show(runs.find(run, runs_dir))
    typer.echo(shown["config"].rstrip())
    i = shown["info"]
    best = f"{i.best_val_loss:.4f}" if i.best_val_loss is not None else "-"
    typer.echo(f"\nstatus: {i.status}, step {i.step}/{i.max_steps}, best val loss {best}")
    for row in shown["metrics"]:
        typer.echo(json.dumps(row))


@runs_app.command("plot")
def runs_plot(
    run: Annotated[str, typer.Argument(help="Run name (in runs/) or folder.")],
    out: Annotated[str | None, typer.Option(help="PNG path (default RUN/loss.png).")] = None,
    runs_dir: RunsDir = "runs",
) -> None:
    """Plot train/val loss and learning rate against step to a PNG."""
    from pathlib import Path

    from lmforge.train import runs

    typer.echo(str(runs.plot(runs.find(run, runs_dir), Path(out) if out else None)))


@app.command()
def quickstart(
    minutes: Annotated[float, typer.Option(help="Training time budget.")] = 3.0,
    data_dir: Annotated[str, typer.Option(help="Where the prepared corpus goes.")] = "data/python-stdlib",
    name: Annotated[str, typer.Option(help="Run and store name.")] = "quickstart",
) -> None:
    """Train a small model on the Python standard library for a few minutes and store it."""
    from pathlib import Path

    from lmforge import config_io
    from lmforge.train import pretrain
    from lmforge.train.config import TrainConfig

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    cfg = config_io.load(
        TrainConfig,
        recipe if recipe.is_file() else None,
        [f"data={data_dir}", f"name={name}", f"max_minutes={minutes}"],
    )
    if not (Path(data_dir) / "meta.json").is_file():
        import os

        from lmforge.data.prepare import PrepareConfig, run

        typer.echo(f"preparing the Python standard library into {data_dir} ...")
        prep = PrepareConfig(
            out=data_dir,
            source="python-stdlib",
            tokenizer="bpe",
            vocab_size=4096,
            workers=os.cpu_count() or 1,
        )
        typer.echo(run(prep).format())
    typer.echo(f"training {cfg.name} for up to {minutes:g} minutes ...")
    _print_train_result(pretrain.run(cfg))


@app.command(name="eval")
def eval_(
    model: Annotated[
        str, typer.Argument(help="Model name or path; or `compare` followed by report folders.")
    ],
    runs: Annotated[list[str] | None, typer.Argument(help="With `compare`: eval report folders.")] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Built-in task or task type (repeatable).")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="Data file for a task type, in order.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows / sequences per forward.")] = 8,
    max_length: Annotated[int | None, typer.Option(help="Context window in tokens.")] = None,
    stride: Annotated[int | None, typer.Option(help="Perplexity window step.")] = None,
    num_fewshot: Annotated[int, typer.Option(help="Few-shot examples per item.")] = 0,
    limit: Annotated[int | None, typer.Option(help="First N items of each task.")] = None,
    out: Annotated[str | None, typer.Option(help="Report folder (default runs/eval/MODEL-TIME).")] = None,
    chat: Annotated[bool, typer.Option(help="Generation tasks: use the chat template.")] = False,
    png: Annotated[str | None, typer.Option(help="With `compare`: bar chart path.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
) -> None:
    """Evaluate a model on tasks (perplexity, multiple_choice, generation); `eval compare RUN...` tabulates reports."""
    import json

    from lmforge import runtime
    from lmforge.eval import harness

    if model == "compare":
        if not runs:
            raise UserError("`lmforge eval compare` needs at least one report folder")
        typer.echo(harness.compare(runs, out_png=png))
        return
    if runs:
        raise UserError(f"unexpected arguments {' '.join(runs)}; give tasks with --task")
    if not task:
        raise UserError("name at least one task with --task (built-ins: arith, shop-faq, en-zh, wiki-ppl)")
    runtime.set_threads(threads or None)

    cfg = harness.EvalConfig(
        model=model,
        tasks=task,
        data=data or (),
        batch_size=batch_size,
        max_length=max_length,
        stride=stride,
        num_fewshot=num_fewshot,
        limit=limit,
        out=out,
        chat=chat,
        device=device,
        dtype=dtype,
        progress=not json_out,
    )
    results = harness.run(cfg)
    if json_out:
        typer.echo(json.dumps(results, default=str))
    else:
        typer.echo(json.dumps(results, indent=2, default=str))


@app.command()
def finetune(
    config: Annotated[str, typer.Argument(help="A YAML recipe (see recipes/debug/finetune-tiny.yaml).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. method=lora lora.r=16 data=chat.jsonl."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in out_dir from its last checkpoint (full or LoRA).")
    ] = False,
) -> None:
    """Fine-tune a model (full or LoRA) on chat conversations in OpenAI fine-tuning JSONL, or with
    task=classification train a classification head on labelled text (JSONL {"text", "label"} or CSV)."""
    from lmforge import config_io
    from lmforge.train import finetune as finetune_mod

    cfg = config_io.load(finetune_mod.FinetuneConfig, config, overrides or [])
    result = finetune_mod.run(cfg, resume=resume)
    if result.model_dir is None:  # not rank 0
        return
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
    typer.echo(f"{result.stopped} after {result.steps} steps; val loss {val}; run folder {result.run_dir}")
    if result.adapter_dir is not None:
        typer.echo(f"LoRA adapter (PEFT layout) in {result.adapter_dir}")
    if result.store_name:
        use = "classify" if cfg.task == "classification" else "chat"
        typer.echo(f"model stored as {result.store_name!r}: lmforge {use} {result.store_name}")


@app.command()
def classify(
    model: Model,
    text: Annotated[str | None, typer.Argument(help="Text to classify.")] = None,
    top_k: Annotated[int, typer.Option(help="Print the k most likely labels (0 = all).")] = 1,
    data: Annotated[
        str | None,
        typer.Option(help="Instead of TEXT: a labelled JSONL/CSV to score (metrics JSON + confusion PNG)."),
    ] = None,
    out: Annotated[
        str | None, typer.Option(help="With --data: report folder (default runs/eval/MODEL-TIME).")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = 0,
) -> None:
    """Classify a text with a classifier (`lmforge finetune ... task=classification`): label and probability."""
    from pathlib import Path

    from lmforge import runtime, store

    runtime.set_threads(threads or None)
    if data is not None:
        from lmforge.eval.classification import REPORT, evaluate
        from lmforge.eval.harness import default_out_dir

        if text is not None:
            raise UserError("give either TEXT or --data FILE, not both")
        folder = Path(out) if out else default_out_dir(Path(store.resolve(model)).name)
        scores, read_report = evaluate(model, data, folder, device=device, dtype=dtype)
        typer.echo(read_report.summary())
        typer.echo(
            f"accuracy {scores['accuracy']:.4f}, macro F1 {scores['f1_macro']:.4f}; report in {folder / REPORT}"
        )
        return
    if not text:
        raise UserError("give a text to classify (or --data FILE to score a labelled file)")
    from lmforge.data.labels import encode_texts
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.engine import Classifier

    path = store.resolve(model)
    classifier = Classifier.load(path, device, dtype)
    probs = classifier.classify(encode_texts(Tokenizer.from_folder(path), [text]))[0]
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    for label, p in ranked[: top_k or None]:
        typer.echo(f"{label}\t{p:.4f}")


def main() -> None:
    from typer.exceptions import Abort, TyperException

    try:
        # not standalone: click's usage errors come here, to be printed as one line like every other error
        code = app(standalone_mode=False)  # a `typer.Exit(code)` comes back as its code here
    except TyperException as e:  # typer's vendored click exceptions (UsageError, BadParameter, ...)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        where = ctx.command_path if ctx is not None else "lmforge"
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"lmforge: error: {message} (see `{where} --help`)", err=True)
        sys.exit(getattr(e, "exit_code", 2) or 2)
    except Abort:
        sys.exit(130)
    except UserError as e:
        typer.echo(f"lmforge: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)
