"""Each persona's session is its own (issue 13), proven on what the sandbox *received*.

On Mana's real stack one shared HTTP client kept the first persona's Better Auth cookie and sent
it with every later persona's sign-in: Better Auth's origin check refused them (403
MISSING_OR_NULL_ORIGIN), 1 persona in 6 got through. The sandbox now checks origins as Better
Auth does and records, per request, whose credentials it carried (runner/sandbox/witness.py).
The rules checked on every recorded request:
- no request carries the credentials of more than one person (cookie, Bearer JWT, the email a
  sign-in names, the MCP session it continues);
- a sign-in carries no cookie at all;
- a request with a session cookie carries exactly one, and mana-auth's own origin;
- the personas API never sees a persona's credential.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SEED_SECRET, SERVICE_KEY, WEEKDAY, Mana, open_runner, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import SandboxProcess, free_port, start_sandbox, until

from runner.agent.loop import RatingReply, ToolCall, Turn
from runner.dispatch import run_once
from runner.journal import Journal
from runner.mana.auth import AuthClient, LoginLimiter
from runner.mana.errors import RetryPolicy
from runner.mana.http import shared_client
from runner.persona import TICK_ROW, derive_password
from runner.sandbox import Sandbox, SandboxConfig
from runner.session import PersonaSession, SessionConfig

SIGN_INS = {"/api/auth/sign-in/email", "/api/v1/auth/login"}
ENCRYPTING = ("todo.create", "notes.create", "mood.log", "journal.add")


def cast(count: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"p{i:02d}",
            "archetype": "test-archetype",
            "systemPrompt": "Du bist eine Testperson.",
            "moduleMix": {"todo": 0.4, "notes": 0.3, "mood": 0.3},
            "tickCadence": "daily",
            "extraSpace": "none",
        }
        for i in range(count)
    ]


def assert_each_request_carried_one_persona(requests: list[dict[str, Any]], auth_origin: str) -> None:
    assert requests, "the sandbox recorded no request"
    for r in requests:
        where = f"{r['service']} {r['method']} {r['path']}"
        assert len(r["owners"]) <= 1, f"{where} carried credentials of {r['owners']}"
        assert not any(o.startswith("<") for o in r["owners"]), f"{where}: a credential of no known session: {r}"
        if r["path"] in SIGN_INS:
            assert r["sessionCookies"] == 0, f"{where} carried a cookie"
        if r["sessionCookies"]:
            assert r["sessionCookies"] == 1 and r["origin"] == auth_origin, r
        if r["service"] == "api":
            assert r["owners"] == [] and r["sessionCookies"] == 0, r
        assert r["status"] != 403, r  # Better Auth's origin check refused nothing


@pytest.fixture
async def crowd(tmp_path: Path) -> AsyncIterator[Mana]:
    """The sandbox with 20 plain personas, the space list refusing Bearer (the real default)."""
    people = tmp_path / "people.json"
    people.write_text(json.dumps(cast(20)), encoding="utf-8")
    config = SandboxConfig(
        db_path=str(tmp_path / "sandbox.db"), seed_secret=SEED_SECRET, service_key=SERVICE_KEY, personas_file=people
    )
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=30) as control:
        world = Mana(sandbox, config, control)
        await world.post("clock", {"now": WEEKDAY})
        yield world


async def test_twenty_personas_in_one_once_each_sign_in_with_their_own_credentials_only(
    crowd: Mana, tmp_path: Path
) -> None:
    async with open_runner(crowd.settings(tmp_path, persona_concurrency=4)) as runtime:
        report = await run_once(runtime)
        summaries = await runtime.journal.summaries([t for _, t in report.ticks])
    assert len(report.ticks) == 20 and report.backlog == 0
    assert {s.outcome for s in summaries.values()} == {"ok"}, summaries
    requests = await crowd.get("requests")
    assert_each_request_carried_one_persona(requests, crowd.sandbox.auth_url)
    # Every persona needed the cookie (the space list refuses Bearer) and used it for itself alone.
    personas = {p["userId"] for p in await crowd.get("personas")}
    listed = [r for r in requests if r["path"] == "/api/auth/organization/list" and r["sessionCookies"]]
    assert sorted(o for r in listed for o in r["owners"]) == sorted(personas)
    # Every MCP request came from one persona, in a session that persona opened.
    assert {o for r in requests if r["service"] == "mcp" for o in r["owners"]} == personas


async def test_the_daemon_keeps_sessions_apart_over_three_windows(crowd: Mana, tmp_path: Path) -> None:
    settings = crowd.settings(tmp_path, tick_interval_ms=200, persona_concurrency=4, port=free_port())
    start = datetime.fromisoformat(WEEKDAY)
    async with serving(settings):
        for day in range(3):
            await crowd.post("clock", {"now": (start + timedelta(days=day)).isoformat()})

            def window_done(expected: int = 20 * (day + 1)) -> bool:
                ticks = {a["tickId"] for a in httpx.get(f"{crowd.sandbox.api_url}/__sandbox/actions").json()}
                return len(ticks) >= expected

            await until(window_done, timeout=120, what=f"20 ticks in window {day + 1}")
    actions = await crowd.get("actions")
    assert len({a["tickId"] for a in actions}) == 60
    assert not [a for a in actions if a["toolName"] == TICK_ROW and a["result"] == "error"]
    assert_each_request_carried_one_persona(await crowd.get("requests"), crowd.sandbox.auth_url)


# --- many personas' sign-ins, space lookups and renewals interleaved on one process -------------


@pytest.fixture(scope="module")
def shared_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    tmp = tmp_path_factory.mktemp("interleave")
    people = tmp / "people.json"
    people.write_text(json.dumps(cast(8)), encoding="utf-8")
    sandbox = start_sandbox(
        tmp, seed_secret=SEED_SECRET, service_key=SERVICE_KEY, extra=("--personas-file", str(people))
    )
    yield sandbox
    sandbox.stop()


# One persona's steps: open a session (remembered space, or a lookup), renew its JWT, or forget its
# space and open again (which takes Better Auth's sign-in and the cookie again).
steps = st.lists(st.sampled_from(["open", "renew", "relookup"]), min_size=1, max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=st.lists(steps, min_size=2, max_size=8), seed=st.integers(0, 2**16))
def test_interleaved_sessions_never_carry_another_personas_credential(
    shared_sandbox: SandboxProcess, tmp_path_factory: pytest.TempPathFactory, plans: list[list[str]], seed: int
) -> None:
    people = [p["email"] for p in shared_sandbox.get("personas")]
    since = len(shared_sandbox.get("requests"))
    journal_path = tmp_path_factory.mktemp("journal") / "runner.db"
    jitter = random.Random(seed)

    async def play() -> None:
        journal = await Journal.open(journal_path)
        try:
            async with shared_client() as http:
                auth = AuthClient(http, shared_sandbox.auth_url, RetryPolicy(attempts=2), LoginLimiter(1000, 1.0))
                config = SessionConfig(seed_secret=SEED_SECRET)

                async def persona(email: str, plan: list[str]) -> None:
                    session = PersonaSession(config, auth, journal, email)
                    await session.open(vault=True)
                    for step in plan:
                        await asyncio.sleep(jitter.random() * 0.005)  # a different interleaving each example
                        if step == "renew":
                            await session.renew()
                        else:
                            if step == "relookup":
                                await session.forget_space()
                            session = PersonaSession(config, auth, journal, email)
                            await session.open(vault=True)

                await asyncio.gather(*(persona(people[i % len(people)], plan) for i, plan in enumerate(plans)))
        finally:
            await journal.close()

    asyncio.run(play())
    assert_each_request_carried_one_persona(shared_sandbox.get("requests")[since:], shared_sandbox.auth_url)


# --- the encryption vault at first contact ---------------------------------------------------


class _WritesEncrypted:
    """A player that calls each encrypting tool once, then rates."""

    def __init__(self) -> None:
        self._done = False

    async def next_turn(self, system: str, tools: Any, transcript: Any) -> Any:
        if self._done:
            return Turn(text="Fertig.", calls=[])
        self._done = True
        inputs = {
            "todo.create": {"title": "Einkaufen"},
            "notes.create": {"title": "Idee", "content": "Ein Gedanke"},
            "mood.log": {"level": 6, "emotion": "calm"},
            "journal.add": {"content": "Ein ruhiger Tag."},
        }
        return Turn(text="", calls=[ToolCall(f"c{i}", name, inputs[name]) for i, name in enumerate(ENCRYPTING)])

    async def rate(self, system: str, tools: Any, transcript: Any, prompt: str, modules: list[str]) -> Any:
        return RatingReply({"ratings": [{"module": m, "rating": 4, "notes": "ok"} for m in modules]}, "")


async def test_a_persona_without_a_vault_gets_one_at_first_contact_then_encrypting_tools_work(
    mana: Mana, tmp_path: Path
) -> None:
    settings = mana.settings(tmp_path, persona_concurrency=4)
    async with open_runner(settings, lambda p, t: _WritesEncrypted()) as runtime:
        first = await run_once(runtime)
        await mana.post("clock", {"now": (datetime.fromisoformat(WEEKDAY) + timedelta(days=1)).isoformat()})
        second = await run_once(runtime)
    assert first.ticks and second.ticks
    actions = await mana.get("actions")
    encrypted = [a for a in actions if a["toolName"] in ENCRYPTING]
    assert encrypted and all(a["result"] == "ok" for a in encrypted), [a["errorMessage"] for a in encrypted]
    inits = [r for r in await mana.get("requests") if r["path"].endswith("/encryption-vault/init")]
    people = {p.user_id for p, _ in first.ticks}
    # One init per persona, at its first tick; the second window knew the vault from the journal.
    assert sorted(o for r in inits for o in r["owners"]) == sorted(people)
    checks = [r for r in await mana.get("requests") if r["path"].endswith("/encryption-vault/key")]
    assert len(checks) == len(people)


async def test_with_vault_init_off_the_error_row_names_the_missing_vault(mana: Mana, tmp_path: Path) -> None:
    settings = mana.settings(tmp_path, persona_vault_init=False)
    async with open_runner(settings, lambda p, t: _WritesEncrypted()) as runtime:
        report = await run_once(runtime)
    assert report.ticks
    encrypted = [a for a in await mana.get("actions") if a["toolName"] in ENCRYPTING]
    assert encrypted and all(a["result"] == "error" for a in encrypted)
    assert all("vault not initialised" in a["errorMessage"] for a in encrypted), encrypted[0]
    assert not [r for r in await mana.get("requests") if "/encryption-vault/" in r["path"]]


# --- the sandbox's own rules ---------------------------------------------------------------------


async def test_the_sandbox_refuses_a_cookie_bearing_post_without_a_trusted_origin(mana: Mana) -> None:
    people = await mana.get("personas")
    body = {"email": people[0]["email"], "password": _password(mana, people[0]["email"])}
    url = f"{mana.sandbox.auth_url}/api/auth/sign-in/email"
    async with shared_client() as http:
        first = await http.post(url, json=body)
        assert first.status_code == 200
        cookie = first.headers["set-cookie"].split(";", 1)[0]
        # The defect of issue 13: a sign-in sent with a cookie left by another persona's sign-in.
        stale = await http.post(url, json=body, headers={"Cookie": cookie})
        assert stale.status_code == 403 and stale.json()["code"] == "MISSING_OR_NULL_ORIGIN"
        foreign = await http.post(url, json=body, headers={"Cookie": cookie, "Origin": "https://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["code"] == "INVALID_ORIGIN"
        trusted = await http.post(url, json=body, headers={"Cookie": cookie, "Origin": mana.sandbox.auth_url})
        assert trusted.status_code == 200
        # A GET is not origin-checked (Better Auth skips GET, HEAD and OPTIONS).
        listed = await http.get(f"{mana.sandbox.auth_url}/api/auth/organization/list", headers={"Cookie": cookie})
        assert listed.status_code == 200


def _password(mana: Mana, email: str) -> str:
    return derive_password(mana.config.seed_secret, email)
