"""The runner's MCP side against servers that misbehave: drops, endless pages, lying hints, crafted
names, expired JWTs, refused spaces. Real HTTP on loopback, the official SDK on both ends; the
sandbox provides login and the personas API, a hostile server (tests/hostile_mcp.py) the MCP side.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import WEEKDAY, Mana
from fake_anthropic import FakeAnthropic
from hostile_mcp import HostileMcp, tool

from runner.agent.loop import Entry, RatingReply, ToolCall, ToolDef, Turn
from runner.mana.mcp import MAX_TOOL_PAGES, MAX_TOOLS
from runner.persona import TICK_ROW, DuePersona, input_hash, tick_id, tick_window
from runner.scheduler import open_runtime
from runner.tick import Outcome, run_tick


class Script:
    """A provider that plays fixed turns (with a pause before each), then stops; it remembers what it was offered."""

    def __init__(self, *turns: list[tuple[str, Any]], pause_s: float = 0.0) -> None:
        self.turns = list(turns)
        self.pause_s = pause_s
        self.offered: list[str] = []

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        self.offered = [t.name for t in tools]
        done = sum(1 for e in transcript if isinstance(e, Turn))
        if done >= len(self.turns):
            return Turn(text="Fertig.", calls=[])
        if done and self.pause_s:
            await asyncio.sleep(self.pause_s)
        calls = [ToolCall(f"c{done}-{i}", name, args) for i, (name, args) in enumerate(self.turns[done])]
        return Turn(text="", calls=calls)

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        return RatingReply({"ratings": [{"module": m, "rating": 3, "notes": "ok"} for m in modules]}, "")


async def _tick(
    mana: Mana, tmp_path: Path, mcp_url: str, provider: Any | None, name: str = "hostile", **overrides: Any
) -> tuple[Outcome, str, list[dict[str, Any]], dict[str, Any]]:
    """One claimed tick for a fresh persona against `mcp_url`; its outcome, tick id, landed rows, journal state."""
    spec = await mana.add_persona(name)
    persona = DuePersona(userId=spec["userId"], email=spec["email"], tickCadence="daily", moduleMix={"todo": 1.0})
    settings = mana.settings(tmp_path, mana_mcp_url=mcp_url, **overrides)
    tid = tick_id(persona.user_id, tick_window("daily", datetime.fromisoformat(WEEKDAY)))
    async with open_runtime(settings) as runtime:
        deps = (
            runtime.tick_deps if provider is None else replace(runtime.tick_deps, make_provider=lambda p, t: provider)
        )
        claim = await runtime.journal.claim(persona.user_id, "2026-11-25", tid, time.time())
        assert claim is not None
        outcome = await run_tick(deps, persona, claim)
        assert await runtime.outbox.flush() == 0
        state = await runtime.journal.tick_state(tid)
    rows = [a for a in await mana.get("actions") if a["tickId"] == tid]
    return outcome, tid, rows, dict(state or {})


def _logins(entries: list[dict[str, Any]], email: str) -> list[str]:
    return [e["outcome"] for e in entries if e["email"] == email]


async def test_a_dropped_connection_mid_tick_is_a_failure_not_a_shutdown(mana: Mana, tmp_path: Path) -> None:
    script = Script([("todo.list", {})], [("todo.create", {"title": "Zahnarzt"})], [("todo.list", {})])
    async with HostileMcp(drop_on="todo.create") as server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, script)
    # The SDK surfaces the drop as a cancellation of the next request: no one shut the runner down.
    assert outcome == "failed"
    assert [(r["toolName"], r["result"], r.get("errorMessage")) for r in rows] == [
        ("todo.list", "ok", None),
        ("todo.create", "error", "SSE stream ended without a response"),  # cut mid-answer: an error row
        ("todo.list", "error", "outcome unknown: the connection to mana-mcp dropped during the call"),
        (TICK_ROW, "error", "mcp: connection to mana-mcp dropped during play"),
    ]


async def test_a_drop_before_any_call_defers_the_tick(mana: Mana, tmp_path: Path) -> None:
    async with HostileMcp(drop_on="initialize") as server:
        outcome, _, rows, state = await _tick(mana, tmp_path, server.url, Script([("todo.list", {})]))
        assert server.calls() == []
    assert outcome == "deferred" and rows == []  # nothing reached Mana: the same tick runs again later
    assert state["state"] == "retry" and state["last_error"] in (
        "mcp: Connection closed",  # how the SDK reports it when the listing was under way
        "mcp: connection to mana-mcp dropped during mcp",  # ... or as a cancellation of the session
    )


async def test_a_shutdown_is_still_recorded_as_interrupted(mana: Mana, tmp_path: Path) -> None:
    spec = await mana.add_persona("stopped")
    persona = DuePersona(userId=spec["userId"], email=spec["email"], tickCadence="daily", moduleMix={"todo": 1.0})
    script = Script([("todo.list", {})], [("todo.create", {"title": "x"})], pause_s=30)
    async with HostileMcp() as server:
        settings = mana.settings(tmp_path, mana_mcp_url=server.url)
        async with open_runtime(settings) as runtime:
            deps = replace(runtime.tick_deps, make_provider=lambda p, t: script)
            claim = await runtime.journal.claim(persona.user_id, "2026-11-25", "t-stop", time.time())
            assert claim is not None
            task = asyncio.create_task(run_tick(deps, persona, claim))
            while not server.calls():
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            state = await runtime.journal.tick_state("t-stop")
    assert state is not None and state["outcome"] == "interrupted"


@pytest.mark.parametrize(
    ("page_size", "pages", "kept"), [(20, MAX_TOOL_PAGES, 20 * MAX_TOOL_PAGES), (100, 3, MAX_TOOLS)]
)
async def test_endless_tool_pages_are_bounded(
    mana: Mana, tmp_path: Path, page_size: int, pages: int, kept: int
) -> None:
    script = Script([("page0.tool0", {})])
    async with HostileMcp(endless_pages=True, page_size=page_size) as server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, script)
    assert server.list_pages == pages
    assert len(script.offered) == kept
    assert outcome == "ok" and [(r["toolName"], r["result"]) for r in rows] == [("page0.tool0", "ok")]


async def test_lying_hints_and_duplicated_names_never_reach_mana(mana: Mana, tmp_path: Path) -> None:
    served = [
        tool("todo.list", read_only=True, destructive=True),  # contradictory: destructive wins
        tool("todo.create"),
        tool("todo.create", read_only=True),  # served twice: which one would run?
        tool("notes.purgeAll", read_only=True),  # a destructive verb, whatever the hint says
        tool("notes.search", read_only=True),
    ]
    asked = ["todo.list", "todo.create", "notes.purgeAll", "notes.search", "calendar.create"]
    script = Script([(name, {}) for name in asked])
    async with HostileMcp(tools=served) as server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, script)
        assert [c.tool for c in server.calls()] == ["notes.search"]
    assert outcome == "ok" and script.offered == ["notes.search"]
    assert [(r["toolName"], r["result"]) for r in rows] == [
        (name, "ok" if name == "notes.search" else "error") for name in asked
    ]
    assert all("not available to you" in r["errorMessage"] for r in rows if r["result"] == "error")


async def test_a_tool_input_that_is_not_an_object_is_refused_locally(mana: Mana, tmp_path: Path) -> None:
    script = Script([("todo.create", ["Zahnarzt"]), ("todo.create", "Zahnarzt"), ("todo.create", {"title": "x"})])
    async with HostileMcp() as server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, script)
        sent = [c.arguments for c in server.calls()]
    assert outcome == "ok" and sent == [{"title": "x"}]  # never replaced by {} and sent
    assert [r["inputHash"] for r in rows] == [
        input_hash(["Zahnarzt"]),
        input_hash("Zahnarzt"),
        input_hash({"title": "x"}),
    ]
    assert [r["result"] for r in rows] == ["error", "error", "ok"]
    assert (
        rows[0]["errorMessage"] == "Invalid arguments for tool todo.create: expected an object, got an array; not sent"
    )


async def test_crafted_names_reach_the_model_unique_and_legal(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    crafted = ["todo.create", "todo_create", "submit_ratings", "submit.ratings", "x" * 70 + ".a", "x" * 70 + ".b"]
    async with HostileMcp(tools=[tool(n) for n in crafted]) as server:
        outcome, _, rows, _ = await _tick(
            mana,
            tmp_path,
            server.url,
            None,
            llm_provider="anthropic",
            anthropic_base_url=fake_anthropic.base_url,
            anthropic_api_key="k-test",
        )
        called = Counter(c.tool for c in server.calls())
    assert outcome == "ok"
    assert all(x.status == 200 for x in fake_anthropic.exchanges)  # "Tool names must be unique" never came
    for exchange in fake_anthropic.exchanges:
        names = [t["name"] for t in exchange.body["tools"]]
        assert len(names) == len(set(names))
    # Every call the model made reached the tool it meant, and its row names that MCP tool.
    assert Counter(r["toolName"] for r in rows if r["toolName"] != TICK_ROW) == called
    assert set(called) <= set(crafted)


def _token_after(server: HostileMcp, calls: int) -> str | None:
    seen = server.calls()
    return seen[0].token if len(seen) >= calls else None


async def test_an_expired_jwt_opens_a_new_session_and_the_tick_goes_on(mana: Mana, tmp_path: Path) -> None:
    script = Script([("todo.list", {})], [("todo.create", {"title": "A"})], [("todo.list", {})], pause_s=1.1)
    server = HostileMcp()
    # From the second tools/call on, the JWT of the first one counts as expired.
    server.refuse = lambda token, method: token == _token_after(server, 2)
    async with server:
        outcome, tid, rows, _ = await _tick(mana, tmp_path, server.url, script, name="renewed")
        accepted = [c for c in server.calls() if c.token != server.calls()[0].token or c is server.calls()[0]]
        openers = server.sessions
    assert outcome == "ok"
    assert [(r["toolName"], r["result"]) for r in rows] == [
        ("todo.list", "ok"),
        ("todo.create", "ok"),
        ("todo.list", "ok"),
    ]
    assert [r["id"] for r in rows] == [f"{tid}-{i}-{r['toolName']}" for i, r in enumerate(rows)]
    assert _logins(await mana.get("logins"), "persona.renewed@mana.test") == ["OK", "OK"]  # one renewal
    assert len(openers) == 2 and len(set(openers.values())) == 2  # a second session, opened with the new JWT
    # Every call after the renewal went to the new session, with the JWT that opened it.
    for call in accepted[1:]:
        assert call.session is not None and openers[call.session] == call.token


async def test_a_401_right_after_renewal_is_a_refused_space_not_a_loop(mana: Mana, tmp_path: Path) -> None:
    script = Script([("todo.list", {})], [("todo.create", {"title": "A"})], pause_s=1.1)
    server = HostileMcp()
    server.refuse = lambda token, method: _token_after(server, 2) is not None  # nothing is accepted any more
    async with server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, script, name="refused")
    assert outcome == "failed"
    assert [(r["toolName"], r["result"]) for r in rows] == [
        ("todo.list", "ok"),
        ("todo.create", "error"),
        (TICK_ROW, "error"),
    ]
    assert "X-Mana-Space" in rows[1]["errorMessage"] and "X-Mana-Space" in rows[2]["errorMessage"]
    assert _logins(await mana.get("logins"), "persona.refused@mana.test") == ["OK", "OK"]  # renewed once, then stopped


async def test_a_session_refused_from_the_start_is_not_renewed(mana: Mana, tmp_path: Path) -> None:
    server = HostileMcp(refuse=lambda token, method: True)
    async with server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, Script([("todo.list", {})]), name="nospace")
    assert outcome == "failed"
    assert [(r["toolName"], r["result"]) for r in rows] == [(TICK_ROW, "error")]
    assert "X-Mana-Space" in rows[0]["errorMessage"] and "minted for this tick" in rows[0]["errorMessage"]
    assert _logins(await mana.get("logins"), "persona.nospace@mana.test") == ["OK"]


async def test_a_policy_that_leaves_no_tool_fails_the_tick_loudly(
    mana: Mana, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = [tool("todo.create"), tool("todo.deleteAll"), tool("notes.search", destructive=True)]
    async with HostileMcp(tools=served) as server:
        outcome, _, rows, _ = await _tick(
            mana, tmp_path, server.url, Script([("todo.create", {})]), persona_tools_deny="todo.c*"
        )
        assert server.calls() == []
    assert outcome == "failed"
    assert [(r["toolName"], r["result"], r["errorMessage"]) for r in rows] == [
        (
            TICK_ROW,
            "error",
            "no tools offered: all 3 withheld by policy (deny-setting: 1, destructive-hint: 1, destructive-verb: 1)",
        )
    ]
    logged = capsys.readouterr()
    assert "no tools offered" in logged.out + logged.err
