"""Scope probes (issue 15) on what the sandbox received: on Mana as it is, a probe names the read tools
that do not filter by space (todo.list, notes.search, habits.list, mood.*) and not the filtered ones
(me, wardrobe, comic, augur), and the positive check fails; with the isolating switch the same probe
finds no leak and the positive check passes. A probe writes only into the persona's own spaces, leaves
nothing a tool could remove, and runs once per window for a persona with a shared space."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog.testing
from conftest import WEEKDAY, Mana, open_runner
from family import ANNA, BEN
from test_sandbox import jwt_for, mcp_session, result_json

from runner import metrics
from runner.dispatch import run_once
from runner.journal import Journal
from runner.persona import LEAK_PREFIX, PROBE_TOOL
from runner.probe import READERS, UNREADABLE_PREFIX, WRITERS
from runner.report import Thresholds, build, period_of
from runner.tick import probe_now

UNFILTERED = {"todo.list", "notes.search", "habits.list", "mood.today", "mood.recent"}
FILTERED_MODULES = ("me", "wardrobe", "comic", "augur")
WRITES = {w.tool for w in WRITERS} | {w.undo[0] for w in WRITERS if w.undo}


def leaks_counted() -> float:
    return sum(s.value for m in metrics.SCOPE_LEAKS.collect() for s in m.samples if s.name.endswith("_total"))


async def probe_anna(world: Mana, tmp_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """One on-demand probe for Anna; the verdict and the action rows the API received for it."""
    async with open_runner(world.settings(tmp_path)) as runtime:
        verdict = await probe_now(runtime.tick_deps, ANNA)
        assert await runtime.outbox.flush() == 0
    return verdict, await world.get("actions")


async def test_on_mana_as_it_is_a_probe_names_the_unfiltered_tools(plan: Mana, tmp_path: Path) -> None:
    before = leaks_counted()
    # The log line as structlog emits it: what stderr shows depends on which test configured logging last.
    with structlog.testing.capture_logs() as logged:
        verdict, rows = await probe_anna(plan, tmp_path)
    leaked = {leak.tool for leak in verdict.leaks}
    assert leaked == UNFILTERED
    assert {leak.space.slug for leak in verdict.leaks} == {"familie-schmidt"}
    assert all("persona-probe" in leak.evidence for leak in verdict.leaks)
    assert not any(tool.startswith(FILTERED_MODULES) for tool in leaked)
    # … although their modules got canaries too, and were read there without failing.
    cast = {p["email"]: p for p in await plan.get("personas")}
    family = next(s["id"] for s in cast[ANNA]["spaces"] if s["type"] == "family")
    anna = [c for c in await plan.get("mcp-calls") if c["userId"] == cast[ANNA]["userId"]]
    assert all(not c["isError"] for c in anna if c["tool"] in ("wardrobe.createOutfit", "comic.createStory"))
    read_there = {c["tool"]: c["isError"] for c in anna if c["spaceId"] == family and c["tool"] in READERS}
    assert set(read_there) == set(READERS)
    assert not any(failed for tool, failed in read_there.items() if tool.startswith(FILTERED_MODULES))
    # The positive check fails as §8 observed: Anna's encrypted note breaks Ben's notes.search there.
    [unreadable] = verdict.unreadable
    assert "notes.create canary in familie-schmidt not visible to persona.ben@mana.test" in unreadable
    assert "operation-specific reason" in unreadable

    # Every probe call is an ordinary row, then one verdict row, classified by its prefix.
    assert [r["toolName"] for r in rows][-1] == PROBE_TOOL
    verdict_row = rows[-1]
    assert verdict_row["result"] == "error" and verdict_row["errorMessage"].startswith(f"{LEAK_PREFIX} ")
    assert f"| {UNREADABLE_PREFIX} " in verdict_row["errorMessage"]
    calls = [r for r in rows if r["toolName"] != PROBE_TOOL]
    assert len(calls) == verdict.calls == len(await plan.get("mcp-calls"))
    assert leaks_counted() - before == len(UNFILTERED)
    [line] = [e for e in logged if e["event"] == "scope leak: a shared space shows personal data"]
    assert line["log_level"] == "error" and len(line["leaks"]) == len(UNFILTERED)
    # The report makes the leak a finding of its own class, filed under today.
    settings = plan.settings(tmp_path)
    journal = await Journal.open(settings.runner_state_path, own=False)
    try:
        report = await build(journal, period_of(1, datetime.now(UTC).date()), Thresholds.of(settings))
    finally:
        await journal.close()
    [finding] = [f for f in report["findings"] if f["tool"] == PROBE_TOOL]
    assert finding["cause_class"] == "scope" and finding["status"] == "new" and finding["calls"] == 1


async def test_with_isolation_no_leak_and_the_positive_check_passes(isolated_plan: Mana, tmp_path: Path) -> None:
    before = leaks_counted()
    verdict, rows = await probe_anna(isolated_plan, tmp_path)
    assert verdict.ok and verdict.leaks == [] and verdict.unreadable == []
    assert rows[-1]["toolName"] == PROBE_TOOL and rows[-1]["result"] == "ok" and rows[-1]["errorMessage"] is None
    assert leaks_counted() == before
    # Ben did read the family space, and found Anna's canary there.
    cast = {p["email"]: p["userId"] for p in await isolated_plan.get("personas")}
    ben_reads = [c for c in await isolated_plan.get("mcp-calls") if c["userId"] == cast[BEN]]
    assert [c["tool"] for c in ben_reads] == ["notes.search"] and not ben_reads[0]["isError"]


async def test_a_probe_writes_only_in_its_own_spaces_and_leaves_nothing_a_tool_could_remove(
    plan: Mana, tmp_path: Path
) -> None:
    await probe_anna(plan, tmp_path)
    cast = {p["email"]: p for p in await plan.get("personas")}
    own = {s["id"] for s in cast[ANNA]["spaces"]}
    calls = await plan.get("mcp-calls")
    writes = [c for c in calls if c["tool"] in WRITES]
    assert writes and all(c["userId"] == cast[ANNA]["userId"] and c["spaceId"] in own for c in writes)
    assert all(c["tool"] in READERS for c in calls if c["userId"] != cast[ANNA]["userId"])  # Ben only reads
    undone = [c["tool"] for c in writes if c["tool"] in ("todo.complete", "habits.archive", "augur.resolveSign")]
    assert sorted(undone) == ["augur.resolveSign", "habits.archive", "todo.complete"]

    # What a tool could remove is gone from what Anna sees: no open todo, active habit or open sign.
    personal = next(s["id"] for s in cast[ANNA]["spaces"] if s["type"] == "personal")
    async with mcp_session(plan.sandbox, await jwt_for_plan(plan, ANNA), personal) as client:
        for tool in ("todo.list", "habits.list", "augur.listOpenSigns"):
            assert "persona-probe" not in str(result_json(await client.call_tool(tool, {}))), tool


async def jwt_for_plan(world: Mana, email: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        return await jwt_for(http, world.sandbox, email)


async def test_in_ticks_one_probe_per_window_for_a_persona_with_a_shared_space(plan: Mana, tmp_path: Path) -> None:
    solo = {"name": "carl", "archetype": "t", "systemPrompt": "Du.", "moduleMix": {"notes": 1}, "tickCadence": "daily"}
    await plan.post("personas", {**solo, "extraSpace": "none"})  # no shared space: never probed
    settings = plan.settings(tmp_path, persona_scope_probe=True)
    ticks: list[tuple[str, str]] = []
    async with open_runner(settings) as runtime:
        for day in range(2):
            now = datetime.fromisoformat(WEEKDAY) + timedelta(days=day)
            await plan.post("clock", {"now": now.isoformat()})
            report = await run_once(runtime)
            assert report.backlog == 0
            ticks += [(p.email, t) for p, t in report.ticks]
    rows = await plan.get("actions")
    probes: dict[str, int] = {}
    for email, tick_id in ticks:
        mine = [r for r in rows if r["tickId"] == tick_id]
        probes[email] = probes.get(email, 0) + sum(1 for r in mine if r["toolName"] == PROBE_TOOL)
        if email != "persona.carl@mana.test":
            verdict_at = [r["toolName"] for r in mine].index(PROBE_TOOL)
            # The probe's calls come first, then its verdict, then the persona's day.
            assert all(r["toolName"] in READERS or r["toolName"] in WRITES for r in mine[:verdict_at])
    assert probes == {ANNA: 2, BEN: 2, "persona.carl@mana.test": 0}


async def test_on_demand_a_persona_without_a_shared_space_is_not_probed_and_gets_no_tick(
    plan: Mana, tmp_path: Path
) -> None:
    solo = {"name": "dora", "archetype": "t", "systemPrompt": "Du.", "moduleMix": {"notes": 1}, "tickCadence": "daily"}
    await plan.post("personas", {**solo, "extraSpace": "none"})
    async with open_runner(plan.settings(tmp_path)) as runtime:
        assert await probe_now(runtime.tick_deps, "persona.dora@mana.test") is None
        assert await runtime.outbox.flush() == 0
    assert await plan.get("actions") == [] and await plan.get("mcp-calls") == []
