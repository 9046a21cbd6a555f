"""The Mana stand-in, proven over real loopback HTTP and the real MCP client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from runner.persona import DEV_SEED_SECRET, derive_password
from runner.sandbox import Sandbox, SandboxConfig

REPO = Path(__file__).parents[1]
KEY = "sandbox-service-key"
BASE = "/api/v1/personas/internal"
MONDAY = "2026-11-02T10:00:00.000Z"
SATURDAY = "2026-11-07T12:00:00.000Z"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
async def sb(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(db_path=str(tmp_path / "sandbox.db"))) as sandbox:
        yield sandbox


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def personas(http: httpx.AsyncClient, sb: Sandbox) -> dict[str, dict[str, Any]]:
    rows = (await http.get(f"{sb.api_url}/__sandbox/personas")).json()
    return {row["email"].split(".", 1)[1].split("@")[0]: row for row in rows}


def personal_space(persona: dict[str, Any]) -> str:
    return next(s["id"] for s in persona["spaces"] if s["type"] == "personal")


async def login(http: httpx.AsyncClient, sb: Sandbox, email: str, password: str | None = None) -> httpx.Response:
    password = derive_password(DEV_SEED_SECRET, email) if password is None else password
    return await http.post(f"{sb.auth_url}/api/v1/auth/login", json={"email": email, "password": password})


async def jwt_for(http: httpx.AsyncClient, sb: Sandbox, email: str) -> str:
    response = await login(http, sb, email)
    assert response.status_code == 200, response.text
    return str(response.json()["accessToken"])


@asynccontextmanager
async def mcp_session(sb: Sandbox, token: str, space: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}", "X-Mana-Space": space}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=10) as hc,
        Client(streamable_http_client(f"{sb.mcp_url}/mcp", http_client=hc), mode="legacy") as client,
    ):
        yield client


async def set_clock(http: httpx.AsyncClient, sb: Sandbox, now: str | None) -> None:
    assert (await http.post(f"{sb.api_url}/__sandbox/clock", json={"now": now})).status_code == 200


async def post_rows(http: httpx.AsyncClient, sb: Sandbox, pid: str, kind: str, rows: Any) -> httpx.Response:
    return await http.post(f"{sb.api_url}{BASE}/{pid}/{kind}", json={kind: rows}, headers={"X-Service-Key": KEY})


async def due_names(http: httpx.AsyncClient, sb: Sandbox) -> list[str]:
    response = await http.get(f"{sb.api_url}{BASE}/due", headers={"X-Service-Key": KEY})
    assert response.status_code == 200
    return [p["email"].split(".", 1)[1].split("@")[0] for p in response.json()["personas"]]


# --- mana-auth ------------------------------------------------------------------------------


async def test_login_ok_wrong_password_and_lockout(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    lena = cast["lena"]
    ok = await login(http, sb, lena["email"])
    assert ok.status_code == 200
    body = ok.json()
    assert list(body) == ["redirect", "token", "user", "accessToken", "refreshToken"]  # contract §3
    assert set(body["user"]) == {
        "id",
        "email",
        "name",
        "emailVerified",
        "image",
        "createdAt",
        "updatedAt",
        "twoFactorEnabled",
        "accessTier",
        "kind",
    }
    assert body["user"]["id"] == lena["userId"] and body["user"]["email"] == "persona.lena@mana.test"
    assert body["redirect"] is False and body["token"] == body["refreshToken"]
    assert "set-cookie" not in ok.headers  # Mana's login sets no cookie
    header = jwt.get_unverified_header(body["accessToken"])
    assert header["alg"] == "EdDSA" and header["kid"]
    claims = jwt.decode(body["accessToken"], options={"verify_signature": False})
    assert list(claims) == ["iat", "sub", "email", "role", "sid", "tier", "exp", "iss", "aud"]
    assert claims["aud"] == "mana" and claims["sub"] == lena["userId"] and claims["exp"] - claims["iat"] == 900
    assert claims["iss"] == sb.auth_url and claims["email"] == lena["email"] and claims["sid"]

    for _ in range(5):
        wrong = await login(http, sb, lena["email"], "not-the-password")
        assert wrong.status_code == 401
        assert wrong.json() == {"error": "INVALID_CREDENTIALS", "message": "Invalid email or password", "status": 401}
    locked = await login(http, sb, lena["email"])  # even the right password now
    assert locked.status_code == 429
    assert locked.json()["error"] == "ACCOUNT_LOCKED"
    assert locked.json()["message"] == "Account temporarily locked"
    assert 1790 <= locked.json()["retryAfterSec"] <= 1800
    assert locked.headers["Retry-After"] == str(locked.json()["retryAfterSec"])

    bad = await http.post(f"{sb.auth_url}/api/v1/auth/login", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"] == "VALIDATION"
    outcomes = [(row["email"], row["outcome"]) for row in (await http.get(f"{sb.api_url}/__sandbox/logins")).json()]
    assert outcomes[:7] == [(lena["email"], "OK")] + [(lena["email"], "INVALID_CREDENTIALS")] * 5 + [
        (lena["email"], "ACCOUNT_LOCKED")
    ]


async def test_login_options_and_refresh(sb: Sandbox, http: httpx.AsyncClient) -> None:
    async def create(name: str, options: dict[str, bool]) -> str:
        spec = {"name": name, "archetype": "t", "systemPrompt": "", "moduleMix": {"todo": 1}, "tickCadence": "daily"}
        response = await http.post(f"{sb.api_url}/__sandbox/personas", json={**spec, "options": options})
        assert response.status_code == 200
        return str(response.json()["email"])

    wrong_seed = await create("wrongseed", {"wrongSeed": True})
    assert wrong_seed == "persona.wrongseed@mana.test"
    assert (await login(http, sb, wrong_seed)).json()["error"] == "INVALID_CREDENTIALS"

    no_jwt = await login(http, sb, await create("nojwt", {"noAccessToken": True}))
    assert no_jwt.status_code == 200 and "accessToken" not in no_jwt.json()

    # Refresh takes only Better Auth's signed cookie: the login body's refreshToken is refused.
    tim = "persona.tim@mana.test"
    session = (await login(http, sb, tim)).json()["refreshToken"]
    refused = await http.post(f"{sb.auth_url}/api/v1/auth/refresh", json={"refreshToken": session})
    assert refused.status_code == 401 and refused.json()["message"] == "Session expired"
    signed = await http.post(
        f"{sb.auth_url}/api/auth/sign-in/email", json={"email": tim, "password": derive_password(DEV_SEED_SECRET, tim)}
    )
    cookie = signed.headers["set-cookie"].split(";", 1)[0]
    http.cookies.clear()
    refreshed = await http.post(f"{sb.auth_url}/api/v1/auth/refresh", headers={"Cookie": cookie})
    assert refreshed.status_code == 200 and refreshed.json()["accessToken"].count(".") == 2
    assert (await http.post(f"{sb.api_url}/__sandbox/sessions/revoke")).json()["revoked"] >= 1
    gone = await http.post(f"{sb.auth_url}/api/v1/auth/refresh", headers={"Cookie": cookie})
    assert gone.status_code == 401 and gone.json()["error"] == "TOKEN_EXPIRED"


async def cookie_for(http: httpx.AsyncClient, sb: Sandbox, email: str) -> str:
    password = derive_password(DEV_SEED_SECRET, email)
    response = await http.post(f"{sb.auth_url}/api/auth/sign-in/email", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    http.cookies.clear()  # the client's jar would send it on every later request: pass it explicitly
    return response.headers["set-cookie"].split(";", 1)[0]


async def test_organization_list(sb: Sandbox, http: httpx.AsyncClient) -> None:
    url = f"{sb.auth_url}/api/auth/organization/list"
    lena = await login(http, sb, "persona.lena@mana.test")
    spaces = (await http.get(url, headers={"Cookie": await cookie_for(http, sb, "persona.lena@mana.test")})).json()
    # A shared space comes first: a client that takes spaces[0] writes into the wrong one.
    assert [s["metadata"]["type"] for s in spaces] == ["team", "personal"]
    assert set(spaces[0]) == {"id", "name", "slug", "logo", "createdAt", "metadata"}
    assert spaces[1]["metadata"] == {"tier": "public", "type": "personal"}

    markus = await cookie_for(http, sb, "persona.markus@mana.test")
    as_string = (await http.get(url, headers={"Cookie": markus})).json()
    assert all(isinstance(s["metadata"], str) for s in as_string)
    assert "personal" in [json.loads(s["metadata"])["type"] for s in as_string]

    spec = {"name": "homeless", "archetype": "t", "systemPrompt": "", "moduleMix": {}, "tickCadence": "daily"}
    await http.post(f"{sb.api_url}/__sandbox/personas", json={**spec, "options": {"noPersonalSpace": True}})
    homeless = await cookie_for(http, sb, "persona.homeless@mana.test")
    only_team = (await http.get(url, headers={"Cookie": homeless})).json()
    assert [s["metadata"]["type"] for s in only_team] == ["team"]

    unauthorized = {"message": "Unauthorized", "code": "UNAUTHORIZED"}  # Better Auth's shape, not Mana's envelope
    assert (await http.get(url)).json() == unauthorized
    for token in (lena.json()["accessToken"], lena.json()["token"]):  # the JWT and the bare session token
        refused = await http.get(url, headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 401 and refused.json() == unauthorized


# --- apps/api personas internal API ---------------------------------------------------------


async def test_due_filtering_and_ordering(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    assert (await http.get(f"{sb.api_url}{BASE}/due")).json() == {"error": "Unauthorized"}
    await set_clock(http, sb, MONDAY)
    response = await http.get(f"{sb.api_url}{BASE}/due", headers={"X-Service-Key": KEY})
    assert response.json()["serverTime"] == MONDAY
    first = response.json()["personas"][0]
    assert set(first) == {"userId", "email", "archetype", "systemPrompt", "moduleMix", "tickCadence", "lastActiveAt"}
    assert len(response.json()["personas"]) == 10  # all never active

    row = {"tickId": "t1", "toolName": "todo.list", "result": "ok"}
    for name in ("lena", "jonas"):  # daily, hourly
        assert (await post_rows(http, sb, cast[name]["userId"], "actions", [row])).status_code == 200
    await set_clock(http, sb, "2026-11-02T10:30:00Z")
    names = await due_names(http, sb)
    assert "lena" not in names and "jonas" not in names and len(names) == 8

    await set_clock(http, sb, "2026-11-02T11:00:00Z")
    names = await due_names(http, sb)
    assert names[-1] == "jonas" and "lena" not in names  # never-active first, then the oldest

    await set_clock(http, sb, "2026-11-03T09:00:00Z")
    assert (await post_rows(http, sb, cast["tim"]["userId"], "actions", [row])).status_code == 200
    await set_clock(http, sb, "2026-11-04T12:00:00Z")
    names = await due_names(http, sb)
    assert names[-3:] == ["lena", "jonas", "tim"]  # oldest lastActiveAt first; ties keep catalog order

    await set_clock(http, sb, SATURDAY)
    names = await due_names(http, sb)
    assert {"katrin", "markus", "noah"}.isdisjoint(names) and "lena" in names  # weekdays rest on Saturday

    spec = {"name": "always", "archetype": "t", "systemPrompt": "", "moduleMix": {}, "tickCadence": "daily"}
    created = await http.post(f"{sb.api_url}/__sandbox/personas", json={**spec, "options": {"alwaysDue": True}})
    always_id = created.json()["userId"]
    await post_rows(http, sb, always_id, "actions", [row])
    assert "always" in await due_names(http, sb)
    assert (await http.delete(f"{sb.api_url}/__sandbox/personas/{always_id}")).status_code == 200
    assert "always" not in await due_names(http, sb)


async def test_actions_on_conflict_and_id_rule(sb: Sandbox, http: httpx.AsyncClient) -> None:
    pid = (await personas(http, sb))["heinz"]["userId"]
    await set_clock(http, sb, MONDAY)
    rows = [
        {
            "tickId": "tick-a",
            "toolName": "todo.create",
            "result": "ok",
            "inputHash": "0123456789abcdef",
            "latencyMs": 12,
        },
        {"tickId": "tick-a", "toolName": "notes.export", "result": "error", "errorMessage": "boom"},
        {"tickId": "tick-a", "toolName": "todo.list", "result": "ok", "latencyMs": 7.0},
    ]
    for _ in range(2):  # resending the same batch is harmless
        answer = await post_rows(http, sb, pid, "actions", rows)
        assert answer.status_code == 200 and answer.json() == {"ok": True, "written": 3}
    stored = (await http.get(f"{sb.api_url}/__sandbox/actions", params={"personaId": pid})).json()
    assert [r["id"] for r in stored] == ["tick-a-0-todo.create", "tick-a-1-notes.export", "tick-a-2-todo.list"]
    assert stored[0]["inputHash"] == "0123456789abcdef" and stored[1]["errorMessage"] == "boom"

    # Re-splitting changes indexes: the second half lands again under new ids.
    assert (await post_rows(http, sb, pid, "actions", rows[1:])).json()["written"] == 2
    stored = (await http.get(f"{sb.api_url}/__sandbox/actions", params={"personaId": pid})).json()
    assert len(stored) == 5 and "tick-a-0-notes.export" in [r["id"] for r in stored]

    long_tick = "x" * 300
    await post_rows(http, sb, pid, "actions", [{"tickId": long_tick, "toolName": "todo.list", "result": "ok"}])
    ids = [r["id"] for r in (await http.get(f"{sb.api_url}/__sandbox/actions")).json()]
    assert "x" * 255 in ids

    heinz = (await personas(http, sb))["heinz"]
    assert heinz["lastActiveAt"] == MONDAY
    await set_clock(http, sb, "2026-11-02T12:00:00Z")
    feedback = [
        {"tickId": "tick-a", "module": "todo", "rating": 4, "notes": "gut"},
        {"tickId": "tick-a", "module": "notes", "rating": 2.5},
    ]
    for _ in range(2):
        assert (await post_rows(http, sb, pid, "feedback", feedback)).json() == {"ok": True, "written": 2}
    stored_fb = (await http.get(f"{sb.api_url}/__sandbox/feedback")).json()
    assert [r["id"] for r in stored_fb] == ["tick-a-todo", "tick-a-notes"]
    assert (await personas(http, sb))["heinz"]["lastActiveAt"] == MONDAY  # feedback leaves it alone


async def test_batch_validation(sb: Sandbox, http: httpx.AsyncClient) -> None:
    pid = (await personas(http, sb))["noah"]["userId"]
    ok = {"tickId": "t", "toolName": "todo.list", "result": "ok"}
    url = f"{sb.api_url}{BASE}/{pid}/actions"
    headers = {"X-Service-Key": KEY}
    assert (await http.post(url, content=b"{oops", headers=headers)).status_code == 400
    assert (await post_rows(http, sb, pid, "actions", [])).status_code == 400
    assert (await post_rows(http, sb, pid, "actions", [ok] * 501)).status_code == 400
    assert (await post_rows(http, sb, pid, "actions", [ok] * 500)).status_code == 200
    bad_rows = [
        {**ok, "result": "maybe"},
        {**ok, "latencyMs": 1.5},
        {**ok, "inputHash": None},
        {"toolName": "todo.list", "result": "ok"},
        {**ok, "tickId": 5},
    ]
    for bad in bad_rows:
        response = await post_rows(http, sb, pid, "actions", [{**ok, "tickId": "whole-batch"}, bad])
        assert response.status_code == 400, bad
    assert not any(r["tickId"] == "whole-batch" for r in (await http.get(f"{sb.api_url}/__sandbox/actions")).json())
    assert (await http.post(url, json={"actions": [ok]})).status_code == 401

    missing = await post_rows(http, sb, "no-such-persona", "actions", [ok])
    assert missing.status_code == 404 and missing.json() == {"error": "Persona not found"}
    rating = {"tickId": "t", "module": "todo", "rating": 3}
    assert (await post_rows(http, sb, "no-such-persona", "feedback", [rating])).status_code == 404
    assert (await post_rows(http, sb, pid, "feedback", [{**rating, "rating": 6}])).status_code == 400
    assert (await post_rows(http, sb, pid, "feedback", [{**rating, "rating": "5"}])).status_code == 400
    assert (await post_rows(http, sb, pid, "feedback", [{**rating, "rating": True}])).status_code == 400
    too_many = [{"tickId": "t", "module": f"m{i}", "rating": 3} for i in range(101)]
    assert (await post_rows(http, sb, pid, "feedback", too_many)).status_code == 400


async def test_faults(sb: Sandbox, http: httpx.AsyncClient) -> None:
    arm = await http.post(
        f"{sb.api_url}/__sandbox/faults", json={"route": "due", "status": 503, "count": 2, "retryAfter": 7}
    )
    assert arm.status_code == 200
    for _ in range(2):
        response = await http.get(f"{sb.api_url}{BASE}/due", headers={"X-Service-Key": KEY})
        assert response.status_code == 503 and response.headers["Retry-After"] == "7"
        assert response.json() == {
            "error": "SERVICE_UNAVAILABLE",
            "message": "sandbox fault injected on due",
            "status": 503,
            "retryAfterSec": 7,
        }
    assert (await http.get(f"{sb.api_url}{BASE}/due", headers={"X-Service-Key": KEY})).status_code == 200

    await http.post(
        f"{sb.api_url}/__sandbox/faults", json={"route": "login", "status": 429, "count": 1, "retryAfter": 1}
    )
    limited = await login(http, sb, "persona.aylin@mana.test")
    assert limited.status_code == 429 and limited.json()["error"] == "RATE_LIMITED"
    assert (await login(http, sb, "persona.aylin@mana.test")).status_code == 200  # a fault is no failed attempt

    await http.post(f"{sb.api_url}/__sandbox/faults", json={"route": "mcp", "status": 502, "count": 1})
    assert (await http.post(f"{sb.mcp_url}/mcp", json=INITIALIZE, headers=MCP_HEADERS)).status_code == 502
    assert (await http.post(f"{sb.api_url}/__sandbox/faults", json={"route": "nope", "status": 500})).status_code == 400


# --- mana-mcp -------------------------------------------------------------------------------


async def test_mcp_gateway_refusals(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    url = f"{sb.mcp_url}/mcp"
    sandra_space = personal_space(cast["sandra"])

    async def initialize(token: str | None, space: str, session: str | None = None) -> httpx.Response:
        headers = {**MCP_HEADERS, "X-Mana-Space": space}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if session is not None:
            headers["Mcp-Session-Id"] = session
        return await http.post(url, json=INITIALIZE, headers=headers)

    assert (await initialize(None, sandra_space)).status_code == 401
    assert (await initialize("garbage", sandra_space)).status_code == 401
    session_token = (await login(http, sb, "persona.sandra@mana.test")).json()["token"]
    assert (await initialize(session_token, sandra_space)).status_code == 401
    foreign_key = Ed25519PrivateKey.generate()
    forged = jwt.encode(
        {"sub": cast["sandra"]["userId"], "aud": "mana", "exp": 4102444800}, foreign_key, algorithm="EdDSA"
    )
    assert (await initialize(forged, sandra_space)).status_code == 401

    sandra = await jwt_for(http, sb, "persona.sandra@mana.test")
    noah = await jwt_for(http, sb, "persona.noah@mana.test")
    assert (await initialize(sandra, personal_space(cast["noah"]))).status_code == 403  # someone else's space
    assert (await initialize(sandra, "")).status_code == 403

    opened = await initialize(sandra, sandra_space)
    assert opened.status_code == 200
    session_id = opened.headers["mcp-session-id"]
    hijack = await initialize(noah, personal_space(cast["noah"]), session=session_id)
    assert hijack.status_code == 403


async def test_mcp_tools_annotations_and_recording(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    gisela = cast["gisela"]
    space = personal_space(gisela)
    token = await jwt_for(http, sb, gisela["email"])
    async with mcp_session(sb, token, space) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"todo.create", "todo.list", "notes.search", "mood.recent", "spaces.list", "journal.archive"} <= set(
            tools
        )
        assert all("." in name for name in tools)
        assert tools["todo.list"].annotations.read_only_hint is True
        create = tools["todo.create"].annotations
        assert create.read_only_hint is False and create.destructive_hint is False
        assert tools["todo.delete"].annotations.destructive_hint is True
        assert tools["todo.bulkImport"].annotations is None
        assert tools["todo.list"].input_schema["properties"]["status"]["enum"] == ["open", "done", "all"]
        assert tools["mood.log"].input_schema["properties"]["score"]["maximum"] == 10
        assert tools["habits.create"].input_schema["required"] == ["name", "cadence"]

        made = await client.call_tool("todo.create", {"title": "Tabletten abholen", "priority": 1})
        assert not made.is_error
        todo_id = json.loads(made.content[0].text)["id"]
        listed = json.loads((await client.call_tool("todo.list", {})).content[0].text)
        assert [t["id"] for t in listed["todos"]] == [todo_id]
        await client.call_tool("notes.create", {"title": "Rezept", "body": "Apfelkuchen mit Zimt"})
        found = json.loads((await client.call_tool("notes.search", {"query": "zimt"})).content[0].text)
        assert [n["title"] for n in found["notes"]] == ["Rezept"]

        export = await client.call_tool("notes.export", {})
        assert export.is_error and export.content[0].text == "Tool notes.export failed: export backend unavailable"
        invalid = await client.call_tool("todo.create", {})
        assert invalid.is_error and invalid.content[0].text == "Invalid input for todo.create: title: Required"
        missing = await client.call_tool("todo.complete", {"id": "todo_nope"})
        assert missing.is_error and "not found" in missing.content[0].text
        archive = await client.call_tool("journal.archive", {})
        assert not archive.is_error and len(archive.content[0].text) >= 300_000

    calls = (await http.get(f"{sb.api_url}/__sandbox/mcp-calls")).json()
    assert [(c["tool"], c["isError"]) for c in calls] == [
        ("todo.create", False),
        ("todo.list", False),
        ("notes.create", False),
        ("notes.search", False),
        ("notes.export", True),
        ("todo.create", True),
        ("todo.complete", True),
        ("journal.archive", False),
    ]
    assert {(c["userId"], c["spaceId"]) for c in calls} == {(gisela["userId"], space)}
    assert calls[0]["arguments"] == {"title": "Tabletten abholen", "priority": 1}


async def test_mcp_rate_limit_and_space_isolation(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    lena = cast["lena"]
    token = await jwt_for(http, sb, lena["email"])
    team = next(s["id"] for s in lena["spaces"] if s["type"] == "team")
    async with mcp_session(sb, token, team) as client:
        await client.call_tool("todo.create", {"title": "Teamsache"})
    async with mcp_session(sb, token, personal_space(lena)) as client:
        assert json.loads((await client.call_tool("todo.list", {"status": "all"})).content[0].text)["todos"] == []
        results = [await client.call_tool("mood.today", {}) for _ in range(31)]
        assert not any(r.is_error for r in results[:30])
        assert results[30].is_error and results[30].content[0].text == "Rate limit exceeded for mood.today"


# --- lifecycle ------------------------------------------------------------------------------


async def test_seed_is_idempotent(tmp_path: Path) -> None:
    db = str(tmp_path / "again.db")
    for _ in range(2):
        async with Sandbox(SandboxConfig(db_path=db)) as sandbox, httpx.AsyncClient() as client:
            rows = (await client.get(f"{sandbox.api_url}/__sandbox/personas")).json()
            assert len(rows) == 10 and len({r["archetype"] for r in rows}) == 7


async def test_cli_prints_urls_and_stops_on_sigterm(tmp_path: Path) -> None:
    args = ["--db", str(tmp_path / "cli.db"), "--auth-port", "0", "--api-port", "0", "--mcp-port", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.sandbox", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        urls = json.loads(line)
        assert set(urls) == {"auth_url", "api_url", "mcp_url"}
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{urls['api_url']}{BASE}/due", headers={"X-Service-Key": KEY})
            assert response.status_code == 200 and response.json()["personas"]  # weekdays ones rest at weekends
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
