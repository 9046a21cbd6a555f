"""The runner's MCP side against servers that misbehave: drops, endless pages, lying hints, crafted
names, expired JWTs, refused spaces. Real HTTP on loopback, the official SDK on both ends; the
sandbox provides login and the personas API, a hostile server (tests/hostile_mcp.py) the MCP side.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from asyncio.subprocess import PIPE
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog.testing
from conftest import SEED_SECRET, SERVICE_KEY, WEEKDAY, Mana, open_runner
from fake_anthropic import FakeAnthropic
from hostile_mcp import HostileMcp, tool
from procs import ROOT

from runner import metrics
from runner.agent.loop import Entry, RatingReply, ToolCall, ToolDef, Turn
from runner.dispatch import RoundReport, run_once
from runner.mana.mcp import MAX_TOOL_PAGES, MAX_TOOLS
from runner.persona import TICK_ROW, DuePersona, input_hash, tick_id, tick_window
from runner.sandbox import Sandbox, SandboxConfig
from runner.sandbox.mana_tools import BAIT_TOOL
from runner.settings import Settings
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
    mana: Mana,
    tmp_path: Path,
    mcp_url: str,
    provider: Any | None,
    name: str = "hostile",
    spec: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[Outcome, str, list[dict[str, Any]], dict[str, Any]]:
    """One claimed tick for a (fresh) persona against `mcp_url`; its outcome, tick id, landed rows, journal state."""
    spec = spec or await mana.add_persona(name)
    persona = DuePersona(userId=spec["userId"], email=spec["email"], tickCadence="daily", moduleMix={"todo": 1.0})
    settings = mana.settings(tmp_path, mana_mcp_url=mcp_url, **overrides)
    tid = tick_id(persona.user_id, tick_window("daily", datetime.fromisoformat(WEEKDAY)))
    async with open_runner(settings, None if provider is None else lambda p, t: provider) as runtime:
        deps = runtime.tick_deps
        claim = await runtime.journal.claim(persona.user_id, "2026-11-25", tid)
        assert claim is not None
        outcome = await run_tick(deps, persona, claim)
        assert await runtime.outbox.flush() == 0
        state = await runtime.journal.tick_state(tid)
    rows = [a for a in await mana.get("actions") if a["tickId"] == tid]
    return outcome, tid, rows, dict(state or {})


def _logins(entries: list[dict[str, Any]], email: str, route: str | None = "login") -> list[str]:
    """Outcomes of the persona's sign-ins: JWT logins by default (the space's cookie sign-in is another route)."""
    return [e["outcome"] for e in entries if e["email"] == email and route in (None, e["route"])]


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
        # The cause is what closing the session raised: the next request found nobody listening.
        (
            TICK_ROW,
            "error",
            "mcp: connection to mana-mcp dropped during play (ConnectError: All connection attempts failed)",
        ),
    ]


async def test_a_drop_before_any_call_defers_the_tick(mana: Mana, tmp_path: Path) -> None:
    async with HostileMcp(drop_on="initialize") as server:
        outcome, _, rows, state = await _tick(mana, tmp_path, server.url, Script([("todo.list", {})]))
        assert server.calls() == []
    assert outcome == "deferred" and rows == []  # nothing reached Mana: the same tick runs again later
    assert state["state"] == "retry" and (
        state["last_error"] == "mcp: Connection closed"  # how the SDK reports it when the listing was under way
        or state["last_error"].startswith("mcp: connection to mana-mcp dropped during mcp")  # ... or as a cancel
    )


@pytest.mark.parametrize("during", ["the model's turn", "a tool call"])
async def test_a_shutdown_is_still_recorded_as_interrupted(mana: Mana, tmp_path: Path, during: str) -> None:
    spec = await mana.add_persona("stopped")
    persona = DuePersona(userId=spec["userId"], email=spec["email"], tickCadence="daily", moduleMix={"todo": 1.0})
    slow = during == "a tool call"
    script = Script([("todo.list", {})], [("todo.create", {"title": "x"})], pause_s=0 if slow else 30)
    async with HostileMcp(slow_on="todo.create" if slow else None) as server:
        settings = mana.settings(tmp_path, mana_mcp_url=server.url)
        async with open_runner(settings, lambda p, t: script) as runtime:
            deps = runtime.tick_deps
            claim = await runtime.journal.claim(persona.user_id, "2026-11-25", "t-stop")
            assert claim is not None
            task = asyncio.create_task(run_tick(deps, persona, claim))
            while len(server.calls()) < (2 if slow else 1):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            task.cancel()  # what the drain does to a tick past its deadline
            with pytest.raises(asyncio.CancelledError):
                await task
            state = await runtime.journal.tick_state("t-stop")
            assert await runtime.outbox.flush() == 0
    assert state is not None and state["outcome"] == "interrupted"
    rows = [(a["toolName"], a["result"], a.get("errorMessage")) for a in await mana.get("actions")]
    assert rows == [("todo.list", "ok", None)] + (
        [("todo.create", "error", "outcome unknown: runner stopped during the call")] if slow else []
    ) + [(TICK_ROW, "error", "interrupted: runner shut down during this tick")]


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


async def test_a_renewal_whose_login_fails_ends_the_tick_instead_of_retrying_per_call(
    mana: Mana, tmp_path: Path
) -> None:
    class LoginBreaksAfterFirstCall(Script):
        async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
            if sum(1 for e in transcript if isinstance(e, Turn)) == 1:
                await mana.post("faults", {"route": "login", "status": 400, "count": 100})
            return await super().next_turn(system, tools, transcript)

    script = LoginBreaksAfterFirstCall(
        [("todo.list", {})], [("todo.create", {"title": "A"})], [("todo.list", {})], [("todo.list", {})], pause_s=1.1
    )
    server = HostileMcp()
    server.refuse = lambda token, method: token == _token_after(server, 2)
    async with server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, script)
        assert [c.tool for c in server.calls()] == ["todo.list", "todo.create"]  # nothing after the failed renewal
    assert outcome == "failed"
    assert [(r["toolName"], r["result"]) for r in rows] == [
        ("todo.list", "ok"),
        ("todo.create", "error"),
        (TICK_ROW, "error"),
    ]
    assert rows[1]["errorMessage"].startswith("login: HTTP 400") and rows[2]["errorMessage"] == rows[1]["errorMessage"]


async def test_a_session_refused_from_the_start_is_not_renewed(mana: Mana, tmp_path: Path) -> None:
    server = HostileMcp(refuse=lambda token, method: True)
    async with server:
        outcome, _, rows, _ = await _tick(mana, tmp_path, server.url, Script([("todo.list", {})]), name="nospace")
    assert outcome == "failed"
    assert [(r["toolName"], r["result"]) for r in rows] == [(TICK_ROW, "error")]
    assert "X-Mana-Space" in rows[0]["errorMessage"] and "minted for this tick" in rows[0]["errorMessage"]
    assert _logins(await mana.get("logins"), "persona.nospace@mana.test") == ["OK"]


async def test_a_policy_that_leaves_no_tool_fails_the_tick_loudly(
    mana: Mana, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "_tool_labels", set())  # room for labels, whatever ran before in this process
    served = [tool("todo.create"), tool("todo.deleteAll"), tool("notes.search", destructive=True)]
    counted = {"tool": "todo.deleteAll", "decision": "withheld", "rule": "destructive-verb"}
    before = metrics.REGISTRY.get_sample_value("persona_tool_decisions_total", counted) or 0
    async with HostileMcp(tools=served) as server:
        with structlog.testing.capture_logs() as logged:
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
    assert [e["log_level"] for e in logged if e["event"].startswith("no tools offered")] == ["warning"]
    decided = [e for e in logged if e["event"] == "tools decided"]
    assert [(e["served"], e["offered"], e["withheld"]) for e in decided] == [(3, 0, 3)]  # once per tick
    assert metrics.REGISTRY.get_sample_value("persona_tool_decisions_total", counted) == before + 1


# --- on the sandbox: the real surface and the annotated one ---------------------------------

TOOL_NAMES = [
    t["name"] for t in json.loads((ROOT / "runner" / "sandbox" / "mana-tools.json").read_text("utf-8"))["tools"]
]


async def test_once_offers_every_tool_of_the_real_surface_and_rows_land(mana: Mana, tmp_path: Path) -> None:
    scripts: list[Script] = []

    def make(persona: DuePersona, tick: str) -> Script:
        scripts.append(Script([("todo.create", {"title": "Einkaufen"})], [("todo.list", {})]))
        return scripts[-1]

    async with open_runner(mana.settings(tmp_path), make) as runtime:
        report = await run_once(runtime)
    assert report.backlog == 0 and len(report.ticks) == len(scripts) == 10
    assert all(s.offered == TOOL_NAMES for s in scripts)  # no annotations: nothing withheld by default
    actions = await mana.get("actions")
    for _, tick in report.ticks:
        rows = [(a["toolName"], a["result"]) for a in actions if a["tickId"] == tick]
        assert rows == [("todo.create", "ok"), ("todo.list", "ok")]
    assert len(await mana.get("mcp-calls")) == 20


async def test_on_the_annotated_surface_destructive_tools_are_withheld_and_the_bait_never_called(
    tmp_path: Path,
) -> None:
    config = SandboxConfig(
        db_path=str(tmp_path / "sb.db"), seed_secret=SEED_SECRET, service_key=SERVICE_KEY, mcp_surface="annotated"
    )
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url) as control:
        world = Mana(sandbox, config, control)
        await world.post("clock", {"now": WEEKDAY})
        script = Script([(BAIT_TOOL, {}), ("todo.list", {}), ("todo.create", {"title": "x"})])
        outcome, _, rows, _ = await _tick(world, tmp_path, sandbox.mcp_url, script)
        calls = [c["tool"] for c in await world.get("mcp-calls")]
    assert outcome == "ok"
    assert script.offered == TOOL_NAMES  # read and write tools offered by their hints; the bait is not
    assert [(r["toolName"], r["result"]) for r in rows] == [
        (BAIT_TOOL, "error"),
        ("todo.list", "ok"),
        ("todo.create", "ok"),
    ]
    assert BAIT_TOOL not in calls and calls == ["todo.list", "todo.create"]


async def test_a_policy_withholding_everything_is_an_error_row_and_a_warning_not_a_quiet_day(
    mana: Mana, tmp_path: Path
) -> None:
    with structlog.testing.capture_logs() as logged:
        report = await _once_with(mana.settings(tmp_path, persona_tools_deny="*"))
    assert len(report.ticks) == 10 and report.backlog == 0
    actions = await mana.get("actions")
    expected = "no tools offered: all 33 withheld by policy (deny-setting: 33)"
    assert [(a["toolName"], a["result"], a["errorMessage"]) for a in actions] == [(TICK_ROW, "error", expected)] * 10
    assert await mana.get("mcp-calls") == []
    warnings = [e for e in logged if e["event"].startswith("no tools offered")]
    assert len(warnings) == 10 and all(e["log_level"] == "warning" for e in warnings)
    async with open_runner(mana.settings(tmp_path)) as runtime:
        summaries = await runtime.journal.summaries([t for _, t in report.ticks])
    assert {s.outcome for s in summaries.values()} == {"failed"}


async def test_a_jwt_expired_mid_tick_renews_once_in_a_new_session_and_one_tick_keeps_all_rows(
    mana: Mana, tmp_path: Path
) -> None:
    class ExpiresAfterFirstCall(Script):
        async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
            if sum(1 for e in transcript if isinstance(e, Turn)) == 1:
                await mana.post("jwt/expire", {"userId": user_id})  # from now on the tick's JWT is expired
            return await super().next_turn(system, tools, transcript)

    spec = await mana.add_persona("expiring")
    user_id = spec["userId"]
    script = ExpiresAfterFirstCall(
        [("todo.create", {"title": "Zahnarzt"})], [("todo.list", {})], [("todo.create", {"title": "Post"})]
    )
    outcome, tid, rows, _ = await _tick(mana, tmp_path, mana.sandbox.mcp_url, script, spec=spec)
    assert outcome == "ok"
    assert [(r["toolName"], r["result"]) for r in rows] == [
        ("todo.create", "ok"),
        ("todo.list", "ok"),
        ("todo.create", "ok"),
    ]
    assert [r["id"] for r in rows] == [f"{tid}-{i}-{r['toolName']}" for i, r in enumerate(rows)]
    assert _logins(await mana.get("logins"), spec["email"]) == ["OK", "OK"]  # exactly one renewal
    # The handlers answered with a fresh JWT: the old session's would have failed with the expired one.
    calls = [c for c in await mana.get("mcp-calls") if c["userId"] == user_id]
    assert [(c["tool"], c["isError"]) for c in calls] == [
        ("todo.create", False),
        ("todo.list", False),
        ("todo.create", False),
    ]


async def test_a_validation_error_row_carries_the_field_and_the_message(mana: Mana, tmp_path: Path) -> None:
    script = Script([("habits.create", {"title": "Kaffee", "color": "blau"}), ("habits.create", {"title": ""})])
    outcome, _, rows, _ = await _tick(mana, tmp_path, mana.sandbox.mcp_url, script)
    assert outcome == "ok"
    assert [r["errorMessage"] for r in rows] == [
        "Invalid arguments for tool habits.create: color: Invalid (regex)",
        "Invalid arguments for tool habits.create: title: String must contain at least 1 character(s)",
    ]


async def test_handler_failures_and_policy_denials_keep_their_text_in_one_line(tmp_path: Path) -> None:
    config = SandboxConfig(
        db_path=str(tmp_path / "sb.db"), seed_secret=SEED_SECRET, service_key=SERVICE_KEY, policy_mode="enforce"
    )
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url) as control:
        world = Mana(sandbox, config, control)
        await world.post("clock", {"now": WEEKDAY})
        failure = 'mana-sync pull failed: 401 Unauthorized\n  {"error": "token is expired"}'
        await world.post("tool-faults", {"tool": "notes.search", "message": failure})
        script = Script([("notes.search", {"query": "Rezept"})], [("mood.today", {})] * 31)
        outcome, _, rows, _ = await _tick(world, tmp_path, sandbox.mcp_url, script)
    assert outcome == "ok"
    assert rows[0]["errorMessage"] == (
        'Tool notes.search failed: mana-sync pull failed: 401 Unauthorized {"error": "token is expired"}'
    )
    assert [r["result"] for r in rows[1:]] == ["ok"] * 30 + ["error"]  # the 31st call within 60 s is denied
    assert rows[-1]["errorMessage"].startswith("Tool mood.today not allowed: ")


async def _once_with(settings: Settings) -> RoundReport:
    async with open_runner(settings) as runtime:
        return await run_once(runtime)


# --- python -m runner tools EMAIL -----------------------------------------------------------


async def _cli(mana: Mana, tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "RUNNER_", "LLM_"))}
    values.update(
        MANA_API_URL=mana.sandbox.api_url,
        MANA_AUTH_URL=mana.sandbox.auth_url,
        MANA_MCP_URL=mana.sandbox.mcp_url,
        MANA_SERVICE_KEY=SERVICE_KEY,
        PERSONA_SEED_SECRET=SEED_SECRET,
        RUNNER_STATE_PATH=str(tmp_path / "runner.db"),
        LOG_FORMAT="json",
        **env,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", *args, cwd=ROOT, env=values, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_tools_command_prints_each_served_tool_with_its_decision(mana: Mana, tmp_path: Path) -> None:
    anna = (await mana.get("personas"))[0]["email"]
    code, out, err = await _cli(mana, tmp_path, "tools", anna, PERSONA_TOOLS_DENY="comic.*", PERSONA_TOOLS_ALLOW="")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["tool", "decision", "rule", "reason"]
    table = {line.split()[0]: line.split(maxsplit=3)[1:] for line in lines[2:-1]}
    assert list(table) == TOOL_NAMES
    assert table["todo.create"] == ["offered", "default", "no hints; no deny rule matches"]
    assert table["comic.createStory"] == ["withheld", "deny-setting", "PERSONA_TOOLS_DENY pattern 'comic.*'"]
    assert lines[-1] == "33 served, 25 offered, 8 withheld"
    assert "eyJ" not in out + err and "Traceback" not in err


async def test_the_tools_command_never_spends_a_lockout_attempt_and_refuses_bad_globs(
    mana: Mana, tmp_path: Path
) -> None:
    locked = await mana.add_persona("clilocked", wrongSeed=True)
    first = await _cli(mana, tmp_path, "tools", locked["email"])
    second = await _cli(mana, tmp_path, "tools", locked["email"])
    assert (first[0], second[0]) == (1, 1)
    assert first[2].strip().splitlines()[-1].startswith("error: login: HTTP 401 INVALID_CREDENTIALS")
    assert second[2].strip().splitlines()[-1].startswith("error: login: not attempted, refused before")
    # One attempt, not two, on any sign-in route:
    assert _logins(await mana.get("logins"), locked["email"], route=None) == ["INVALID_CREDENTIALS"]

    code, out, err = await _cli(mana, tmp_path, "tools", "persona.x@mana.test", PERSONA_TOOLS_ALLOW="todo.[abc")
    assert code == 2 and err.strip() == "error: PERSONA_TOOLS_ALLOW: 'todo.[abc' has an unclosed or stray bracket"
