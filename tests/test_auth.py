"""Logging in on the real mana-auth (issue 9): the space list by cookie, remembered spaces, paced sign-ins.

The sandbox models the real service by default: its space list refuses Bearer and takes only the
signed session cookie from Better Auth's own sign-in. Rate-limit tests use a scaled window
(3 per 1 s instead of 3 per 10 s) so they finish in seconds; the rule is the same.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from conftest import SEED_SECRET, SERVICE_KEY, Mana, open_mana, open_runner
from procs import start_sandbox

from runner.dispatch import RoundReport, run_once
from runner.journal import Journal
from runner.log import redact
from runner.mana.auth import LoginLimiter
from runner.persona import TICK_ROW, derive_password
from runner.sandbox import SignInLimit
from runner.settings import Settings, SettingsError, load_settings, parse_rate

ROOT = Path(__file__).resolve().parents[1]
OPAQUE_ID = re.compile(r"[A-Za-z0-9]{32}")


@pytest.fixture
async def bearer_mana(tmp_path: Path) -> AsyncIterator[Mana]:
    """A future Mana whose space list takes Bearer."""
    async with open_mana(tmp_path, spaces_accept_bearer=True) as world:
        yield world


async def _once(settings: Settings) -> tuple[RoundReport, dict[str, tuple[str, str]], Any]:
    """One round; returns the report, each tick's (space, via), and the AuthClient that ran it."""
    async with open_runner(settings) as runtime:
        report = await run_once(runtime)
        spaces = {}
        for _, tick_id in report.ticks:
            found = await runtime.journal.tick_space(tick_id)
            if found is not None:  # a tick refused before its space was known has none
                spaces[tick_id] = found
        return report, spaces, runtime.tick_deps.auth


async def _personal_spaces(world: Mana) -> dict[str, str]:
    return {
        p["userId"]: next(s["id"] for s in p["spaces"] if s["type"] == "personal")
        for p in await world.get("personas")
        if any(s["type"] == "personal" for s in p["spaces"])
    }


def _by_route(logins: list[dict[str, Any]], email: str) -> Counter[str]:
    return Counter(e["route"] for e in logins if e["email"] == email)


# --- the runner against the real (default) mode -------------------------------------------------


async def test_real_mode_finds_each_personal_space_by_cookie_then_remembers_it(mana: Mana, tmp_path: Path) -> None:
    settings = mana.settings(tmp_path)
    report, spaces, auth = await _once(settings)
    personal = await _personal_spaces(mana)
    assert len(report.ticks) == 10
    for persona, tick_id in report.ticks:
        assert OPAQUE_ID.fullmatch(persona.user_id)  # ids are opaque strings, not UUIDs
        assert spaces[tick_id][0] == personal[persona.user_id], persona.email
    # Whatever the gateway saw in X-Mana-Space was the persona's own personal space.
    assert all(c["spaceId"] == personal[c["userId"]] for c in await mana.get("mcp-calls"))
    assert auth.bearer_accepted is False
    assert {via for _, via in spaces.values()} == {"cookie"}
    summaries = {a["personaId"] for a in await mana.get("actions")}
    assert summaries == {p.user_id for p, _ in report.ticks}  # every due persona completed its tick
    first = await mana.get("logins")
    for persona, _ in report.ticks:
        assert _by_route(first, persona.email) == {"login": 1, "signin": 1}

    # The next window: the space comes from the journal; one sign-in per persona, not two.
    await mana.post("clock", {"now": "2026-11-26T09:30:00+00:00"})
    second_report, second_spaces, _ = await _once(settings)
    assert len(second_report.ticks) == 10
    assert {via for _, via in second_spaces.values()} == {"journal"}
    for persona, tick_id in second_report.ticks:
        assert second_spaces[tick_id][0] == personal[persona.user_id]
    new = (await mana.get("logins"))[len(first) :]
    assert Counter(e["route"] for e in new) == {"login": 10}
    assert all(e["outcome"] == "OK" for e in new)


async def test_bearer_is_tried_once_per_process_not_once_per_tick(mana: Mana, tmp_path: Path) -> None:
    bearer_tries = 0

    async with open_runner(mana.settings(tmp_path, persona_concurrency=4)) as runtime:
        auth = runtime.tick_deps.auth

        async def count(request: httpx.Request) -> None:
            nonlocal bearer_tries
            if request.url.path.endswith("/organization/list") and "authorization" in request.headers:
                bearer_tries += 1

        auth._client.event_hooks["request"].append(count)
        report = await run_once(runtime)
    assert len(report.ticks) == 10
    assert bearer_tries == 1  # the refusal is remembered by the process


async def test_a_bearer_capable_mana_needs_no_cookie_sign_in(bearer_mana: Mana, tmp_path: Path) -> None:
    report, spaces, auth = await _once(bearer_mana.settings(tmp_path))
    personal = await _personal_spaces(bearer_mana)
    assert auth.bearer_accepted is True
    assert len(report.ticks) == 10
    assert all(spaces[t] == (personal[p.user_id], "bearer") for p, t in report.ticks)
    logins = await bearer_mana.get("logins")
    assert Counter(e["route"] for e in logins) == {"login": 10}


async def test_a_refused_gateway_forgets_the_space_and_the_next_tick_looks_it_up(mana: Mana, tmp_path: Path) -> None:
    persona = await mana.add_persona("moved")
    settings = mana.settings(tmp_path)
    await _once(settings)
    journal = await Journal.open(settings.runner_state_path)
    try:
        assert await journal.known_space(persona["userId"], max_age_s=86_400) is not None
    finally:
        await journal.close()

    # The gateway refuses the fresh JWT: the remembered space may be wrong, so it is forgotten.
    await mana.post("clock", {"now": "2026-11-26T09:30:00+00:00"})
    await mana.post("faults", {"route": "mcp", "status": 401, "count": 1000})
    await _once(settings)
    journal = await Journal.open(settings.runner_state_path)
    try:
        assert await journal.known_space(persona["userId"], max_age_s=86_400) is None
    finally:
        await journal.close()

    await mana.post("faults", {"route": "mcp", "status": 401, "count": 0})
    await mana.post("clock", {"now": "2026-11-27T09:30:00+00:00"})
    before = len(await mana.get("logins"))
    _, spaces, _ = await _once(settings)
    new = [e for e in (await mana.get("logins"))[before:] if e["email"] == persona["email"]]
    assert Counter(e["route"] for e in new) == {"login": 1, "signin": 1}  # looked up again
    assert (await _personal_spaces(mana))[persona["userId"]] in {s for s, _ in spaces.values()}


async def test_journal_remembers_forgets_and_ages_spaces(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "j.db")
    try:
        await journal.remember_space("p1", "HWItnb7UXVoiKyH9EgP9FTXXR4osEPfe")
        assert await journal.known_space("p1", max_age_s=60) == "HWItnb7UXVoiKyH9EgP9FTXXR4osEPfe"
        await asyncio.sleep(0.3)
        assert await journal.known_space("p1", max_age_s=0.2) is None  # too old: look it up again
        await journal.remember_space("p1", "other")
        assert await journal.known_space("p1", max_age_s=60) == "other"
        await journal.forget_space("p1")
        assert await journal.known_space("p1", max_age_s=60) is None
    finally:
        await journal.close()


# --- pacing ---------------------------------------------------------------------------------


async def test_thirty_personas_at_concurrency_eight_meet_no_429(tmp_path: Path) -> None:
    # Scaled: 3 sign-ins per 1 s (the real limit is 3 per 10 s), enforced by the sandbox like Better Auth.
    async with open_mana(tmp_path, signin_limit=SignInLimit("on", 3, 1.0)) as world:
        for n in range(20):
            await world.add_persona(f"crowd{n:02d}")
        # A tick timeout far shorter than the round: waiting for a login slot must not count toward it.
        settings = world.settings(
            tmp_path, persona_concurrency=8, mana_login_rate="3/1s", persona_tick_timeout_s=4, mana_retry_attempts=1
        )
        started = time.monotonic()
        report, spaces, _ = await _once(settings)
        elapsed = time.monotonic() - started
        assert len(report.ticks) == 30
        actions = await world.get("actions")
        failed = [a for a in actions if a["result"] == "error" and a["toolName"] == TICK_ROW]
        assert not failed, failed[:3]
        assert {a["personaId"] for a in actions} == {p.user_id for p, _ in report.ticks}
        personal = await _personal_spaces(world)
        assert all(spaces[t][0] == personal[p.user_id] for p, t in report.ticks)

        logins = await world.get("logins")
        assert len(logins) == 60  # two sign-ins per persona (login + cookie), on both routes
        assert all(e["outcome"] == "OK" for e in logins), Counter(e["outcome"] for e in logins)
        times = sorted(e["realAt"] for e in logins)
        assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 3
        assert elapsed > 2 * settings.persona_tick_timeout_s  # the waits were long; no tick timed out
        journal = await Journal.open(settings.runner_state_path)
        try:
            states = [await journal.tick_state(t) for _, t in report.ticks]
        finally:
            await journal.close()
        assert all(st is not None and st["outcome"] == "ok" for st in states)
        lived = max(st["updated_at"] - st["created_at"] for st in states if st is not None)
        assert lived > settings.persona_tick_timeout_s  # queued for sign-ins longer than its timeout, yet ok


async def test_the_limiter_keeps_better_auths_count_under_random_load() -> None:
    window = 0.3
    limiter = LoginLimiter(3, window)
    served: list[tuple[float, float]] = []

    async def sign_in() -> None:
        await asyncio.sleep(random.uniform(0, 1.0))
        async with limiter.slot():
            began = time.monotonic()
            await asyncio.sleep(random.uniform(0.0, 0.05))
        served.append((began, time.monotonic()))

    await asyncio.gather(*(sign_in() for _ in range(24)))
    assert len(served) == 24
    starts = sorted(s for s, _ in served)
    # The sliding-log guarantee: no window of W seconds holds more than N sign-ins ...
    assert max(sum(1 for t in starts if s <= t < s + window) for s in starts) <= 3
    # ... and Better Auth's own rule, replayed: never `count >= max` with the last answer < W ago.
    count, last = 0, float("-inf")
    for began, ended in sorted(served):
        assert not (count >= 3 and began - last < window), "Better Auth would have refused this sign-in"
        count = 1 if began - last > window else count + 1
        last = max(last, ended)


async def test_a_429_without_retry_after_waits_out_the_window_and_no_tick_fails(mana: Mana, tmp_path: Path) -> None:
    # Another client on our IP used the budget: Mana answers RATE_LIMITED without Retry-After.
    await mana.post("faults", {"route": "login", "status": 429, "count": 1, "code": "RATE_LIMITED"})
    # 20 per 1 s: only the 429 makes the limiter wait (a full window); 3 per 1 s paced all 20 sign-ins into 7 s.
    settings = mana.settings(tmp_path, mana_login_rate="20/1s", persona_concurrency=1, mana_retry_attempts=2)
    started = time.monotonic()
    report, _, _ = await _once(settings)
    assert len(report.ticks) == 10
    actions = await mana.get("actions")
    assert not [a for a in actions if a["toolName"] == TICK_ROW and a["result"] == "error"]
    logins = await mana.get("logins")
    refused = next(i for i, e in enumerate(logins) if e["outcome"] == "FAULT_429")
    # The retry came a full window later, not after a short fixed backoff.
    assert logins[refused + 1]["realAt"] - logins[refused]["realAt"] >= 1.0
    assert time.monotonic() - started >= 1.0


async def test_locked_and_wrong_password_are_never_retried(mana: Mana, tmp_path: Path) -> None:
    await mana.post(
        "faults", {"route": "login", "status": 429, "count": 1, "code": "ACCOUNT_LOCKED", "retryAfter": 1800}
    )
    wrong = await mana.add_persona("wrongseed", wrongSeed=True)
    await _once(mana.settings(tmp_path, persona_concurrency=1, mana_retry_attempts=5))
    logins = await mana.get("logins")
    emails = {p["userId"]: p["email"] for p in await mana.get("personas")}
    rows = {a["personaId"]: a for a in await mana.get("actions") if a["toolName"] == TICK_ROW}
    locked = [pid for pid, a in rows.items() if "ACCOUNT_LOCKED" in (a["errorMessage"] or "")]
    assert len(locked) == 1 and rows[locked[0]]["result"] == "error"
    assert [e["outcome"] for e in logins if e["email"] == emails[locked[0]]] == ["FAULT_429"]
    assert [e["outcome"] for e in logins if e["email"] == wrong["email"]] == ["INVALID_CREDENTIALS"]
    assert "Invalid email or password" in rows[wrong["userId"]]["errorMessage"]


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "rate"), [("3/10s", (3, 10.0)), (" 5 / 1.5 ", (5, 1.5)), ("2/500ms", (2, 0.5))])
def test_login_rate_parses(text: str, rate: tuple[int, float]) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["3 per 10s", "0/10s", "3/0s", "3/10h", ""])
def test_a_bad_login_rate_is_one_line_naming_the_variable(bad: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(mana_login_rate=bad)
    assert str(caught.value).startswith("MANA_LOGIN_RATE: ") and "\n" not in str(caught.value)


def test_a_bad_login_rate_exits_two_from_the_command_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "LLM_"))}
    env["MANA_LOGIN_RATE"] = "lots"
    done = subprocess.run(
        [sys.executable, "-m", "runner", "once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: MANA_LOGIN_RATE: expected N/W with W in s, ms or m, e.g. 3/10s"


# --- the sandbox as the real service -----------------------------------------------------------


async def _post(http: httpx.AsyncClient, url: str, email: str, password: str, **headers: str) -> httpx.Response:
    return await http.post(url, json={"email": email, "password": password}, headers=headers)


async def test_sandbox_sign_in_sets_a_signed_cookie_and_limits_both_routes(tmp_path: Path) -> None:
    async with open_mana(tmp_path, signin_limit=SignInLimit("auto", 3, 1.0)) as world, httpx.AsyncClient() as http:
        base = world.sandbox.auth_url
        email = "persona.lena@mana.test"
        password = derive_password(SEED_SECRET, email)
        signin, login = f"{base}/api/auth/sign-in/email", f"{base}/api/v1/auth/login"

        ok = await _post(http, signin, email, password)
        http.cookies.clear()
        assert ok.status_code == 200 and list(ok.json()) == ["redirect", "token", "user"]
        name_value, *attributes = ok.headers["set-cookie"].split("; ")
        assert attributes == ["Max-Age=604800", "Path=/", "HttpOnly", "SameSite=Lax"]
        name, value = name_value.split("=", 1)
        token, signature = unquote(value).rsplit(".", 1)
        assert name == "mana.session_token" and token == ok.json()["token"] and OPAQUE_ID.fullmatch(token)
        assert len(base64.b64decode(signature, validate=True)) == 32 and len(signature) == 44  # HMAC-SHA256
        assert redact(f"cookie {value} and {unquote(value)}") == "cookie [redacted] and [redacted]"

        spaces = f"{base}/api/auth/organization/list"
        assert (await http.get(spaces, headers={"Cookie": name_value})).status_code == 200
        forged = f"{name}={token}.{base64.b64encode(bytes(32)).decode()}"
        assert (await http.get(spaces, headers={"Cookie": forged})).json() == {
            "message": "Unauthorized",
            "code": "UNAUTHORIZED",
        }

        wrong = await _post(http, signin, email, "nope")
        assert wrong.status_code == 401
        assert wrong.json() == {"message": "Invalid email or password", "code": "INVALID_EMAIL_OR_PASSWORD"}

        # Behind a proxy: 3 sign-ins per window and IP over both routes, successful ones included.
        proxy = {"X-Forwarded-For": "203.0.113.7"}
        for url in (signin, login, login):
            assert (await _post(http, url, email, password, **proxy)).status_code == 200
        http.cookies.clear()
        limited = await _post(http, login, email, password, **proxy)
        assert limited.status_code == 429
        assert limited.json() == {
            "error": "RATE_LIMITED",
            "message": "Too many requests. Please try again later.",
            "status": 429,
        }
        assert "retry-after" not in limited.headers
        direct = await _post(http, signin, email, password, **proxy)
        assert direct.status_code == 429 and direct.json() == {"message": "Too many requests. Please try again later."}
        assert (await _post(http, login, email, password, **{"X-Forwarded-For": "198.51.100.1"})).status_code == 200
        assert (await _post(http, login, email, password)).status_code == 200  # no proxy header: no limit (auto)
        await asyncio.sleep(1.05)
        assert (await _post(http, login, email, password, **proxy)).status_code == 200


async def test_sandbox_lockout_counts_only_mana_logins_and_a_success_clears_it(mana: Mana) -> None:
    email = "persona.tim@mana.test"
    password = derive_password(SEED_SECRET, email)
    base = mana.sandbox.auth_url
    login, signin = f"{base}/api/v1/auth/login", f"{base}/api/auth/sign-in/email"
    async with httpx.AsyncClient() as http:
        for _ in range(4):
            assert (await _post(http, login, email, "wrong")).status_code == 401
        for _ in range(3):  # Better Auth's own sign-in does not feed Mana's lockout
            assert (await _post(http, signin, email, "wrong")).status_code == 401
        assert (await _post(http, login, email, password)).status_code == 200  # clears the counter
        for _ in range(4):
            assert (await _post(http, login, email, "wrong")).status_code == 401
        assert (await _post(http, login, email, password)).status_code == 200
        for _ in range(5):
            await _post(http, login, email, "wrong")
        locked = await _post(http, login, email, password)
        assert locked.status_code == 429 and locked.headers["Retry-After"] == "1800"
        assert locked.json() == {
            "error": "ACCOUNT_LOCKED",
            "message": "Account temporarily locked",
            "status": 429,
            "retryAfterSec": 1800,
        }


async def test_sandbox_jwt_claims_and_jwks(mana: Mana) -> None:
    import jwt

    email = "persona.lena@mana.test"
    async with httpx.AsyncClient() as http:
        body = (
            await _post(http, f"{mana.sandbox.auth_url}/api/v1/auth/login", email, derive_password(SEED_SECRET, email))
        ).json()
        keys = (await http.get(f"{mana.sandbox.auth_url}/api/auth/jwks")).json()["keys"]
    token = body["accessToken"]
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys if k["kid"] == kid)
    claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["EdDSA"], audience="mana", issuer=mana.sandbox.auth_url)
    assert claims["sub"] == body["user"]["id"] and claims["tier"] == "founder" and claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == 900 and claims["sid"] and claims["sid"] != body["token"]


def test_sandbox_command_line_switches(tmp_path: Path) -> None:
    flags = ("--spaces-accept-bearer", "--signin-rate-limit", "on", "--signin-rate", "2/1s")
    sandbox = start_sandbox(tmp_path, seed_secret=SEED_SECRET, service_key=SERVICE_KEY, extra=flags)
    try:
        email = "persona.lena@mana.test"
        body = {"email": email, "password": derive_password(SEED_SECRET, email)}
        answers = [httpx.post(f"{sandbox.auth_url}/api/v1/auth/login", json=body, timeout=10) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]  # limited without X-Forwarded-For: "on"
        bearer = {"Authorization": f"Bearer {answers[0].json()['accessToken']}"}
        spaces = httpx.get(f"{sandbox.auth_url}/api/auth/organization/list", headers=bearer, timeout=10)
        assert spaces.status_code == 200 and "personal" in [s["metadata"]["type"] for s in spaces.json()]
    finally:
        sandbox.stop()
    bad = subprocess.run(
        [sys.executable, "-m", "runner.sandbox", "--db", str(tmp_path / "x.db"), "--signin-rate", "many"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--signin-rate: expected N/W" in bad.stderr
