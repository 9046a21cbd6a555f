"""What the personas found: findings, trends and totals over several days on the sandbox, with its clock
moved day by day; finding ids that do not depend on the order of failures nor survive only until a prune."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import struct
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SEED_SECRET, SERVICE_KEY, Mana, open_runner
from procs import MCP_SURFACE

from runner import report
from runner.dispatch import run_once
from runner.journal import Journal
from runner.journal.rollup import finding_key, normalise
from runner.persona import ActionRow, FeedbackRow
from runner.sandbox import Sandbox, SandboxConfig

FAILING = "journal.add"
# The real gateway's words for today's mana-sync failure (issue 14).
SYNC_FAILURE = "Cannot read properties of undefined (reading 'filter')"
DAYS = 8
# Eight, so that a module whose ratings hold (4 or 5 at random) has about 24 on each side of the trend:
# a chance drop of 0.5 is then more than three standard deviations away.
PERSONAS = 8
THRESHOLDS = report.Thresholds(recent_days=3, prior_days=3, regression_drop=0.5, min_ratings=5, gone_after=3)


def _day(n: int) -> date:
    """Day n of the run (1-based); day DAYS is today, so the command line's period covers the run."""
    return datetime.now(UTC).date() - timedelta(days=DAYS - n)


@dataclass
class Run:
    journal_path: Path
    failing_by_day: dict[int, int]  # failing calls of FAILING the sandbox answered, per day
    reports: dict[str, dict[str, Any]]  # reports made as the days went by
    calls: list[dict[str, Any]]  # what the sandbox recorded, at the end
    feedback: list[dict[str, Any]]


async def _report(journal_path: Path, days: int, until: date, thresholds: report.Thresholds = THRESHOLDS) -> Any:
    journal = await Journal.open(journal_path, read_only=True)
    try:
        return await report.build(journal, report.period_of(days, until), thresholds)
    finally:
        await journal.close()


async def _failing_calls(mana: Mana) -> int:
    return sum(1 for c in await mana.get("mcp-calls") if c["tool"] == FAILING and c["isError"])


async def _eight_days(tmp: Path) -> Run:
    cast = [
        {
            "name": f"reporter{i}",
            "archetype": "test",
            "systemPrompt": "Du bist eine Testperson.",
            "moduleMix": {"journal": 0.5, "mood": 0.5, "gardening": 0.1},
            "tickCadence": "daily",
        }
        for i in range(PERSONAS)
    ]
    (tmp / "cast.json").write_text(json.dumps(cast))
    config = SandboxConfig(
        db_path=str(tmp / "sandbox.db"),
        seed_secret=SEED_SECRET,
        service_key=SERVICE_KEY,
        mcp_surface=MCP_SURFACE,
        personas_file=tmp / "cast.json",
    )
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=30) as control:
        mana = Mana(sandbox, config, control)
        settings = mana.settings(tmp)
        failing: dict[int, int] = {}
        reports: dict[str, dict[str, Any]] = {}
        for n in range(1, DAYS + 1):
            await mana.post("clock", {"now": f"{_day(n).isoformat()}T09:00:00+00:00"})
            if n == 4:
                await mana.post("tool-faults", {"tool": FAILING, "message": SYNC_FAILURE, "count": 100_000})
            if n == 7:
                await mana.post("tool-faults", {"tool": FAILING, "message": SYNC_FAILURE, "count": 0})
            before = await _failing_calls(mana)
            async with open_runner(settings) as runtime:
                done = await run_once(runtime)
            assert len(done.ticks) == PERSONAS and done.backlog == 0
            failing[n] = await _failing_calls(mana) - before
            if n in (4, 5):
                reports[f"day{n}"] = await _report(settings.runner_state_path, 1, _day(n))
        return Run(
            settings.runner_state_path, failing, reports, await mana.get("mcp-calls"), await mana.get("feedback")
        )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Eight days of eight personas who log their mood and write their journal; journal.add fails on days 4 to 6."""
    return asyncio.run(_eight_days(tmp_path_factory.mktemp("report")))


def _only_finding(found: dict[str, Any]) -> dict[str, Any]:
    of_tool = [f for f in found["findings"] if f["tool"] == FAILING]
    assert len(of_tool) == 1, of_tool
    return of_tool[0]


async def test_a_tool_failing_from_day_four_is_one_finding_new_then_ongoing_then_gone(run: Run) -> None:
    assert run.failing_by_day[4] > 0 and run.failing_by_day[5] > 0, "the personas must have met the failure"
    day4 = _only_finding(run.reports["day4"])
    assert (day4["status"], day4["first_seen"], day4["cause_class"]) == ("new", _day(4).isoformat(), "handler")
    assert day4["calls"] == run.failing_by_day[4]
    assert day4["cause"] == f"Tool {FAILING} failed: Cannot read properties of undefined (reading <value>)"
    day5 = _only_finding(run.reports["day5"])
    assert (day5["status"], day5["id"], day5["calls"]) == ("ongoing", day4["id"], run.failing_by_day[5])

    # Days 7 and 8: the failure is off and the tool succeeds again, at least gone_after times.
    calls = run.calls
    last_failure = max(i for i, c in enumerate(calls) if c["tool"] == FAILING and c["isError"])
    successes_after = sum(1 for c in calls[last_failure:] if c["tool"] == FAILING and not c["isError"])
    assert successes_after >= THRESHOLDS.gone_after
    whole = await _report(run.journal_path, DAYS, _day(DAYS))
    gone = _only_finding(whole)
    assert (gone["status"], gone["id"], gone["last_seen"]) == ("gone", day4["id"], _day(6).isoformat())
    assert gone["calls"] == sum(run.failing_by_day.values())
    assert [n for n, failed in run.failing_by_day.items() if failed] == [4, 5, 6]
    met = {c["userId"] for c in calls if c["tool"] == FAILING and c["isError"]}
    assert gone["personas"] == len(met) and gone["example"]["input_hash"]
    # Until it has succeeded gone_after times, it is not gone; seen before the period, it is not new.
    stricter = dataclasses.replace(THRESHOLDS, gone_after=successes_after + 1)
    last_three = _only_finding(await _report(run.journal_path, 3, _day(DAYS), stricter))
    assert (last_three["status"], last_three["calls"]) == ("ongoing", run.failing_by_day[6])


async def test_a_module_whose_ratings_drop_is_a_regression_and_one_that_holds_is_not(run: Run) -> None:
    # At the end of day 6: days 4-6 (journal.add failing) against days 1-3.
    found = await _report(run.journal_path, 6, _day(6))
    modules = {m["module"]: m for m in found["modules"]}
    journal, mood = modules["journal"]["trend"], modules["mood"]["trend"]
    assert journal["recent_n"] >= 5 and journal["prior_n"] >= 5
    assert journal["regression"] and journal["delta"] <= -0.5, journal
    assert mood["recent_n"] >= 5 and mood["prior_n"] >= 5
    assert not mood["regression"], mood
    # Without enough ratings on both sides nothing is flagged, whatever the drop.
    wary = dataclasses.replace(THRESHOLDS, min_ratings=journal["recent_n"] + 1)
    assert not {m["module"]: m for m in (await _report(run.journal_path, 6, _day(6), wary))["modules"]}["journal"][
        "trend"
    ]["regression"]


async def test_report_totals_equal_what_the_sandbox_recorded(run: Run) -> None:
    found = await _report(run.journal_path, DAYS, _day(DAYS))
    calls = run.calls
    per_tool = Counter(c["tool"] for c in calls)
    errors = Counter(c["tool"] for c in calls if c["isError"])
    assert {t["tool"]: t["calls"] for t in found["tools"]} == dict(per_tool)
    assert {t["tool"]: t["errors"] for t in found["tools"]} == {t: errors.get(t, 0) for t in per_tool}
    rated = Counter(f["module"] for f in run.feedback)
    assert {m["module"]: m["rating_n"] for m in found["modules"] if m["rating_n"]} == dict(rated)
    sums = Counter({module: 0.0 for module in rated})
    for f in run.feedback:
        sums[f["module"]] += f["rating"]
    assert {m["module"]: m["rating_mean"] for m in found["modules"] if m["rating_n"]} == {
        module: round(sums[module] / n, 3) for module, n in rated.items()
    }
    ticks = {m["module"]: m["ticks"] for m in found["modules"]}
    assert ticks["journal"] <= DAYS * PERSONAS and ticks["mood"] <= DAYS * PERSONAS
    assert sum(p["ticks"] for p in found["personas"]) == DAYS * PERSONAS
    assert all(p["last_tick"]["window"] == _day(DAYS).isoformat() for p in found["personas"])
    assert all(t["latency_ms_p50"] is not None and t["latency_ms_p95"] >= t["latency_ms_p50"] for t in found["tools"])
    coverage = found["coverage"]
    assert coverage["served"] == 33 and coverage["exercised"] == len(per_tool)
    assert set(coverage["never_called"]) == {*coverage["never_called"]} and FAILING not in coverage["never_called"]
    assert coverage["demand_without_tool"] == ["gardening"]
    assert found["notes"] and found["notes"][0]["rating"] == min(f["rating"] for f in run.feedback)


# --- Finding ids: a pure function of (tool or stage, normalised cause) ---------------------------


def test_normalising_takes_out_ids_uuids_numbers_and_quoted_values() -> None:
    variants = [
        "Tool todo.complete failed: todo 3f2b8c1e-8d4a-4c1e-9f2a-3d4b5c6e7f80 not found after 120 ms",
        "Tool todo.complete failed: todo 0b8d3b7c-1111-4c1e-9f2a-000000000000 not found after 7 ms",
        "Tool todo.complete failed: todo HWItnb7UXVoiKyH9EgP9FTXXR4osEPfe not found after 3.5 ms",
    ]
    assert {finding_key("todo.complete", v)[0] for v in variants} == {finding_key("todo.complete", variants[0])[0]}
    assert normalise("list 'abc' failed with \"x 1\" and `y`") == "list <value> failed with <value> and <value>"
    # Another tool, or another cause, is another finding.
    assert finding_key("todo.list", variants[0])[0] != finding_key("todo.complete", variants[0])[0]
    assert (
        finding_key("todo.complete", "Tool todo.complete failed: timeout")[0]
        != finding_key("todo.complete", variants[0])[0]
    )
    assert finding_key("x.y", "Invalid arguments for tool x.y: title: Required")[2] == "schema"
    assert finding_key("x.y", "Tool x.y not allowed: rate-limit-exceeded")[2] == "policy"
    assert finding_key("__tick:login", "login: 401 Unauthorized")[2] == "session"
    assert finding_key("__tick:play", "timeout: tick exceeded 600s during play")[2] == "transport"
    assert finding_key("__parse", "rating failed: no JSON")[2] == "model"
    # A probe's verdict: a canary that came back is a scope leak; an unreadable shared space is not
    # (and a `space` in its words must not make it a sign-in problem).
    leak = "scope leak: todo.list in space Fam returned persona-probe 1a2b3c4d5e6f"
    assert finding_key("__probe", leak)[2] == "scope"
    assert finding_key("__probe", "shared space unreadable: notes.search failed")[2] == "handler"


# Failures as (persona, window, [(tool, ok, error)]), the same set of problems with other ids and numbers.
_TICKS = [
    (
        "p1",
        "2026-11-20",
        [("todo.list", False, "Tool todo.list failed: pull 'u1' failed after 12 ms"), ("mood.log", True, None)],
    ),
    ("p2", "2026-11-21", [("todo.list", False, "Tool todo.list failed: pull 'u2' failed after 99 ms")]),
    ("p3", "2026-11-21", [("todo.create", False, "Invalid arguments for tool todo.create: title: Required")]),
    ("p1", "2026-11-22", [("mood.log", False, "Tool mood.log failed: row 42 locked")]),
]


async def _play(journal: Journal, order: list[int]) -> None:
    """The ticks of _TICKS through the journal's own write path, in the given order."""
    for i in order:
        persona, window, calls = _TICKS[i]
        tick_id = f"{persona}-{window}"
        assert await journal.claim(persona, window, tick_id) is not None
        for seq, (tool, ok, error) in enumerate(calls):
            await journal.begin_call(tick_id, seq, tool, f"{seq:016x}")
            await journal.end_call(tick_id, seq, ok, error, 10 + seq)
        await journal.save_ratings(tick_id, [FeedbackRow("todo", 2, "slow")])
        failed = any(not ok for _, ok, _ in calls)
        assert await journal.seal(tick_id, "ok", None if failed else ActionRow("__tick", "ok"))


async def _ids(journal: Journal) -> dict[str, tuple[str, int, int]]:
    found = await report.build(journal, report.Period(date(2026, 11, 1), date(2026, 11, 30)), THRESHOLDS)
    return {f["id"]: (f["tool"], f["calls"], f["personas"]) for f in found["findings"]}


async def test_finding_ids_are_the_same_in_two_journals_in_any_order_and_after_a_prune(
    tmp_path: Path, pg_url: str
) -> None:
    forward = await Journal.open(tmp_path / "forward.db")
    backward = await Journal.open(pg_url)  # the other kind too: upserts and ordering on PostgreSQL
    try:
        await _play(forward, [0, 1, 2, 3])
        await _play(backward, [3, 2, 1, 0])
        ids = await _ids(forward)
        assert len(ids) == 3 and ids == await _ids(backward)
        assert sorted(ids.values()) == [("mood.log", 1, 1), ("todo.create", 1, 1), ("todo.list", 2, 2)]
        # Pruning forgets the raw ticks (once delivered), never the findings.
        for journal in (forward, backward):
            for batch in await journal.pending_batches():
                await journal.mark_batch(batch.id, "delivered", None)
            assert await journal.prune(older_than_s=-1) == len(_TICKS)
            assert [await journal.tick_state(f"{p}-{w}") for p, w, _ in _TICKS] == [None] * len(_TICKS)
            assert await _ids(journal) == ids
    finally:
        await forward.close()
        await backward.close()


# --- The command line: one JSON object, a page a real browser draws, one line for bad input ---------------


def _cli(*args: str, journal: Path | str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "RUNNER_", "REPORT_"))}
    env.update(RUNNER_STATE_PATH=str(journal), LOG_FORMAT="json", REPORT_GONE_AFTER=str(THRESHOLDS.gone_after))
    return subprocess.run(
        [sys.executable, "-m", "runner", "report", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=120
    )


def test_report_json_has_the_issues_keys_and_the_journals_findings(run: Run, tmp_path: Path) -> None:
    done = _cli("--since", f"{DAYS}d", "--json", journal=run.journal_path, tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {"findings", "modules", "tools", "coverage", "personas", "period"} <= set(found)
    assert found["period"] == {"since": _day(1).isoformat(), "until": _day(DAYS).isoformat()}
    finding = _only_finding(found)
    assert set(finding) >= {"id", "tool", "cause", "status", "first_seen", "last_seen", "calls", "ticks", "personas"}
    assert finding["status"] == "gone" and finding["example"]["error"].endswith(SYNC_FAILURE)
    module = found["modules"][0]
    assert set(module) >= {"module", "ticks", "calls", "errors", "error_rate", "rating_mean", "rating_n", "trend"}
    assert set(module["trend"]) >= {"recent_mean", "prior_mean", "delta", "regression"}
    assert set(found["tools"][0]) >= {"tool", "calls", "errors", "error_rate", "latency_ms_p50", "latency_ms_p95"}
    assert set(found["coverage"]) >= {"served", "exercised", "share", "never_called"}
    # On a terminal's place: tables, with the finding in them.
    tables = _cli("--since", f"{DAYS}d", journal=run.journal_path, tmp=tmp_path)
    assert tables.returncode == 0 and "Findings" in tables.stdout and finding["id"] in tables.stdout


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--since", "yesterday"), "--since 'yesterday': expected a number of days or weeks"),
        (("--since", "0d"), "--since '0d'"),
        (("--html", "/nonexistent-dir/report.html"), "--html /nonexistent-dir/report.html: cannot write"),
    ],
)
def test_bad_report_options_are_one_line_and_exit_two(
    run: Run, tmp_path: Path, args: tuple[str, ...], problem: str
) -> None:
    done = _cli(*args, journal=run.journal_path, tmp=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip()[7:]}"]
    assert problem in done.stderr and "Traceback" not in done.stderr


def test_a_journal_that_is_not_a_runner_journal_is_one_line_and_exit_two(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all\n" * 100)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    for path, problem in (
        (text, "file is not a database"),
        (other, "not a runner journal"),
        (tmp_path / "missing.db", "no such file"),
    ):
        done = _cli(journal=path, tmp=tmp_path)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and problem in done.stderr, done.stderr
    assert not (tmp_path / "missing.db").exists(), "a report never creates a journal"


def test_the_page_renders_in_a_real_headless_browser_with_its_charts(run: Run, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    done = _cli("--since", f"{DAYS}d", "--html", str(page), journal=run.journal_path, tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html, "self-contained"
    browser = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr"]
    shot = tmp_path / "shot.png"
    drawn = subprocess.run(
        [*browser, "--window-size=1000,1600", f"--screenshot={shot}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    console = [line for line in drawn.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    dom = drawn.stdout
    # Every module's rating on every day it was rated is a point; every tool a bar.
    points = sum(
        len(days)
        for days in json.loads(_cli("--since", f"{DAYS}d", "--json", journal=run.journal_path, tmp=tmp_path).stdout)[
            "ratings_by_day"
        ].values()
    )
    assert points > DAYS and dom.count('class="point"') == points
    assert dom.count('class="bar"') == len(set(c["tool"] for c in run.calls))
    assert _distinct_pixels(shot) > 16, "the screenshot is blank"


def _distinct_pixels(png: Path) -> int:
    """Distinct byte values in a PNG's pixel data: a blank page has two (white and the row filter)."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat = 8, b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            idat += data[at + 8 : at + 8 + length]
        at += 12 + length
    return len(set(zlib.decompress(idat)))


async def test_a_tick_sealed_by_recovery_reaches_the_rollup_and_the_findings(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    dead = await Journal.open(path)
    assert await dead.claim("p1", "2026-11-20", "t1") is not None
    await dead.begin_call("t1", 0, "todo.list", "00000000000000aa")  # pending when the process dies
    await dead.close()
    alive = await Journal.open(path)
    try:
        assert await alive.recover() == ["t1"]
        found = await report.build(alive, report.Period(date(2026, 11, 20), date(2026, 11, 20)), THRESHOLDS)
    finally:
        await alive.close()
    by_tool = {f["tool"]: f for f in found["findings"]}
    assert set(by_tool) == {"todo.list", "__tick:interrupted"}
    assert by_tool["todo.list"]["cause"] == "outcome unknown: runner stopped during the call"
    assert {f["cause_class"] for f in by_tool.values()} == {"transport"}
    assert [(t["tool"], t["calls"], t["errors"]) for t in found["tools"]] == [("todo.list", 1, 1)]
    assert found["personas"][0]["last_tick"]["outcome"] == "interrupted"
