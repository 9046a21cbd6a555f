"""Servers that echo secrets, the diagnostics' lockout rule, where the HTTP face listens, /ready's cost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from conftest import SERVICE_KEY, Mana, open_runner, serving
from fault_proxy import FaultProxy
from procs import free_port
from starlette.responses import JSONResponse, Response

from runner.dispatch import Dispatcher, run_once
from runner.persona import TICK_ROW, derive_password
from runner.server import READY_CACHE_S, build_app
from runner.settings import SettingsError, load_settings


def _echo_password(method: str, path: str, body: bytes) -> Response | None:
    """An auth server that quotes the password it was sent back in its refusal."""
    if method == "POST" and path == "/api/v1/auth/login":
        sent = json.loads(body)
        return JSONResponse(
            {"error": "INVALID_CREDENTIALS", "message": f"password {sent['password']} is wrong for {sent['email']}"},
            401,
        )
    return None


def _echo_key(method: str, path: str, body: bytes) -> Response | None:
    """An API that quotes the service key back, on /due and on the row routes."""
    if path.endswith(("/due", "/actions", "/feedback")):
        return JSONResponse({"error": "UNAVAILABLE", "message": f"X-Service-Key {SERVICE_KEY} rejected"}, 503)
    return None


async def test_a_password_echoed_by_mana_auth_reaches_no_row_and_no_journal(mana: Mana, tmp_path: Path) -> None:
    people = await mana.get("personas")
    async with FaultProxy(mana.sandbox.auth_url) as auth:
        auth.rule = _echo_password
        settings = mana.settings(tmp_path, mana_auth_url=auth.url)
        async with open_runner(settings) as runtime:
            report = await run_once(runtime)
        assert report.backlog == 0
    passwords = [derive_password(mana.config.seed_secret, p["email"]) for p in people]
    actions = await mana.get("actions")
    assert {a["personaId"] for a in actions} == {p["userId"] for p in people}
    for row in actions:
        assert row["toolName"] == TICK_ROW and "INVALID_CREDENTIALS" in row["errorMessage"]
        assert "[redacted]" in row["errorMessage"]
        assert not any(pw in row["errorMessage"] for pw in passwords)
    journal_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("runner.db*"))
    assert not any(pw.encode() in journal_bytes for pw in passwords)


async def test_a_service_key_echoed_by_the_api_reaches_no_ready_answer_and_no_journal(
    mana: Mana, tmp_path: Path
) -> None:
    async with FaultProxy(mana.sandbox.api_url) as api:
        settings = mana.settings(tmp_path, mana_api_url=api.url, mana_retry_attempts=1)
        async with open_runner(settings) as runtime:
            api.rule = _echo_key
            dispatcher = Dispatcher(runtime)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(build_app(runtime, dispatcher))) as client:
                ready = await client.get("http://runner/ready")
            assert ready.status_code == 503
            assert SERVICE_KEY not in ready.text and "[redacted]" in ready.text
    journal_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("runner.db*"))
    assert SERVICE_KEY.encode() not in journal_bytes


async def test_a_row_error_echoing_the_key_is_stored_redacted(mana: Mana, tmp_path: Path) -> None:
    async with FaultProxy(mana.sandbox.api_url) as api:
        api.rule = lambda m, p, b: _echo_key(m, p, b) if m == "POST" else None
        settings = mana.settings(tmp_path, mana_api_url=api.url, mana_retry_attempts=1)
        async with open_runner(settings) as runtime:
            report = await run_once(runtime)
            assert report.backlog > 0
            problems = [b.last_error or "" for b in await runtime.journal.problem_batches()]
    journal_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("runner.db*"))
    assert SERVICE_KEY.encode() not in journal_bytes
    assert all(SERVICE_KEY not in text for text in problems)


async def test_diagnostics_are_off_unless_enabled_and_never_in_production(mana: Mana, tmp_path: Path) -> None:
    settings = mana.settings(tmp_path)
    assert not settings.runner_diag
    async with open_runner(settings) as runtime:
        app = build_app(runtime, Dispatcher(runtime))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app)) as client:
            assert (await client.get("http://runner/diag/login", params={"email": "a@b.c"})).status_code == 404
            assert (await client.post("http://runner/diag/tick")).status_code == 404
            assert (await client.get("http://runner/health")).status_code == 200
    with pytest.raises(SettingsError, match="RUNNER_DIAG"):
        load_settings(
            runner_env="production",
            runner_diag=True,
            persona_seed_secret="prod-secret-123456",
            mana_service_key="key-123456",
            llm_provider="scripted",
        )


async def test_diag_login_obeys_the_lockout_rule_and_spends_one_attempt_at_most(mana: Mana, tmp_path: Path) -> None:
    wrong = await mana.add_persona("wrongseed", wrongSeed=True)
    settings = mana.settings(tmp_path, runner_diag=True)
    async with open_runner(settings) as runtime:
        app = build_app(runtime, Dispatcher(runtime))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app)) as client:
            answers = [await client.get("http://runner/diag/login", params={"email": wrong["email"]}) for _ in range(6)]
        assert answers[0].status_code == 502 and "INVALID_CREDENTIALS" in answers[0].text
        assert all(a.status_code == 409 and "not attempted" in a.text for a in answers[1:])
        # A tick sees the block diag recorded, and spends no attempt either.
        report = await run_once(runtime)
        assert report.backlog == 0
    attempts = [row for row in await mana.get("logins") if row["email"] == wrong["email"]]
    assert len(attempts) == 1  # five more would have locked the account
    rows = [a for a in await mana.get("actions") if a["personaId"] == wrong["userId"]]
    assert len(rows) == 1 and "not attempted" in rows[0]["errorMessage"]
    password = derive_password(mana.config.seed_secret, wrong["email"])
    assert all(password not in a.text for a in answers)


async def test_diag_login_sees_a_block_a_tick_recorded(mana: Mana, tmp_path: Path) -> None:
    wrong = await mana.add_persona("wrongseed2", wrongSeed=True)
    settings = mana.settings(tmp_path, runner_diag=True)
    async with open_runner(settings) as runtime:
        await run_once(runtime)
        app = build_app(runtime, Dispatcher(runtime))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app)) as client:
            answer = await client.get("http://runner/diag/login", params={"email": wrong["email"]})
    assert answer.status_code == 409
    assert len([row for row in await mana.get("logins") if row["email"] == wrong["email"]]) == 1


async def test_ready_is_cached_and_a_probe_flood_is_one_due_request(mana: Mana, tmp_path: Path) -> None:
    async with FaultProxy(mana.sandbox.api_url) as api:
        settings = mana.settings(tmp_path, mana_api_url=api.url)
        async with open_runner(settings) as runtime:
            app = build_app(runtime, Dispatcher(runtime))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app)) as client:
                answers = await asyncio.gather(*(client.get("http://runner/ready") for _ in range(50)))
                answers += [await client.get("http://runner/ready") for _ in range(50)]
                assert all(a.status_code == 200 for a in answers)
                assert sum(n for key, n in api.seen.items() if key.endswith("/due")) == 1
                await asyncio.sleep(READY_CACHE_S + 0.2)
                assert (await client.get("http://runner/ready")).status_code == 200
                assert sum(n for key, n in api.seen.items() if key.endswith("/due")) == 2


def _listening(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, read from the kernel's own tables."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port and len(address) == width:
                found.add(address)
    return found


async def test_the_http_face_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    # Paused: the daemon talks to no Mana, so none needs to be there.
    values = dict(
        mana_api_url="http://127.0.0.1:9",
        mana_auth_url="http://127.0.0.1:9",
        mana_mcp_url="http://127.0.0.1:9",
        llm_provider="scripted",
        runner_paused=True,
        runner_state_path=tmp_path / "runner.db",
    )
    async with serving(load_settings(**values, port=free_port())) as url:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/health")).json()["paused"] is True
        assert _listening(int(url.rsplit(":", 1)[1])) == {"0100007F"}  # 127.0.0.1, little-endian hex
    async with serving(load_settings(**values, port=free_port(), http_host="0.0.0.0")) as url:
        assert _listening(int(url.rsplit(":", 1)[1])) == {"00000000"}
