"""`lmforge db upgrade` and `lmforge admin ...` in subprocesses, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from lmforge.serve import auth, metering
from lmforge.serve.auth import AuthError
from lmforge.serve.db import Database

T0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)


def lmforge(*args: str, home, url: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_DATABASE_URL"}
    env["LMFORGE_HOME"] = str(home)
    extra = ["--database-url", url] if url else []
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args, *extra], capture_output=True, text=True, env=env, timeout=60
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    return proc.stdout


def assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("lmforge: error: ") and needle in lines[0], lines[0]


def test_admin_flow(empty_database_url, tmp_path):
    url = empty_database_url
    is_pg = not url.startswith("sqlite")

    def run(*args):
        return lmforge(*args, home=tmp_path, url=url)

    if is_pg:  # PostgreSQL is shared by replicas: never upgraded behind the operator's back
        assert_user_error(run("admin", "tenant", "list"), "has no lmforge tables; run `lmforge db upgrade")
    out = ok(run("db", "upgrade"))
    assert out.strip().endswith(": schema at revision 0001")
    if is_pg:
        assert ":***@" in out and "lmforge:lmforge@" not in out
    assert ok(run("db", "upgrade")) == out  # idempotent
    assert ok(run("admin", "tenant", "create", "acme")) == "tenant 'acme' created (id 1)\n"
    ok(run("admin", "tenant", "create", "globex"))
    lines = ok(run("admin", "tenant", "list")).splitlines()
    assert lines[0].split() == ["id", "name", "created", "(UTC)"]
    assert [line.split()[:2] for line in lines[1:]] == [["1", "acme"], ["2", "globex"]]

    created = run(
        "admin", "key", "create", "--tenant", "acme", "--name", "ci", "--expires", "2099-12-31",
        "--model", "m", "--model", "other", "--rpm", "5", "--tpm", "100",
    )  # fmt: skip
    secret = ok(created).strip()
    assert len(ok(created).splitlines()) == 1 and secret.startswith("lmf-")  # stdout: the secret alone
    assert f"key 1 ({secret[:12]}...) for tenant 'acme'; store the secret now" in created.stderr
    db = Database(url)
    key = auth.authenticate(db, f"Bearer {secret}")
    assert (key.name, key.models, key.rpm, key.tpm) == ("ci", ("m", "other"), 5, 100)
    assert key.expires_at == datetime(2100, 1, 1, tzinfo=UTC)  # works through the whole last day (UTC)
    other = ok(run("admin", "key", "create", "--tenant", "globex")).strip()
    listed = ok(run("admin", "key", "list", "--tenant", "acme")).splitlines()
    assert len(listed) == 2 and listed[1].split() == [
        "1", "acme", secret[:12], "ci", "expires", "2100-01-01", "00:00:00", "m,other", "rpm=5", "tpm=100",
    ]  # fmt: skip
    assert len(ok(run("admin", "key", "list")).splitlines()) == 3
    assert (
        ok(run("admin", "key", "revoke", secret[:12]))
        == f"key 1 ({secret[:12]}...) of tenant 'acme' revoked\n"
    )
    with pytest.raises(AuthError) as e:
        auth.authenticate(db, f"Bearer {secret}")
    assert e.value.code == "key_revoked"
    assert auth.authenticate(db, f"Bearer {other}").tenant == "globex"
    assert ok(run("admin", "key", "list", "--tenant", "acme")).splitlines()[1].split()[4] == "revoked"

    out = ok(run("admin", "price", "set", "m", "--input", "0.15", "--output", "0.60"))
    assert out.startswith("m: $0.15 input, $0.60 output per million tokens from ")
    ok(run("admin", "price", "set", "m", "--input", "1", "--output", "2.5", "--effective", "2099-01-01"))
    prices = ok(run("admin", "price", "list")).splitlines()
    assert prices[0].split() == ["model", "effective", "from", "(UTC)", "input", "$/1M", "output", "$/1M"]
    assert prices[2].split() == ["m", "2099-01-01", "00:00:00", "1.00", "2.50"]
    assert [p.input_uusd_per_mtok for p in metering.list_prices(db)] == [150_000, 1_000_000]

    out = ok(run("admin", "budget", "set", "--tenant", "acme", "--usd", "25", "--month", "2026-11"))
    assert out == "acme 2026-11: budget $25.00, spent $0.00, held $0.00\n"
    ok(run("admin", "budget", "set", "--tenant", "globex", "--usd", "0.5"))
    budgets = ok(run("admin", "budget", "list")).splitlines()
    assert budgets[1].split() == ["acme", "2026-11", "25.00", "0.00", "0.00"]
    assert budgets[2].split() == ["globex", metering.month_of(datetime.now(UTC)), "0.50", "0.00", "0.00"]
    db.close()


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"

    def run(*args):
        return lmforge(*args, home=tmp_path, url=url)

    ok(run("admin", "tenant", "create", "acme"))  # SQLite: created and upgraded on first use
    cases = [
        (("admin", "tenant", "create", "acme"), "tenant 'acme' already exists"),
        (("admin", "tenant", "create", "a/b"), "invalid tenant name 'a/b'"),
        (("admin", "key", "create", "--tenant", "nobody"), "no tenant named 'nobody'; tenants: acme"),
        (("admin", "key", "create", "--tenant", "acme", "--expires", "2020-01-01"), "is in the past"),
        (("admin", "key", "create", "--tenant", "acme", "--expires", "soon"), "--expires must be a date"),
        (("admin", "key", "create", "--tenant", "acme", "--rpm", "0"), "rpm must be between 1 and"),
        (("admin", "key", "revoke", "999"), "no API key with id or prefix '999'"),
        (("admin", "key", "list", "--tenant", "nobody"), "no tenant named 'nobody'"),
        (("admin", "price", "set", "m", "--input", "-0.15", "--output", "0.6"), "the input price cannot be negative"),
        (
            ("admin", "price", "set", "m", "--input", "0.1", "--output", "0.1234567"),
            "the output price has more than 6 decimal places: 0.1234567",
        ),
        (("admin", "price", "set", "m", "--input", "cheap", "--output", "1"), "must be an amount in dollars"),
        (
            ("admin", "price", "set", "m", "--input", "1", "--output", "1", "--effective", "2020-01-01"),
            "is in the past",
        ),
        (("admin", "budget", "set", "--tenant", "acme", "--usd", "25", "--month", "2026-13"), "a month is YYYY-MM"),
        (("admin", "budget", "set", "--tenant", "acme", "--usd", "1e-13"), "more than 12 decimal places"),
        (("admin", "budget", "set", "--tenant", "nobody", "--usd", "1"), "no tenant named 'nobody'"),
        (("admin", "usage", "--tenant", "acme", "--month", "11/2026"), "a month is YYYY-MM (e.g. 2026-11), got '11/2026'"),
        (("admin", "usage", "--tenant", "nobody", "--month", "2026-11"), "no tenant named 'nobody'"),
    ]  # fmt: skip
    for args, needle in cases:
        assert_user_error(run(*args), needle)
    assert_user_error(
        lmforge("admin", "tenant", "list", home=tmp_path, url="mysql://u:p@h/db"), "unsupported"
    )
    proc = lmforge("db", "upgrade", home=tmp_path, url="postgresql://u:hunter2@127.0.0.1:1/x")
    assert_user_error(proc, "cannot use the database postgresql+psycopg://u:***@127.0.0.1:1/x")
    assert "hunter2" not in proc.stderr


def test_default_database_is_sqlite_in_lmforge_home(tmp_path):
    ok(lmforge("admin", "tenant", "create", "acme", home=tmp_path))
    assert (tmp_path / "lmforge.db").is_file()
    assert "acme" in ok(lmforge("admin", "tenant", "list", home=tmp_path))


def test_usage_report_exact(database, tmp_path):
    auth.create_tenant(database, "acme")
    auth.create_tenant(database, "globex")
    k1, _ = auth.create_key(database, "acme")
    k2, _ = auth.create_key(database, "globex")
    earlier = T0 - timedelta(days=40)
    metering.set_price(database, "small", input_usd="0.15", output_usd="0.6", now=earlier)
    metering.set_price(database, "large,v2", input_usd="3", output_usd="15", now=earlier)
    metering.set_budget(database, "acme", "25", month="2026-11")
    plan = [
        (k1, "small", T0, 1000, 200, "completed"),
        (k1, "small", T0 + timedelta(days=1), 500, 0, "cancelled"),
        (k1, "large,v2", T0, 1234, 567, "completed"),
        (k1, "free", T0, 10, 10, "failed"),
        (k1, "small", datetime(2026, 12, 1, tzinfo=UTC), 9, 9, "completed"),  # December
        (k2, "small", T0, 7777, 7777, "completed"),  # another tenant
    ]
    for i, (key, model, when, p, c, status) in enumerate(plan):
        a = metering.admit(
            database, key, model, request_id=f"r{i}", prompt_tokens=p, max_completion_tokens=c + 1,
            instance_id="x", now=when,
        )  # fmt: skip
        metering.settle(database, a, prompt_tokens=p, completion_tokens=c, status=status, now=when)
    metering.admit(database, k1, "small", request_id="running", prompt_tokens=1, max_completion_tokens=1,
                   instance_id="x", now=T0)  # fmt: skip
    # small: 1500 prompt x $0.15/M + 200 x $0.60/M = $0.000345; large: 1234 x $3/M + 567 x $15/M = $0.012207
    csv = ok(lmforge("admin", "usage", "--tenant", "acme", "--month", "2026-11", "--csv", home=tmp_path,
                     url=database.url))  # fmt: skip
    assert csv == (
        "tenant,month,model,requests,prompt_tokens,completion_tokens,cost_usd\n"
        "acme,2026-11,free,1,10,10,0.00\n"
        'acme,2026-11,"large,v2",1,1234,567,0.012207\n'
        "acme,2026-11,small,2,1500,200,0.000345\n"
        "acme,2026-11,total,4,2744,777,0.012552\n"
    )
    table = ok(lmforge("admin", "usage", "--tenant", "acme", "--month", "2026-11", home=tmp_path,
                       url=database.url)).splitlines()  # fmt: skip
    assert table[0] == "tenant acme, 2026-11 (UTC)"
    assert table[-2].split() == ["total", "4", "2744", "777", "0.012552"]
    assert table[-1] == "budget $25.00; spent $0.012552; 1 request(s) running"
    december = ok(lmforge("admin", "usage", "--tenant", "acme", "--month", "2026-12", "--csv", home=tmp_path,
                          url=database.url))  # fmt: skip
    assert december.splitlines()[1:] == [
        "acme,2026-12,small,1,9,9,0.00000675",
        "acme,2026-12,total,1,9,9,0.00000675",
    ]
