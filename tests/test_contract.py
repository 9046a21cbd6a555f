"""The runner against the sandbox over real loopback HTTP and real MCP: what lands in Mana."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import Mana, open_runner
from fake_anthropic import FakeAnthropic, asked_tool, default_brain
from procs import ROOT

from runner.agent.loop import MAX_RESULT_CHARS, Entry, RatingReply, ToolCall, ToolDef, Turn
from runner.dispatch import PollError, RoundReport, run_once
from runner.persona import TICK_ROW, input_hash, module_of
from runner.settings import Settings

TOOL_NAMES = [
    t["name"] for t in json.loads((ROOT / "runner" / "sandbox" / "mana-tools.json").read_text("utf-8"))["tools"]
]


async def _once(settings: Settings) -> RoundReport:
    async with open_runner(settings) as runtime:
        return await run_once(runtime)


def _calls_by_user(calls: list[dict[str, Any]]) -> dict[str, Counter[tuple[str, str, bool]]]:
    out: dict[str, Counter[tuple[str, str, bool]]] = {}
    for c in calls:
        out.setdefault(c["userId"], Counter())[(c["tool"], input_hash(c["arguments"]), bool(c["isError"]))] += 1
    return out


def _rows_by_user(actions: list[dict[str, Any]]) -> dict[str, Counter[tuple[str, str, bool]]]:
    out: dict[str, Counter[tuple[str, str, bool]]] = {}
    for a in actions:
        if a["toolName"] != TICK_ROW:
            out.setdefault(a["personaId"], Counter())[(a["toolName"], a["inputHash"], a["result"] == "error")] += 1
    return out


async def test_once_lands_exactly_the_rows_of_what_happened_and_a_rerun_adds_none(mana: Mana, tmp_path: Path) -> None:
    settings = mana.settings(tmp_path)
    report = await _once(settings)
    assert report.backlog == 0
    assert len(report.ticks) == 10  # the whole catalog is due on a weekday

    actions, feedback, calls = await mana.get("actions"), await mana.get("feedback"), await mana.get("mcp-calls")
    # Every tool call that reached mana-mcp has exactly one action row, with the same input hash and result.
    assert _rows_by_user(actions) == _calls_by_user(calls)
    assert {c["tool"] for c in calls} <= set(TOOL_NAMES)
    for persona, tick in report.ticks:
        rows = [a for a in actions if a["tickId"] == tick]
        assert rows and {a["personaId"] for a in rows} == {persona.user_id}
        assert [a["id"] for a in rows] == [f"{tick}-{i}-{a['toolName']}" for i, a in enumerate(rows)]
        assert all(isinstance(a["latencyMs"], int) for a in rows if a["toolName"] != TICK_ROW)
        used = {module_of(a["toolName"]) for a in rows if a["toolName"] != TICK_ROW}
        rated = {f["module"]: f["rating"] for f in feedback if f["tickId"] == tick}
        assert set(rated) == used  # exactly the modules used: none missing, no noise
        assert all(1 <= r <= 5 for r in rated.values())

    again = await _once(settings)
    assert again.ticks == []  # lastActiveAt moved: nobody is due
    assert (await mana.get("actions"), await mana.get("feedback"), await mana.get("mcp-calls")) == (
        actions,
        feedback,
        calls,
    )


async def test_a_persona_done_in_its_window_is_not_played_again_even_if_still_due(mana: Mana, tmp_path: Path) -> None:
    sticky = await mana.add_persona("sticky", alwaysDue=True)
    settings = mana.settings(tmp_path)
    await _once(settings)
    before = [c for c in await mana.get("mcp-calls") if c["userId"] == sticky["userId"]]
    assert before
    for _ in range(2):
        report = await _once(settings)
        assert all(p.user_id != sticky["userId"] for p, _ in report.ticks)
    after = [c for c in await mana.get("mcp-calls") if c["userId"] == sticky["userId"]]
    assert after == before
    ticks = {a["tickId"] for a in await mana.get("actions") if a["personaId"] == sticky["userId"]}
    assert len(ticks) == 1


async def test_a_wrong_password_is_tried_once_and_the_others_complete(mana: Mana, tmp_path: Path) -> None:
    locked = await mana.add_persona("wrongseed", wrongSeed=True)
    settings = mana.settings(tmp_path)
    report = await _once(settings)
    await _once(settings)  # a second run must not try again: the tick is closed for its window
    logins = [entry["outcome"] for entry in await mana.get("logins") if entry["email"] == locked["email"]]
    assert logins == ["INVALID_CREDENTIALS"]
    rows = [a for a in await mana.get("actions") if a["personaId"] == locked["userId"]]
    assert [(r["toolName"], r["result"]) for r in rows] == [(TICK_ROW, "error")]
    # Mana's login says INVALID_CREDENTIALS, Better Auth's sign-in INVALID_EMAIL_OR_PASSWORD; both this message.
    assert "Invalid email or password" in rows[0]["errorMessage"]
    others = {a["personaId"] for a in await mana.get("actions")} - {locked["userId"]}
    assert len(others) == len(report.ticks) - 1 == 10

    # Next day, same secret: no new attempt (each would count toward the lockout), but a row says why.
    await mana.post("clock", {"now": "2026-11-26T09:30:00+00:00"})
    await _once(settings)
    logins = [entry["outcome"] for entry in await mana.get("logins") if entry["email"] == locked["email"]]
    assert logins == ["INVALID_CREDENTIALS"]
    rows = [a for a in await mana.get("actions") if a["personaId"] == locked["userId"]]
    assert len(rows) == 2 and rows[1]["errorMessage"].startswith(
        "login: not attempted, refused before with this seed secret"
    )
    # A different secret (the operator fixed the configuration) lifts the block.
    await mana.post("clock", {"now": "2026-11-27T09:30:00+00:00"})
    await _once(mana.settings(tmp_path, persona_seed_secret="another-secret-entirely"))
    logins = [entry["outcome"] for entry in await mana.get("logins") if entry["email"] == locked["email"]]
    assert logins == ["INVALID_CREDENTIALS", "INVALID_CREDENTIALS"]


@pytest.mark.parametrize(
    ("options", "reason"),
    [({"noPersonalSpace": True}, "no personal space"), ({"noAccessToken": True}, "no accessToken")],
)
async def test_login_without_jwt_or_personal_space_is_an_error_row_not_a_guess(
    mana: Mana, tmp_path: Path, options: dict[str, bool], reason: str
) -> None:
    persona = await mana.add_persona("odd", **options)
    await _once(mana.settings(tmp_path))
    rows = [a for a in await mana.get("actions") if a["personaId"] == persona["userId"]]
    assert [(r["toolName"], r["result"]) for r in rows] == [(TICK_ROW, "error")]
    assert reason in rows[0]["errorMessage"]
    assert not [c for c in await mana.get("mcp-calls") if c["userId"] == persona["userId"]]


async def test_503s_on_the_rows_routes_still_land_every_row_exactly_once(mana: Mana, tmp_path: Path) -> None:
    # More failures than one delivery's retries: some batches wait for a later sweep or run.
    await mana.post("faults", {"route": "actions", "status": 503, "count": 7})
    await mana.post("faults", {"route": "feedback", "status": 503, "count": 4, "retryAfter": 0})
    settings = mana.settings(tmp_path, mana_retry_attempts=3)
    first = await _once(settings)
    second = await _once(settings)
    assert second.backlog == 0 and second.ticks == []
    actions, calls = await mana.get("actions"), await mana.get("mcp-calls")
    assert _rows_by_user(actions) == _calls_by_user(calls)
    per_tick = Counter(a["tickId"] for a in actions)
    async with open_runner(settings) as runtime:
        summaries = await runtime.journal.summaries([t for _, t in first.ticks])
    for tick, summary in summaries.items():
        assert per_tick[tick] == summary.ok + summary.errors  # none lost, none doubled by a re-split
    feedback = await mana.get("feedback")
    assert {f["tickId"] for f in feedback} == {t for _, t in first.ticks}


async def test_a_due_outage_fails_the_poll_with_a_clear_error(mana: Mana, tmp_path: Path) -> None:
    await mana.post("faults", {"route": "due", "status": 503, "count": 2})
    with pytest.raises(PollError, match="503"):
        await _once(mana.settings(tmp_path, mana_retry_attempts=2))
    with pytest.raises(PollError, match="401"):
        await _once(mana.settings(tmp_path, mana_service_key="wrong-key"))


class _ExpiresBeforeSecondTurn:
    """A provider whose JWT the sandbox expires (control route) between its first and second call."""

    def __init__(self, world: Mana, user_id: str) -> None:
        self._world = world
        self._user_id = user_id

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        turns = sum(1 for e in transcript if isinstance(e, Turn))
        if turns >= 2:
            return Turn(text="Fertig.", calls=[])
        if turns == 1:
            await self._world.post("jwt/expire", {"userId": self._user_id})
        return Turn(text="", calls=[ToolCall(f"c{turns}", "todo.create", {"title": f"Aufgabe {turns}"})])

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        return RatingReply({"ratings": [{"module": m, "rating": 4, "notes": "ok"} for m in modules]}, "")


async def test_an_expired_jwt_mid_tick_is_renewed_once_and_the_day_goes_on(mana: Mana, tmp_path: Path) -> None:
    # The sandbox's handlers keep the JWT that opened the session, as the real gateway's do: only a
    # new session after the renewal lets the second call succeed.
    settings = mana.settings(tmp_path, persona_concurrency=10)
    async with open_runner(settings, lambda p, t: _ExpiresBeforeSecondTurn(mana, p.user_id)) as runtime:
        report = await run_once(runtime)
    assert report.backlog == 0 and len(report.ticks) == 10
    actions = await mana.get("actions")
    for _, tick in report.ticks:
        rows = [(a["toolName"], a["result"]) for a in actions if a["tickId"] == tick]
        assert rows == [("todo.create", "ok")] * 2  # one tick id, both rows
    logins = Counter(e["email"] for e in await mana.get("logins") if e["outcome"] == "OK" and e["route"] == "login")
    assert all(logins[p.email] == 2 for p, _ in report.ticks)  # the first login and one renewal


async def test_the_anthropic_provider_completes_ticks_through_a_strict_messages_api(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    for name in TOOL_NAMES:  # large answers, however the tools are picked
        await mana.post("tool-faults", {"tool": name, "padTo": 30_000, "count": 1000})
    fake_anthropic.fail_next(status=429, count=2, retry_after=0.01)
    fake_anthropic.fail_next(status=529, count=1, retry_after=0.01)
    settings = mana.settings(
        tmp_path,
        llm_provider="anthropic",
        anthropic_base_url=fake_anthropic.base_url,
        anthropic_api_key="test-anthropic-key",
        anthropic_max_retries=3,
    )
    report = await _once(settings)
    assert report.backlog == 0 and len(report.ticks) == 10
    ok = [x for x in fake_anthropic.exchanges if x.status == 200]
    assert len([x for x in fake_anthropic.exchanges if x.status != 200]) == 3  # overloads were retried by the SDK
    offered = {t["name"] for x in ok for t in x.body["tools"]}
    # The real surface carries no annotations: the policy offers every served tool (contract §5).
    assert offered == {n.replace(".", "_") for n in TOOL_NAMES} | {"submit_ratings"}
    assert all(x.body["system"][0].get("cache_control") for x in ok)
    ratings = [x for x in ok if asked_tool(x.body) == "submit_ratings"]
    # One tool list for every request, the rating's too: sorted, the rating tool last with the breakpoint.
    assert all(x.body["tools"] == ok[0].body["tools"] for x in ok)
    names = [t["name"] for t in ok[0].body["tools"]]
    assert names == [*sorted(names[:-1]), "submit_ratings"] and ok[0].body["tools"][-1]["cache_control"]
    assert len(ratings) == 10 and not any("tool_choice" in x.body for x in ok)
    # The action rows carry the MCP names and the hash of exactly what the model sent.
    sent = Counter(
        (b["name"].replace("_", ".", 1), input_hash(b["input"]))
        for x in ok
        for b in x.response["content"]
        if b["type"] == "tool_use" and b["name"] != "submit_ratings"
    )
    landed = Counter((a["toolName"], a["inputHash"]) for a in await mana.get("actions") if a["toolName"] != TICK_ROW)
    assert landed == sent
    assert len(await mana.get("feedback")) >= 10
    # What goes back to the model is bounded, however large the tool's answer (30 000 characters here).
    results = [
        block["content"]
        for x in ok
        for message in x.body["messages"]
        if isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_result"
    ]
    assert results and max(len(r) for r in results) <= MAX_RESULT_CHARS + 100


async def test_invented_tools_and_prose_ratings_are_recorded_not_lost(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    def brain(body: dict[str, Any]) -> Any:
        if asked_tool(body):
            return [{"type": "text", "text": "Ich gebe allem fünf Sterne!"}], "end_turn"
        if len(body["messages"]) == 1:
            return [
                {"type": "tool_use", "id": "toolu_x0", "name": "todo_list", "input": {}},
                {"type": "tool_use", "id": "toolu_x1", "name": "calendar_create", "input": {"when": "morgen"}},
                {"type": "tool_use", "id": "toolu_x2", "name": "todo_create", "input": {"title": "Zahnarzt"}},
            ], "tool_use"
        return default_brain({**body, "tools": []})

    fake_anthropic.brain = brain
    await mana.post("tool-faults", {"tool": "todo.list", "padTo": 300_000})
    persona = await mana.add_persona("inventor")
    await mana.post("clock", {"now": "2026-11-29T09:30:00+00:00"})  # a Sunday: only daily/hourly personas
    settings = mana.settings(
        tmp_path, llm_provider="anthropic", anthropic_base_url=fake_anthropic.base_url, anthropic_api_key="k-test"
    )
    await _once(settings)
    rows = [a for a in await mana.get("actions") if a["personaId"] == persona["userId"]]
    assert [(r["toolName"], r["result"]) for r in rows] == [
        ("todo.list", "ok"),
        ("calendar_create", "error"),
        ("todo.create", "ok"),
    ]
    calls = [c["tool"] for c in await mana.get("mcp-calls") if c["userId"] == persona["userId"]]
    assert calls == ["todo.list", "todo.create"]  # the invented tool never reached Mana
    # The ~300 KB answer went back to the model cut to the bound.
    answer = next(
        b["content"]
        for x in fake_anthropic.exchanges
        for m in x.body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("tool_use_id") == "toolu_x0"
    )
    assert len(answer) <= MAX_RESULT_CHARS + 100 and "more characters cut" in answer
    feedback = [f for f in await mana.get("feedback") if f["personaId"] == persona["userId"]]
    assert [(f["module"], f["rating"], f["notes"]) for f in feedback] == [("__parse", 3, "Ich gebe allem fünf Sterne!")]


async def test_a_tick_failing_before_any_tool_call_is_retried_then_closed_with_its_reason(
    mana: Mana, tmp_path: Path
) -> None:
    await mana.post("faults", {"route": "mcp", "status": 503, "count": 1000})
    settings = mana.settings(tmp_path, persona_max_attempts=2, persona_retry_base_s=0, mana_retry_attempts=1)
    first = await _once(settings)
    assert first.ticks and await mana.get("actions") == []  # deferred: nothing happened in Mana yet
    second = await _once(settings)
    assert {t for _, t in second.ticks} == {t for _, t in first.ticks}  # the same tick ids, run again
    third = await _once(settings)
    assert third.ticks == []
    actions = await mana.get("actions")
    assert Counter(a["personaId"] for a in actions) == Counter(p.user_id for p, _ in first.ticks)
    assert all(a["toolName"] == TICK_ROW and a["result"] == "error" and "503" in a["errorMessage"] for a in actions)
    logins = Counter(e["email"] for e in await mana.get("logins") if e["route"] == "login")
    assert set(logins.values()) == {2}  # one login per attempt, two attempts
    signins = Counter(e["email"] for e in await mana.get("logins") if e["route"] == "signin")
    assert set(signins.values()) == {1}  # the space was remembered by the first attempt


class _Dawdler:
    """Calls a tool at once, then every 0.5 s, and never stops (15 turns outlast 3 s): only the timeout ends its day."""

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        if transcript:
            await asyncio.sleep(0.5)
        return Turn(text="", calls=[ToolCall(f"c{len(transcript)}", "mood.today", {})])

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        raise AssertionError("a timed-out tick is not rated")


async def test_a_tick_timeout_keeps_what_was_done_and_says_why(mana: Mana, tmp_path: Path) -> None:
    # The deadline covers sign-in and the MCP session too: ten of them at once on a busy machine took
    # most of 1.2 s, so a tick could time out before its first call. 3 s leaves room for a day.
    settings = mana.settings(tmp_path, persona_tick_timeout_s=3, persona_concurrency=10)
    async with open_runner(settings, lambda p, t: _Dawdler()) as runtime:
        report = await run_once(runtime)
    assert report.backlog == 0
    actions = await mana.get("actions")
    for _, tick in report.ticks:
        rows = [a for a in actions if a["tickId"] == tick]
        assert [r["toolName"] for r in rows[:-1]] == ["mood.today"] * (len(rows) - 1) and len(rows) >= 2
        assert (rows[-1]["toolName"], rows[-1]["errorMessage"]) == (TICK_ROW, "timeout: tick exceeded 3s during play")
    # A call cut by the timeout is an error row "outcome unknown": it may or may not have reached Mana.
    calls = Counter(c["userId"] for c in await mana.get("mcp-calls"))
    tools = [a for a in actions if a["toolName"] != TICK_ROW]
    cut = [a for a in tools if (a.get("errorMessage") or "").startswith("outcome unknown")]
    assert {a["errorMessage"] for a in cut} <= {"outcome unknown: the tick timed out during the call"}
    assert Counter(a["personaId"] for a in tools if a not in cut) <= calls <= Counter(a["personaId"] for a in tools)


async def test_a_bad_row_in_due_is_skipped_with_its_reason() -> None:
    import socket

    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from runner.mana.errors import RetryPolicy
    from runner.mana.personas_api import PersonasApi

    good = {"userId": "u1", "email": "persona.a@mana.test", "tickCadence": "daily", "moduleMix": {"todo": 1}}
    rows = [good, {"userId": "u2", "email": "persona.b@mana.test", "tickCadence": "monthly"}, "garbage", {"email": "x"}]

    async def due(_: Any) -> JSONResponse:
        return JSONResponse({"personas": rows, "serverTime": "2026-11-25T10:00:00.000Z"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/p/due", due)]), log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as http:
            api = PersonasApi(http, f"http://127.0.0.1:{sock.getsockname()[1]}", "k", RetryPolicy(1), "/p")
            listed = await api.due()
    finally:
        server.should_exit = True
        await task
    assert [p.user_id for p in listed.personas] == ["u1"]
    assert listed.server_time.isoformat() == "2026-11-25T10:00:00+00:00"
    assert len(listed.skipped) == 3 and listed.skipped[0].startswith("row 1: tickCadence")


async def test_a_model_outage_before_any_tool_call_defers_the_tick_instead_of_failing_it(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.fail_next(status=529, count=1)
    settings = mana.settings(
        tmp_path,
        llm_provider="anthropic",
        anthropic_base_url=fake_anthropic.base_url,
        anthropic_api_key="k-test",
        anthropic_max_retries=0,
        persona_retry_base_s=0,
        persona_concurrency=1,
    )
    first = await _once(settings)
    landed = {a["personaId"] for a in await mana.get("actions")}
    assert len(landed) == len(first.ticks) - 1  # the overloaded persona left no trace yet
    second = await _once(settings)
    assert len(second.ticks) == 1 and second.ticks[0][0].user_id not in landed
    actions = await mana.get("actions")
    assert {a["personaId"] for a in actions} == {p.user_id for p, _ in first.ticks}
    assert not [a for a in actions if a["toolName"] == TICK_ROW]
