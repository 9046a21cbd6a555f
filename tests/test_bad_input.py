"""Bad input and bad configuration: one line and exit 2 (or a logged reason), never a traceback."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import structlog.testing
from canned import Canned
from conftest import Mana, open_runner, serving
from fault_proxy import FaultProxy
from procs import ROOT, free_port, runner_env, start_runner, start_sandbox, until
from starlette.responses import JSONResponse, Response

from runner import log
from runner.dispatch import run_once
from runner.journal import PRUNE_CHUNK, Journal
from runner.mana.personas_api import DueLimits, parse_due
from runner.settings import load_settings


@pytest.fixture
def canned() -> Iterator[Canned]:
    server = Canned()
    yield server
    server.close()


def run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "RUNNER_", "LLM_"))}
    env.update(
        RUNNER_STATE_PATH=str(tmp_path / "r.db"),
        LLM_PROVIDER="scripted",
        MANA_RETRY_ATTEMPTS="1",
        MANA_AUTH_URL="http://127.0.0.1:9",
        MANA_MCP_URL="http://127.0.0.1:9",
        LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    plain = [line for line in done.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(plain) == 1, done.stderr[-3000:]
    return plain[0]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("TICK_INTERVAL_MS", "1e20", "TICK_INTERVAL_MS"),
        ("TICK_INTERVAL_MS", "100000000000000000000", "less than or equal"),
        ("MANA_API_URL", "http://[::1", "not a valid URL"),
        ("MANA_MCP_URL", "http://[::1]:3069", None),  # a well-formed IPv6 origin is fine
        ("MANA_AUTH_URL", "http://localhost:99999", "port must be between"),
        ("MANA_API_URL", "http://", "has no host"),
        ("MANA_API_URL", "http://exa mple.com", "not a host name"),
        ("MANA_AUTH_ORIGIN", "http://localhost:3001/app", "must be an origin"),
        ("MANA_AUTH_URL", "http://mana_auth:3001", None),  # a compose service name is a host
        ("PORT", "99999", "PORT"),
        ("MANA_SERVICE_KEY", "schlüssel-ключ", "printable ASCII"),
        ("ANTHROPIC_API_KEY", "sk-ant-\x7f", "printable ASCII"),
        ("PERSONA_SEED_SECRET", "", "must not be empty"),
        ("DUE_MAX_BYTES", "12", "DUE_MAX_BYTES"),
        ("OUTBOX_PARK_AFTER", "0", "OUTBOX_PARK_AFTER"),
        ("HTTP_HOST", "not a host", "IP address or a host name"),
        ("HTTP_HOST", "::", None),
        ("BUDGET_USD_PER_DAY", "-1", "greater than or equal to 0"),
        ("BUDGET_USD_PER_DAY", "ten dollars", "valid number"),
        ("BUDGET_USD_PER_DAY", "nan", "finite number"),
        ("BUDGET_USD_PER_DAY", "2.50", None),
        ("PERSONA_BUDGET_USD_PER_DAY", "-0.01", "greater than or equal to 0"),
        ("PERSONA_BUDGET_USD_PER_DAY", "1e", "valid number"),
        ("BUDGET_TICK_DEFAULT_USD", "-5", "greater than 0"),
        ("BUDGET_EXHAUSTED", "stop", "'pause' or 'scripted'"),
        ("BUDGET_EXHAUSTED", "scripted", None),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(variable: str, value: str, says: str | None, tmp_path: Path) -> None:
    # RUNNER_PAUSED keeps a valid configuration from doing anything: `once` then polls nothing.
    done = run(["once"], clean_env(tmp_path, RUNNER_PAUSED="true", **{variable: value}))
    if says is None:
        assert done.returncode == 0, done.stderr[-2000:]
        return
    assert done.returncode == 2
    line = error_line(done)
    assert line.startswith(f"error: {variable}") and says in line
    if value:
        assert value not in line  # a setting's value may be a secret: never echoed


def test_production_with_an_empty_seed_secret_is_refused(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path, RUNNER_ENV="production", PERSONA_SEED_SECRET="", MANA_SERVICE_KEY="k" * 16, RUNNER_PAUSED="true"
    )
    done = run(["once"], env)
    assert done.returncode == 2 and "PERSONA_SEED_SECRET" in error_line(done)


def test_a_dotenv_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"MANA_SERVICE_KEY=\xff\xfeabc\nPORT=3070\n")
    done = run(["once"], clean_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and error_line(done).startswith("error: .env: not UTF-8")


DEEP = b'{"personas": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BIG_INT = b'{"personas": [], "serverTime": ' + b"9" * 5000 + b"}"


@pytest.mark.parametrize(
    ("body", "headers", "says"),
    [
        (BIG_INT, {}, "BAD_BODY"),
        (b'{"personas": [{"userId": "\xff\xfe"}]}', {}, "BAD_BODY"),
        (
            '{"personas": [], "x": "Grüße"}'.encode("latin-1"),
            {"Content-Type": "application/json; charset=utf-8"},
            "BAD_BODY",
        ),
        (DEEP, {}, "BAD_BODY"),
        (b"<html>502 Bad Gateway</html>", {"Content-Type": "text/html"}, "BAD_BODY"),
        (b'{"personas": []}', {"Content-Encoding": "gzip"}, "BAD_BODY"),  # says gzip, is not
        (b'{"personas": []' + b" " * 10_000 + b"}", {}, "TOO_LARGE"),
    ],
)
def test_a_due_body_that_is_not_usable_json_fails_the_poll_in_one_line(
    canned: Canned, tmp_path: Path, body: bytes, headers: dict[str, str], says: str
) -> None:
    canned.body, canned.headers = body, {"Content-Type": "application/json", **headers}
    # A declared length is refused before reading; a body without one is cut while it streams. Only the
    # size bound reads the two differently, so only it runs both ways (each run is a process start).
    for with_length in (True, False) if says == "TOO_LARGE" else (True,):
        canned.length = with_length
        bound = "4096" if says == "TOO_LARGE" else "1048576"
        done = run(["once"], clean_env(tmp_path, MANA_API_URL=canned.url, DUE_MAX_BYTES=bound))
        assert done.returncode == 1
        line = error_line(done)
        assert line.startswith("error: cannot poll the personas API: due: HTTP 200") and says in line


async def test_the_daemon_logs_an_undecodable_due_answer_as_a_failed_poll_not_a_crash(
    canned: Canned, tmp_path: Path
) -> None:
    canned.body, canned.headers = b'{"personas": []}', {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    settings = load_settings(
        mana_api_url=canned.url,
        mana_auth_url="http://127.0.0.1:9",
        mana_mcp_url="http://127.0.0.1:9",
        llm_provider="scripted",
        runner_state_path=tmp_path / "r.db",
        mana_retry_attempts=1,
        tick_interval_ms=100,
        port=free_port(),
        runner_env="development",
        node_env=None,
    )
    with structlog.testing.capture_logs() as logged:
        async with serving(settings):
            await until(lambda: sum(e["event"] == "poll failed" for e in logged) >= 2, what="two failed polls")
    failed = [e for e in logged if e["event"] == "poll failed"]
    assert "BAD_BODY" in failed[0]["error"] and "decoded" in failed[0]["error"]
    assert not [e for e in logged if e["event"] == "poll crashed" or e.get("exc_info")]


def test_a_utf16_due_body_is_read_for_what_it_is(canned: Canned, tmp_path: Path) -> None:
    canned.body = json.dumps({"personas": [], "serverTime": "2026-11-25T09:30:00Z"}).encode("utf-16")
    done = run(["once"], clean_env(tmp_path, MANA_API_URL=canned.url))
    assert done.returncode == 0 and "Traceback" not in done.stderr


@pytest.mark.parametrize("body", [b"[]", b"null", b"{}", b'{"personas": {"a": 1}}', b"42", b'"personas"'])
def test_a_due_answer_without_the_envelope_is_warned_about(canned: Canned, tmp_path: Path, body: bytes) -> None:
    canned.body = body
    done = run(["once"], clean_env(tmp_path, MANA_API_URL=canned.url))
    assert done.returncode == 0 and "Traceback" not in done.stderr
    warnings = [json.loads(line) for line in done.stderr.splitlines() if '"due answer"' in line]
    assert len(warnings) == 1 and "not the contract's envelope" in warnings[0]["problem"]


def test_ten_thousand_bad_rows_are_one_warning(canned: Canned, tmp_path: Path) -> None:
    canned.body = json.dumps({"personas": [{"userId": i} for i in range(10_000)]}).encode()
    done = run(["once"], clean_env(tmp_path, MANA_API_URL=canned.url, DUE_MAX_ROWS="20000"))
    assert done.returncode == 0 and "Traceback" not in done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    skipped = [line for line in lines if line["event"] == "due rows skipped"]
    assert len(skipped) == 1 and skipped[0]["count"] == 10_000 and len(skipped[0]["first"]) == 5
    assert sum(1 for line in lines if line["level"] == "warning") <= 3


def test_rows_and_prompts_beyond_the_bounds_are_cut_with_a_reason() -> None:
    row = {"userId": "u", "email": "a@b.c", "tickCadence": "daily", "systemPrompt": "x" * 50_000}
    due = parse_due({"personas": [dict(row, userId=f"u{i}") for i in range(30)]}, DueLimits(max_rows=10))
    assert len(due.personas) == 10 and all(len(p.system_prompt) == 20_000 for p in due.personas)
    assert any("only the first 10" in w for w in due.warnings)
    assert any("cut to 20000" in w for w in due.warnings)


def test_a_row_with_a_control_character_in_its_id_is_skipped() -> None:
    due = parse_due(
        {
            "personas": [
                {"userId": "u\x00", "email": "a@b.c", "tickCadence": "daily"},
                {"userId": "\ud800", "email": "x@y.z", "tickCadence": "daily"},
            ]
        },
        DueLimits(),
    )
    assert due.personas == [] and len(due.skipped) == 2


async def test_a_login_answered_429_retry_after_60_defers_the_tick(mana: Mana, tmp_path: Path) -> None:
    people = await mana.get("personas")
    async with FaultProxy(mana.sandbox.auth_url) as auth:
        auth.rule = lambda m, path, _: (
            JSONResponse({"error": "RATE_LIMITED", "message": "slow down"}, 429, headers={"Retry-After": "60"})
            if path == "/api/v1/auth/login"
            else None
        )
        settings = mana.settings(tmp_path, mana_auth_url=auth.url)
        started = time.time()
        async with open_runner(settings) as runtime:
            report = await run_once(runtime)
            states = [await runtime.journal.tick_state(t) for _, t in report.ticks]
        assert len(states) == len(people)
        for state in states:
            assert state is not None and state["state"] == "retry" and state["next_attempt_at"] >= started + 60
        assert auth.answered["POST /api/v1/auth/login"] == len(people)  # one attempt each, not a wait of 60 s
    assert await mana.get("actions") == []  # nothing sealed: they run again after the pause


async def test_an_account_locked_429_is_not_deferred(mana: Mana, tmp_path: Path) -> None:
    async with FaultProxy(mana.sandbox.auth_url) as auth:
        auth.rule = lambda m, path, _: (
            JSONResponse({"error": "ACCOUNT_LOCKED", "retryAfterSec": 900}, 429, headers={"Retry-After": "900"})
            if path == "/api/v1/auth/login"
            else None
        )
        async with open_runner(mana.settings(tmp_path, mana_auth_url=auth.url)) as runtime:
            await run_once(runtime)
        assert auth.answered["POST /api/v1/auth/login"] == len(await mana.get("personas"))
    rows = await mana.get("actions")
    assert rows and all("ACCOUNT_LOCKED" in r["errorMessage"] for r in rows)


@pytest.mark.parametrize("status", [401, 503])
async def test_a_lone_surrogate_in_an_error_body_leaves_no_tick_running(
    mana: Mana, tmp_path: Path, status: int
) -> None:
    raw = b'{"error": "INVALID_CREDENTIALS", "message": "bad \\ud800 \\udfff\\u0000 input"}'
    async with FaultProxy(mana.sandbox.auth_url) as auth:
        auth.rule = lambda m, path, _: (
            Response(raw, status, media_type="application/json") if path == "/api/v1/auth/login" else None
        )
        settings = mana.settings(tmp_path, mana_auth_url=auth.url, persona_max_attempts=1)
        async with open_runner(settings) as runtime:
            report = await run_once(runtime)
            states = [await runtime.journal.tick_state(t) for _, t in report.ticks]
    assert states and all(s is not None and s["state"] == "sealed" for s in states)
    rows = await mana.get("actions")
    assert len(rows) == len(states)
    assert all("bad" in r["errorMessage"] and "\ud800" not in r["errorMessage"] for r in rows)


def test_sighup_drains_like_sigterm(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path, seed_secret="hup-seed-123456", service_key="hup-key-123456")
    try:
        runner = start_runner(runner_env(sandbox, tmp_path / "runner.db"), tmp_path / "runner.log")
        try:
            runner.wait_healthy()
            runner.proc.send_signal(signal.SIGHUP)
            assert runner.proc.wait(timeout=60) == 0
        finally:
            if runner.proc.poll() is None:
                runner.kill()
        logs = runner.logs()
        assert '"shutting down"' in logs and '"stopped"' in logs and "Traceback" not in logs
    finally:
        sandbox.stop()


def test_repeated_warnings_are_held_back_and_counted_and_values_capped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log.configure("json", "info")
    logger = structlog.get_logger("flood-test")
    for _ in range(1000):
        logger.warning("disk full", error="OSError: [Errno 28] No space left on device")
    logger.error("prune failed", error="x" * 1_800_000)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert len([line for line in lines if line["event"] == "disk full"]) == log.RATE_BURST
    pruned = [line for line in lines if line["event"] == "prune failed"]
    assert len(pruned) == 1 and len(pruned[0]["error"]) < log.FIELD_MAX + 40
    monkeypatch.setattr(log, "RATE_WINDOW_S", 0.0)
    logger.warning("disk full", error="OSError: [Errno 28] No space left on device")
    after = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert after[0]["suppressed"] == 1000 - log.RATE_BURST


async def test_a_prune_of_more_ticks_than_sqlite_binds_works_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = await Journal.open(path)
    await journal.close()
    count = 40_000  # past SQLite's 32,766 bound variables, where one-statement pruning failed
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO ticks (tick_id, persona_id, window, state, outcome, attempts, created_at, updated_at)"
            " VALUES (?, 'p', ?, 'sealed', 'ok', 1, 1.0, 1.0)",
            ((f"t{i}", f"w{i}") for i in range(count)),
        )
        db.executemany(
            "INSERT INTO batches (tick_id, persona_id, kind, body, rows, state, attempts, created_at)"
            " VALUES (?, 'p', 'actions', X'7B7D', 1, 'delivered', 1, 1.0)",
            ((f"t{i}",) for i in range(count)),
        )
        # One tick with an undelivered batch must survive the prune.
        db.execute(
            "INSERT INTO ticks (tick_id, persona_id, window, state, outcome, attempts, created_at, updated_at)"
            " VALUES ('keep', 'p', 'w', 'sealed', 'ok', 1, 1.0, 1.0)"
        )
        db.execute(
            "INSERT INTO batches (tick_id, persona_id, kind, body, rows, state, attempts, created_at)"
            " VALUES ('keep', 'p', 'actions', X'7B7D', 1, 'parked', 1, 1.0)"
        )
    assert count > 32_766 and PRUNE_CHUNK < 32_766  # more than SQLite's bound variables, in chunks below it
    journal = await Journal.open(path)
    try:
        assert await journal.prune(older_than_s=3600) == count  # the rows say 1970
        assert await journal.tick_state("keep") is not None
        assert await journal.batch_counts() == {"pending": 0, "parked": 1, "refused": 0, "delivered": 0}
    finally:
        await journal.close()


GOOD_ROW = '{"input": 1, "cache_write_5m": 1.25, "cache_write_1h": 2, "cache_read": 0.1, "output": 5}'


@pytest.mark.parametrize(
    ("table", "extra", "says"),
    [
        ("{not json", {}, "not JSON"),
        (
            '{"as_of": "2026-12-01", "models": {"claude-haiku-4-5": {"input": "x"}}}',
            {},
            "models.claude-haiku-4-5.input",
        ),
        ('{"as_of": "2026-12-01", "models": {}}', {}, "models"),
        ('{"as_of": "someday", "models": {"claude-haiku-4-5": ' + GOOD_ROW + "}}", {}, "as_of"),
        ('{"as_of": "2026-12-01", "models": {"m": ' + GOOD_ROW.replace("5}", "-5}") + "}}", {}, "output"),
        ('{"as_of": "2026-12-01", "unit": "EUR", "models": {"m": ' + GOOD_ROW + "}}", {}, "USD per million"),
        (None, {}, "cannot be read"),
        (
            '{"as_of": "2026-12-01", "models": {"claude-haiku-4-5": ' + GOOD_ROW + "}}",
            {"LLM_PROVIDER": "anthropic", "ANTHROPIC_MODEL": "claude-nonesuch-9"},
            "ANTHROPIC_MODEL: no price for 'claude-nonesuch-9'",
        ),
    ],
)
def test_a_bad_price_file_or_a_model_without_a_price_is_one_line_and_exit_2(
    table: str | None, extra: dict[str, str], says: str, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.json"
    if table is not None:
        prices.write_text(table, encoding="utf-8")
    done = run(["once"], clean_env(tmp_path, RUNNER_PAUSED="true", MODEL_PRICES_FILE=str(prices), **extra))
    assert done.returncode == 2
    line = error_line(done)
    assert line.startswith("error: ANTHROPIC_MODEL" if extra else "error: MODEL_PRICES_FILE") and says in line


def test_a_dated_model_name_is_priced_by_its_models_row(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path, RUNNER_PAUSED="true", LLM_PROVIDER="anthropic", ANTHROPIC_MODEL="claude-haiku-4-5-20251001"
    )
    done = run(["once"], env)
    assert done.returncode == 0, done.stderr[-2000:]
