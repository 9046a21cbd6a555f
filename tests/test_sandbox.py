"""The Mana stand-in, proven over real loopback HTTP and the real MCP client."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jsonschema import Draft7Validator
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from runner.agent.arguments import IdPool, generate
from runner.persona import DEV_SEED_SECRET, derive_password
from runner.sandbox import Sandbox, SandboxConfig
from runner.sandbox.zod_issues import FORMATS

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


async def jwt_for(http: httpx.AsyncClient, sb: Sandbox, email: str, *, vault: bool = True) -> str:
    """A persona's JWT; with `vault`, after creating its encryption vault, as the web app (and the runner) do
    at a first login: without one every tool with encrypted fields fails (contract §9)."""
    response = await login(http, sb, email)
    assert response.status_code == 200, response.text
    token = str(response.json()["accessToken"])
    if vault:
        init = await http.post(
            f"{sb.auth_url}/api/v1/me/encryption-vault/init", headers={"Authorization": f"Bearer {token}"}
        )
        assert init.status_code == 200, init.text
    return token


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

TOOLS_FILE = json.loads((REPO / "runner" / "sandbox" / "mana-tools.json").read_text(encoding="utf-8"))
SYNC_EXPIRED = "401 Unauthorized — unauthorized: parse token: token has invalid claims: token is expired\n"


def result_json(result: Any) -> Any:
    """A success is one text block of JSON.stringify(result, null, 2): exactly that, nothing else."""
    assert not result.is_error, result.content[0].text
    assert len(result.content) == 1
    text = result.content[0].text
    value = json.loads(text)
    assert text == json.dumps(value, indent=2, ensure_ascii=False)
    return value


def error_text(result: Any) -> str:
    assert result.is_error and len(result.content) == 1
    return str(result.content[0].text)


def zod_issues(text: str, tool: str) -> list[dict[str, Any]]:
    head = f"MCP error -32602: Input validation error: Invalid arguments for tool {tool}: ["
    assert text.startswith(head + "\n"), text
    issues: list[dict[str, Any]] = json.loads(text[len(head) - 1 :])
    assert text[len(head) - 1 :] == json.dumps(issues, indent=2, ensure_ascii=False)  # JSON.stringify(_, null, 2)
    return issues


async def test_mcp_gateway_refusals(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    url = f"{sb.mcp_url}/mcp"
    sandra_space = personal_space(cast["sandra"])

    async def initialize(token: str | None, space: str | None, session: str | None = None) -> httpx.Response:
        headers = dict(MCP_HEADERS)
        if space is not None:
            headers["X-Mana-Space"] = space
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if session is not None:
            headers["Mcp-Session-Id"] = session
        return await http.post(url, json=INITIALIZE, headers=headers)

    missing = await initialize(None, sandra_space)
    assert missing.status_code == 401 and missing.json() == {"error": "Missing or malformed Authorization header"}
    assert (await initialize("garbage", sandra_space)).json() == {"error": "Invalid token: Invalid Compact JWS"}
    session_token = (await login(http, sb, "persona.sandra@mana.test")).json()["token"]
    assert (await initialize(session_token, sandra_space)).status_code == 401
    foreign_key = Ed25519PrivateKey.generate()
    forged = jwt.encode(
        {"sub": cast["sandra"]["userId"], "aud": "mana", "exp": 4102444800}, foreign_key, algorithm="EdDSA"
    )
    forged_answer = await initialize(forged, sandra_space)
    assert forged_answer.status_code == 401 and forged_answer.json()["error"].startswith("Invalid token: ")

    sandra = await jwt_for(http, sb, "persona.sandra@mana.test")
    noah = await jwt_for(http, sb, "persona.noah@mana.test")
    for space in (None, ""):  # a missing space is a 401 too, not a 403
        refused = await initialize(sandra, space)
        assert refused.status_code == 401
        assert refused.json() == {"error": "Missing X-Mana-Space header (set to the active Space ID)"}
    # Any space value is taken: the gateway does not check memberships.
    assert (await initialize(sandra, personal_space(cast["noah"]))).status_code == 200

    opened = await initialize(sandra, sandra_space)
    assert opened.status_code == 200
    session_id = opened.headers["mcp-session-id"]
    hijack = await initialize(noah, personal_space(cast["noah"]), session=session_id)
    assert hijack.status_code == 403 and hijack.json() == {"error": "Session belongs to a different user"}
    unknown = await initialize(sandra, sandra_space, session="no-such-session")
    assert unknown.status_code == 404 and unknown.json() == {"error": "Session not found"}
    # Only a POST may open a session, and only with `initialize` (the SDK 1.29 transport of the real gateway).
    auth = {**MCP_HEADERS, "Authorization": f"Bearer {sandra}", "X-Mana-Space": sandra_space}
    assert (await http.get(url, headers=auth)).json() == {"error": "Bad request"}
    probe = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "server/discover"}, headers=auth)
    assert probe.status_code == 400
    assert probe.json()["error"] == {"code": -32000, "message": "Bad Request: Server not initialized"}
    # A client in the SDK's default mode probes first, is refused, and falls back to initialize, as with Mana.
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {sandra}", "X-Mana-Space": sandra_space}) as hc,
        Client(streamable_http_client(url, http_client=hc)) as client,
    ):
        assert len((await client.list_tools()).tools) == 33


async def test_mcp_serves_exactly_the_real_tools_list(sb: Sandbox, http: httpx.AsyncClient) -> None:
    gisela = (await personas(http, sb))["gisela"]
    token = await jwt_for(http, sb, gisela["email"])
    async with mcp_session(sb, token, personal_space(gisela)) as client:
        served = (await client.list_tools()).tools
    as_sent = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in served]
    assert as_sent == TOOLS_FILE["tools"] and len(as_sent) == 33
    assert all(t.annotations is None for t in served)


async def test_mcp_tools_store_and_return_data(sb: Sandbox, http: httpx.AsyncClient) -> None:
    cast = await personas(http, sb)
    gisela, lena = cast["gisela"], cast["lena"]
    space = personal_space(gisela)
    token = await jwt_for(http, sb, gisela["email"])
    async with mcp_session(sb, token, space) as client:
        made = result_json(await client.call_tool("todo.create", {"title": "Tabletten abholen", "colour": "rot"}))
        task = made["task"]
        assert list(task) == [
            "id", "title", "priority", "isCompleted", "completedAt", "dueDate", "order", "subtasks", "createdAt",
            "updatedAt",
        ]  # fmt: skip
        assert uuid.UUID(task["id"]) and task["priority"] == "medium" and task["dueDate"] is None
        second = result_json(await client.call_tool("todo.create", {"title": "Zahnarzt", "priority": "high"}))["task"]
        assert second["order"] == 1
        assert [t["id"] for t in result_json(await client.call_tool("todo.list", {}))["tasks"]] == [
            task["id"],
            second["id"],
        ]
        assert result_json(await client.call_tool("todo.complete", {"id": task["id"]})) == {"ok": True}
        assert [t["id"] for t in result_json(await client.call_tool("todo.list", {}))["tasks"]] == [second["id"]]
        done = result_json(await client.call_tool("todo.list", {"includeCompleted": True, "limit": 1}))["tasks"]
        assert [(t["id"], t["isCompleted"]) for t in done] == [(task["id"], True)]

        habit = result_json(await client.call_tool("habits.create", {"title": "Kaffee", "targetPerDay": 2}))["habit"]
        assert (habit["icon"], habit["color"], habit["targetPerDay"], habit["isArchived"]) == (
            "star",
            "#6366f1",
            2,
            False,
        )
        assert result_json(await client.call_tool("habits.update", {"id": habit["id"], "color": "#00ff00"})) == {
            "ok": True
        }
        assert result_json(await client.call_tool("habits.archive", {"id": habit["id"]})) == {"ok": True}
        assert result_json(await client.call_tool("habits.list", {})) == {"habits": []}
        listed = result_json(await client.call_tool("habits.list", {"includeArchived": True}))["habits"]
        assert [(h["id"], h["color"], h["isArchived"]) for h in listed] == [(habit["id"], "#00ff00", True)]

        entry = result_json(await client.call_tool("journal.add", {"content": "Heute  war ein guter Tag"}))["entry"]
        assert (entry["wordCount"], entry["mood"], entry["title"], entry["tags"]) == (5, None, None, [])
        mood = result_json(await client.call_tool("mood.log", {"level": 7, "emotion": "calm", "time": "08:15"}))
        assert mood["entry"]["time"] == "08:15" and mood["entry"]["secondaryEmotions"] == []
        today = result_json(await client.call_tool("mood.today", {}))["entries"]
        assert [e["id"] for e in today] == [mood["entry"]["id"]]
        assert result_json(await client.call_tool("mood.today", {"date": "2001-01-01"})) == {"entries": []}
        recent = result_json(await client.call_tool("mood.recent", {"days": 1}))["entries"]
        assert [e["id"] for e in recent] == [mood["entry"]["id"]]

        note = result_json(await client.call_tool("notes.create", {"title": "Rezept", "content": "Apfelkuchen, Zimt"}))
        found = result_json(await client.call_tool("notes.search", {"query": "ZIMT"}))["notes"]
        assert [n["id"] for n in found] == [note["note"]["id"]]
        spaces = result_json(await client.call_tool("spaces.list", {}))
        assert spaces["activeSpaceId"] == space and {s["id"] for s in spaces["spaces"]} == {
            s["id"] for s in gisela["spaces"]
        }

        outfit = result_json(await client.call_tool("wardrobe.createOutfit", {"name": "Büro", "garmentIds": ["g1"]}))
        assert result_json(await client.call_tool("wardrobe.listOutfits", {}))["outfits"] == [outfit["outfit"]]
        tried = await client.call_tool("wardrobe.tryOn", {"outfitId": outfit["outfit"]["id"]})
        assert error_text(tried) == (
            "Tool wardrobe.tryOn failed: None of the outfit garments exist in the active space (moved or deleted?)"
        )
        sign = result_json(
            await client.call_tool("augur.captureSign", {"kind": "hunch", "source": "Bauch", "claim": "Es regnet"})
        )
        assert [e["id"] for e in result_json(await client.call_tool("augur.listOpenSigns", {}))["entries"]] == [
            sign["entryId"]
        ]
        picture = await client.call_tool("me.generateWithReference", {"prompt": "Ich", "referenceMediaIds": ["m1"]})
        assert error_text(picture).startswith(
            "Tool me.generateWithReference failed: mana-api /picture/generate-with-reference failed: 503"
        )
        assert error_text(await client.call_tool("nope.nothing", {})) == "MCP error -32602: Tool nope.nothing not found"

    # Another user sees none of it; the wardrobe module scopes by space, todo (a user-wide pull) does not.
    lena_token = await jwt_for(http, sb, lena["email"])
    async with mcp_session(sb, lena_token, personal_space(lena)) as client:
        assert result_json(await client.call_tool("todo.list", {"includeCompleted": True})) == {"tasks": []}
    team = next(s["id"] for s in gisela["spaces"] if s["type"] != "personal")
    async with mcp_session(sb, token, team) as client:
        assert len(result_json(await client.call_tool("todo.list", {}))["tasks"]) == 1
        assert result_json(await client.call_tool("wardrobe.listOutfits", {})) == {"outfits": []}

    calls = (await http.get(f"{sb.api_url}/__sandbox/mcp-calls")).json()
    assert calls[0]["arguments"] == {"title": "Tabletten abholen", "colour": "rot"}  # as received, unknown key too
    assert (calls[0]["userId"], calls[0]["spaceId"], calls[0]["isError"]) == (gisela["userId"], space, False)
    errors = [c for c in calls if c["isError"]]
    assert [c["tool"] for c in errors] == ["wardrobe.tryOn", "me.generateWithReference", "nope.nothing"]
    assert errors[-1]["errorText"] == "MCP error -32602: Tool nope.nothing not found"


async def test_mcp_refuses_arguments_as_the_real_gateway(sb: Sandbox, http: httpx.AsyncClient) -> None:
    gisela = (await personas(http, sb))["gisela"]
    token = await jwt_for(http, sb, gisela["email"])
    async with mcp_session(sb, token, personal_space(gisela)) as client:
        colour = await client.call_tool("habits.create", {"title": "Yoga", "color": "red"})
        assert error_text(colour) == (
            "MCP error -32602: Input validation error: Invalid arguments for tool habits.create: [\n"
            '  {\n    "validation": "regex",\n    "code": "invalid_string",\n    "message": "Invalid",\n'
            '    "path": [\n      "color"\n    ]\n  }\n]'
        )
        many = await client.call_tool("habits.create", {"icon": 5, "targetPerDay": 0, "title": "x" * 121})
        assert zod_issues(error_text(many), "habits.create") == [
            {
                "code": "too_big",
                "maximum": 120,
                "type": "string",
                "inclusive": True,
                "exact": False,
                "message": "String must contain at most 120 character(s)",
                "path": ["title"],
            },
            {
                "code": "invalid_type",
                "expected": "string",
                "received": "number",
                "path": ["icon"],
                "message": "Expected string, received number",
            },
            {
                "code": "too_small",
                "minimum": 0,
                "type": "number",
                "inclusive": False,
                "exact": False,
                "message": "Number must be greater than 0",
                "path": ["targetPerDay"],
            },
        ]
        todo = await client.call_tool("todo.create", {"priority": "asap", "dueDate": "2026-11-25T10:00:00+01:00"})
        issues = zod_issues(error_text(todo), "todo.create")
        assert issues == [
            {"code": "invalid_type", "expected": "string", "received": "undefined", "path": ["title"],
             "message": "Required"},
            {
                "received": "asap",
                "code": "invalid_enum_value",
                "options": ["low", "medium", "high", "urgent"],
                "path": ["priority"],
                "message": "Invalid enum value. Expected 'low' | 'medium' | 'high' | 'urgent', received 'asap'",
            },
            {"code": "invalid_string", "validation": "datetime", "message": "Invalid datetime", "path": ["dueDate"]},
        ]  # fmt: skip
        assert [list(i) for i in issues][:2] == [
            ["code", "expected", "received", "path", "message"],
            ["received", "code", "options", "path", "message"],
        ]  # zod's key order is part of the text
        complete = zod_issues(error_text(await client.call_tool("todo.complete", {"id": "todo-1"})), "todo.complete")
        assert complete == [{"validation": "uuid", "code": "invalid_string", "message": "Invalid uuid", "path": ["id"]}]
        mood = await client.call_tool("mood.log", {"level": 2.5, "emotion": 3, "secondaryEmotions": ["x"] * 6})
        assert zod_issues(error_text(mood), "mood.log") == [
            {
                "code": "invalid_type",
                "expected": "integer",
                "received": "float",
                "message": "Expected integer, received float",
                "path": ["level"],
            },
            {
                "expected": "'happy' | 'calm' | 'energized' | 'grateful' | 'excited' | 'loved' | 'hopeful' | 'neutral'"
                " | 'bored' | 'tired' | 'sad' | 'anxious' | 'angry' | 'stressed' | 'frustrated' | 'overwhelmed'",
                "received": "number",
                "code": "invalid_type",
                "path": ["emotion"],
                "message": "Expected 'happy' | 'calm' | 'energized' | 'grateful' | 'excited' | 'loved' | 'hopeful'"
                " | 'neutral' | 'bored' | 'tired' | 'sad' | 'anxious' | 'angry' | 'stressed' | 'frustrated'"
                " | 'overwhelmed', received number",
            },
            *[
                {
                    "received": "x",
                    "code": "invalid_enum_value",
                    "options": TOOLS_FILE["tools"][7]["inputSchema"]["properties"]["emotion"]["enum"],
                    "path": ["secondaryEmotions", i],
                    "message": "Invalid enum value. Expected 'happy' | 'calm' | 'energized' | 'grateful' | 'excited'"
                    " | 'loved' | 'hopeful' | 'neutral' | 'bored' | 'tired' | 'sad' | 'anxious' | 'angry' | 'stressed'"
                    " | 'frustrated' | 'overwhelmed', received 'x'",
                }
                for i in range(6)
            ],
            {
                "code": "too_big",
                "maximum": 5,
                "type": "array",
                "inclusive": True,
                "exact": False,
                "message": "Array must contain at most 5 element(s)",
                "path": ["secondaryEmotions"],
            },
        ]
    calls = (await http.get(f"{sb.api_url}/__sandbox/mcp-calls")).json()
    assert [c["isError"] for c in calls] == [True] * 5  # refused before any handler ran, and all recorded
    assert calls[0]["errorText"] == error_text(colour)


class _UnknownIds(IdPool):
    """Every id field gets an id Mana never issued: the gateway validates, the handler says "not found"."""

    def for_field(self, tool: str, field: str) -> list[str]:
        return ["00000000-0000-4000-8000-000000000000"]


def _variants(tool: str, schema: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """A plausible argument set, and that set spoiled one field at a time (wrong type, null, dropped)."""
    base = generate(schema, random.Random(seed), tool=tool, ids=_UnknownIds())
    out = [base, {**base, "unknownKey": seed}]
    wrong: list[Any] = [12345, "x" * (seed % 3), None, [], 2.5, -1, "2026-13-40"]
    for index, key in enumerate(schema.get("properties") or {}):
        out.append({**base, key: wrong[(index + seed) % len(wrong)]})
        out.append({k: v for k, v in base.items() if k != key})
    return out


HANDLER_FAILURES = (
    "mana-api /picture/generate-with-reference failed: 503",
    "picture.generate-with-reference failed: 503",
    "Outfit ",
    "Comic story ",
    "Comic-Character ",
    "reorder rejected: ",
)


async def test_mcp_refuses_exactly_what_the_schema_refuses_and_handles_the_rest(
    sb: Sandbox, http: httpx.AsyncClient
) -> None:
    gisela = (await personas(http, sb))["gisela"]
    token = await jwt_for(http, sb, gisela["email"])
    checked = refused = 0
    async with mcp_session(sb, token, personal_space(gisela)) as client:
        for tool in TOOLS_FILE["tools"]:
            schema = tool["inputSchema"]
            checker = Draft7Validator(schema, format_checker=FORMATS)
            for seed in range(2):
                for arguments in _variants(tool["name"], schema, seed):
                    known = {k: v for k, v in arguments.items() if k in (schema.get("properties") or {})}
                    valid = not schema.get("properties") or checker.is_valid(known)
                    result = await client.call_tool(tool["name"], arguments)
                    text = result.content[0].text
                    checked += 1
                    if not valid:
                        refused += 1
                        zod_issues(error_text(result), tool["name"])
                    elif result.is_error:
                        prefix = f"Tool {tool['name']} failed: "
                        assert text.startswith(prefix) and text[len(prefix) :].startswith(HANDLER_FAILURES), text
                    else:
                        result_json(result)
    assert checked > 500 and 0 < refused < checked


async def test_mcp_fault_and_size_switches(tmp_path: Path, http: httpx.AsyncClient) -> None:
    config = SandboxConfig(db_path=str(tmp_path / "sb.db"), failing_tools=frozenset({"journal.add"}))
    async with Sandbox(config) as sb:
        gisela = (await personas(http, sb))["gisela"]
        token = await jwt_for(http, sb, gisela["email"])
        arm = f"{sb.api_url}/__sandbox/tool-faults"
        assert (await http.post(arm, json={"tool": "notes.create", "message": "boom", "count": 1})).status_code == 200
        assert (await http.post(arm, json={"tool": "todo.list", "padTo": 300_000})).status_code == 200
        assert (await http.post(arm, json={"tool": "todo.list"})).status_code == 400
        assert (await http.post(arm, json={"tool": "todo.list", "padTo": 5, "message": "x"})).status_code == 400
        async with mcp_session(sb, token, personal_space(gisela)) as client:
            failed = await client.call_tool("notes.create", {"title": "Einkauf"})
            assert error_text(failed) == "Tool notes.create failed: boom"
            assert (
                result_json(await client.call_tool("notes.create", {"title": "Einkauf"}))["note"]["title"] == "Einkauf"
            )
            padded = await client.call_tool("todo.list", {})
            assert len(padded.content[0].text) == 300_000 and result_json(padded)["tasks"] == []
            assert len((await client.call_tool("todo.list", {})).content[0].text) < 100  # count 1 by default
            for _ in range(2):
                journal = await client.call_tool("journal.add", {"content": "Tag"})
                assert error_text(journal) == "Tool journal.add failed: sandbox: journal.add is configured to fail"


async def test_mcp_policy_gate_modes(sb: Sandbox, tmp_path: Path, http: httpx.AsyncClient) -> None:
    lena = (await personas(http, sb))["lena"]
    token = await jwt_for(http, sb, lena["email"])
    async with mcp_session(sb, token, personal_space(lena)) as client:  # log-only: decisions are not enforced
        assert not any([(await client.call_tool("mood.today", {})).is_error for _ in range(31)])

    config = SandboxConfig(db_path=str(tmp_path / "enforce.db"), policy_mode="enforce", mcp_surface="annotated")
    async with Sandbox(config) as strict:
        lena = (await personas(http, strict))["lena"]
        token = await jwt_for(http, strict, lena["email"])
        async with mcp_session(strict, token, personal_space(lena)) as client:
            results = [await client.call_tool("mood.today", {}) for _ in range(31)]
            assert not any(r.is_error for r in results[:30])
            assert error_text(results[30]) == (
                "Tool mood.today not allowed: rate-limit-exceeded: Tool mood.today wurde im letzten 60s-Fenster 30×"
                " aufgerufen (Limit 30). Pausiere oder aggregiere die Aufrufe."
            )
            assert not (await client.call_tool("mood.recent", {})).is_error  # per tool
            bait = await client.call_tool("todo.baitDestructive", {})
            assert error_text(bait).startswith(
                "Tool todo.baitDestructive not allowed: destructive-not-allowed: Das Tool todo.baitDestructive löscht"
            )
            invalid = await client.call_tool("mood.today", {"date": "heute"})  # validation comes before the gate
            assert zod_issues(error_text(invalid), "mood.today")[0]["validation"] == "regex"


async def test_mcp_annotated_surface(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with Sandbox(SandboxConfig(db_path=str(tmp_path / "a.db"), mcp_surface="annotated")) as sb:
        gisela = (await personas(http, sb))["gisela"]
        token = await jwt_for(http, sb, gisela["email"])
        async with mcp_session(sb, token, personal_space(gisela)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == {t["name"] for t in TOOLS_FILE["tools"]} | {"todo.baitDestructive"}
            for name, entry in TOOLS_FILE["registry"].items():
                hints = tools[name].annotations
                assert hints is not None
                if entry["policyHint"] == "read":
                    assert hints.read_only_hint is True and hints.destructive_hint is None
                else:
                    assert (hints.read_only_hint, hints.destructive_hint) == (False, False)
            bait = tools["todo.baitDestructive"].annotations
            assert bait is not None and bait.destructive_hint is True
            assert result_json(await client.call_tool("todo.baitDestructive", {})) == {"ok": True}  # log-only
        calls = (await http.get(f"{sb.api_url}/__sandbox/mcp-calls")).json()
        assert [c["tool"] for c in calls] == ["todo.baitDestructive"]


async def test_mcp_handlers_keep_the_jwt_that_opened_the_session(sb: Sandbox, http: httpx.AsyncClient) -> None:
    noah = (await personas(http, sb))["noah"]
    space = personal_space(noah)
    first = await jwt_for(http, sb, noah["email"])
    headers = {"Authorization": f"Bearer {first}", "X-Mana-Space": space}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=10) as hc,
        Client(streamable_http_client(f"{sb.mcp_url}/mcp", http_client=hc), mode="legacy") as client,
    ):
        assert result_json(await client.call_tool("todo.list", {})) == {"tasks": []}
        expire = await http.post(f"{sb.api_url}/__sandbox/jwt/expire", json={"userId": noah["userId"]})
        assert expire.status_code == 200
        stale = await http.post(
            f"{sb.mcp_url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, **headers}
        )  # the gateway refuses the expired JWT itself
        assert stale.status_code == 401 and stale.json() == {
            "error": 'Invalid token: "exp" claim timestamp check failed'
        }
        renewed = await jwt_for(http, sb, noah["email"])
        hc.headers["Authorization"] = f"Bearer {renewed}"  # the old session, a fresh JWT: the handler keeps the old
        listed = await client.call_tool("todo.list", {})
        assert error_text(listed) == f"Tool todo.list failed: mana-sync pull failed: {SYNC_EXPIRED}"
        created = await client.call_tool("todo.create", {"title": "Neu"})
        assert error_text(created) == f"Tool todo.create failed: mana-sync pull failed: {SYNC_EXPIRED}"
        logged = await client.call_tool("mood.log", {"level": 5, "emotion": "tired"})
        assert error_text(logged) == f"Tool mood.log failed: mana-sync push failed: {SYNC_EXPIRED}"
    async with mcp_session(sb, renewed, space) as client:  # a new session with the new JWT works
        assert result_json(await client.call_tool("todo.list", {})) == {"tasks": []}
    others = (await personas(http, sb))["gisela"]
    async with mcp_session(sb, await jwt_for(http, sb, others["email"]), personal_space(others)) as client:
        assert result_json(await client.call_tool("todo.list", {})) == {"tasks": []}  # only noah's JWTs expired


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
