"""Cost per tick and the daily budgets, with real parts: the sandbox, the anthropic SDK against the
stand-in that prices and caches as the Messages API does, and a real PostgreSQL shared by two replicas.

The two replicas of the fleet test are two runtimes with their own journal connections and replica
ids in this one process (separate processes would only add start-up time): they meet in the
database alone, as separate processes do.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from anthropic.types import Usage
from conftest import Mana
from fake_anthropic import FakeAnthropic, asked_tool, default_brain
from rich.console import Console

from runner import metrics
from runner.agent.loop import Entry, Provider, RatingReply, ToolDef, Turn
from runner.cost import DEFAULT_PRICES_FILE, cost_usd, load_prices
from runner.dispatch import Dispatcher, run_once
from runner.journal import Budget
from runner.persona import DuePersona
from runner.report import Thresholds, build, period_of, render, render_status, status
from runner.report_page import page
from runner.runtime import Runtime, open_runtime, provider_factory
from runner.schema import cost_days, model_calls, ticks
from runner.server import build_app
from runner.settings import Settings

MODEL = "claude-haiku-4-5"
PRICE = load_prices(DEFAULT_PRICES_FILE).models[MODEL]


def _priced(exchange: Any) -> float:
    return cost_usd(Usage.model_validate(exchange.response["usage"]), PRICE)


class _Naming:
    """The runner's own provider, noting which tick sent which system prompt: the stand-in's records
    carry the prompt, not the tick, and each persona's prompt differs."""

    def __init__(self, inner: Provider, tick_id: str, ticks_by_prompt: dict[str, str]) -> None:
        self._inner, self._tick_id, self._ticks = inner, tick_id, ticks_by_prompt

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        self._ticks[system] = self._tick_id
        return await self._inner.next_turn(system, tools, transcript)

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        return await self._inner.rate(system, tools, transcript, prompt, modules)


@asynccontextmanager
async def naming_runtime(settings: Settings, ticks_by_prompt: dict[str, str]) -> AsyncIterator[Runtime]:
    async with provider_factory(settings) as chosen:

        def naming(persona: DuePersona, tick: str) -> Provider:
            return _Naming(chosen(persona, tick), tick, ticks_by_prompt)

        async with open_runtime(settings, naming) as runtime:
            yield runtime


def _claude(mana: Mana, tmp_path: Path, fake: FakeAnthropic, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        llm_provider="anthropic", anthropic_model=MODEL, anthropic_base_url=fake.base_url, anthropic_api_key="k-test"
    )
    values.update(overrides)
    return mana.settings(tmp_path, **values)


async def _rows(runtime: Runtime, query: sa.Select[Any]) -> list[Any]:
    async with runtime.journal.reading() as conn:
        return list((await conn.execute(query)).all())


def _by_tick(fake: FakeAnthropic, ticks_by_prompt: dict[str, str]) -> dict[str, list[Any]]:
    """The stand-in's own answers (200s), grouped by the tick that asked."""
    out: dict[str, list[Any]] = defaultdict(list)
    for x in fake.exchanges:
        if x.status == 200:
            out[ticks_by_prompt[x.body["system"][0]["text"]]].append(x)
    return out


async def test_a_ticks_cost_is_the_priced_usage_the_model_reported_call_by_call(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    settings = _claude(mana, tmp_path, fake_anthropic, persona_concurrency=4)
    ticks_by_prompt: dict[str, str] = {}
    async with naming_runtime(settings, ticks_by_prompt) as runtime:
        report = await run_once(runtime)
        recorded = await _rows(
            runtime,
            sa.select(
                model_calls.c.tick_id,
                model_calls.c.seq,
                model_calls.c.model,
                model_calls.c.input_tokens,
                model_calls.c.output_tokens,
                model_calls.c.cache_write_5m_tokens,
                model_calls.c.cache_read_tokens,
                model_calls.c.cost_usd,
            ).order_by(model_calls.c.tick_id, model_calls.c.seq),
        )
        daily = await _rows(runtime, sa.select(cost_days))
        costs = {tid: await runtime.journal.tick_cost(tid) for _, tid in report.ticks}
        today = datetime.now(UTC).date()
        found = await build(runtime.journal, period_of(1, today), Thresholds.of(settings))
        now = await status(runtime.journal, today, Budget(fleet_usd=1.0))
    assert len(report.ticks) == 10
    asked = _by_tick(fake_anthropic, ticks_by_prompt)
    assert asked.keys() == costs.keys()
    for tick_id, exchanges in asked.items():
        mine = [r for r in recorded if r.tick_id == tick_id]
        # Every call of the day and the rating, in the order they were made, each with its own usage.
        assert [r.seq for r in mine] == list(range(len(exchanges))) and len(exchanges) >= 2
        assert asked_tool(exchanges[-1].body) is not None  # the last one is the rating
        for row, x in zip(mine, exchanges, strict=True):
            usage = x.response["usage"]
            assert (row.model, row.input_tokens, row.output_tokens, row.cache_read_tokens) == (
                MODEL,
                usage["input_tokens"],
                usage["output_tokens"],
                usage["cache_read_input_tokens"],
            )
            assert row.cache_write_5m_tokens == usage["cache_creation_input_tokens"]
            assert row.cost_usd == pytest.approx(_priced(x), abs=1e-12)
        assert costs[tick_id] == pytest.approx(sum(_priced(x) for x in exchanges), abs=1e-12)
        assert costs[tick_id] > 0
    # The day's rollup holds the same money and calls (and outlives the pruning of the ticks).
    total = sum(_priced(x) for xs in asked.values() for x in xs)
    assert sum(r.cost_usd for r in daily) == pytest.approx(total, abs=1e-9)
    assert sum(r.calls for r in daily) == sum(len(xs) for xs in asked.values())
    assert {r.model for r in daily} == {MODEL} and len({r.persona_id for r in daily}) == 10

    # The report's cost: per day and persona from the rollup, per tick and module from the rows.
    cost = found["cost"]
    assert cost["total_usd"] == pytest.approx(total, abs=1e-9)
    assert [d["day"] for d in cost["by_day"]] == [today.isoformat()]
    by_persona = {p["persona"]: p["usd"] for p in cost["by_persona"]}
    tick_persona = {tid: p.user_id for p, tid in report.ticks}
    assert by_persona == pytest.approx({tick_persona[t]: c for t, c in costs.items()}, abs=1e-12)
    assert sum(m["usd"] for m in cost["by_module"]) == pytest.approx(total, abs=1e-9)
    assert {m["module"] for m in cost["by_module"]} <= {"todo", "journal", "calendar", "__tick"} | {
        m for t in cost["costly_ticks"] for m in t["modules"]
    }
    top = cost["costly_ticks"][0]
    assert top["usd"] == pytest.approx(max(costs.values()), abs=1e-12) and top["tick"] in costs
    assert [t["usd"] for t in cost["costly_ticks"]] == sorted((t["usd"] for t in cost["costly_ticks"]), reverse=True)
    # status carries today's cost as the report has it for the day: per persona, module and tick.
    assert now["cost"] == cost
    assert now["budget"] == {
        "day": today.isoformat(),
        "spent_usd": pytest.approx(total),
        "limit_usd": 1.0,
        "exhausted": False,
    }
    console = Console(record=True, width=240)
    render(found, console)
    render_status(now, console)
    shown = console.export_text()
    assert "Most expensive ticks" in shown and f"{top['usd']:.4f}" in shown and "of $1.0000" in shown
    assert shown.count("Cost per persona") == 2  # the report's and status's
    assert "<h2>Cost</h2>" in page(found) and top["tick"] in page(found)


async def test_a_persona_budget_crossed_mid_tick_stops_after_the_turn_rates_and_loses_no_call(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    # Less than any first turn costs (it writes the ~6,000-token tool prefix): crossed by turn one.
    settings = _claude(mana, tmp_path, fake_anthropic, persona_budget_usd_per_day=0.001, persona_concurrency=4)
    ticks_by_prompt: dict[str, str] = {}
    async with naming_runtime(settings, ticks_by_prompt) as runtime:
        report = await run_once(runtime)
        recorded = await _rows(runtime, sa.select(model_calls.c.tick_id, model_calls.c.seq, model_calls.c.cost_usd))
        outcomes = await _rows(runtime, sa.select(ticks.c.tick_id, ticks.c.outcome))
        # The personas' next day (the sandbox's clock) is still today for the budget (the database clock):
        # a persona whose budget is spent is not claimed, so it spends nothing more.
        await mana.post("clock", {"now": "2026-11-26T09:30:00+00:00"})
        asked_before = len(fake_anthropic.exchanges)
        again = await run_once(runtime)
    assert again.ticks == [] and len(fake_anthropic.exchanges) == asked_before
    assert report.backlog == 0 and len(report.ticks) == 10
    assert {o for _, o in outcomes} == {"ok"}
    actions, feedback = await mana.get("actions"), await mana.get("feedback")
    asked = _by_tick(fake_anthropic, ticks_by_prompt)
    for _, tick_id in report.ticks:
        exchanges = asked[tick_id]
        # One day turn (the stand-in plays three when let), then the rating of what it used.
        day = [x for x in exchanges if not asked_tool(x.body)]
        assert len(day) == 1 and any(b["type"] == "tool_use" for b in day[0].response["content"])
        assert asked_tool(exchanges[-1].body) is not None and len(exchanges) == 2
        rows = [a for a in actions if a["tickId"] == tick_id]
        budget = [a for a in rows if a["toolName"] == "__budget"]
        assert len(budget) == 1 and budget[0]["result"] == "ok"
        assert "persona budget" in budget[0]["errorMessage"] and "of $0.0010" in budget[0]["errorMessage"]
        # The turn's tool calls were made and delivered, each once.
        tool_rows = [a for a in rows if not a["toolName"].startswith("__")]
        assert len(tool_rows) == sum(b["type"] == "tool_use" for b in day[0].response["content"]) >= 1
        assert len({a["id"] for a in rows}) == len(rows)
        assert [f for f in feedback if f["tickId"] == tick_id and f["module"] != "__parse"]
        # Every model call the stand-in answered is a row of the journal, none twice.
        mine = sorted((r.seq, r.cost_usd) for r in recorded if r.tick_id == tick_id)
        assert [s for s, _ in mine] == [0, 1]
        assert [c for _, c in mine] == pytest.approx([_priced(x) for x in exchanges], abs=1e-12)


async def _slow(body: dict[str, Any]) -> Any:
    # A model that takes its time: the ticks of both replicas overlap, as a fleet's do.
    await asyncio.sleep(0.25)
    return default_brain(body)


@pytest.mark.parametrize("mode", ["pause", "scripted"])
async def test_two_replicas_on_one_postgresql_journal_hold_the_fleet_budget(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic, pg_url: str, mode: str
) -> None:
    fake_anthropic.brain = _slow
    for n in range(10):  # ten more than the sandbox's own, each with a prompt of its own
        spec = {
            "name": f"extra{n:02d}",
            "archetype": "test-archetype",
            "systemPrompt": f"Du bist Testperson Nummer {n}.",
            "moduleMix": {"todo": 0.5, "journal": 0.3, "calendar": 0.2},
            "tickCadence": "daily",
        }
        await mana.post("personas", spec)
    # A little under what a tick costs here ($0.0055 to $0.0075, by how the cache is hit), and exact in
    # binary: five reservations sum to the limit exactly, and five ticks spend more than four of them, so
    # the fleet has no room for a sixth whatever each one cost.
    tick_usd = 3 / 512
    limit = 5 * tick_usd
    settings = _claude(
        mana,
        tmp_path,
        fake_anthropic,
        runner_state_url=pg_url,
        persona_concurrency=10,
        budget_usd_per_day=limit,
        budget_tick_default_usd=tick_usd,
        budget_exhausted=mode,
    )
    ticks_by_prompt: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(naming_runtime(settings, ticks_by_prompt)) for _ in range(2)]
        assert replicas[0].journal.replica != replicas[1].journal.replica
        dispatchers = [Dispatcher(r, record=True) for r in replicas]
        logged = stack.enter_context(structlog.testing.capture_logs())
        # Twenty due personas, twenty slots over two replicas: without reservations all would start.
        await asyncio.gather(*(d.poll() for d in dispatchers))
        await asyncio.gather(*(d.wait_idle() for d in dispatchers))
        claude = _by_tick(fake_anthropic, ticks_by_prompt)
        charged = sum(_priced(x) for xs in claude.values() for x in xs)
        # The bound the README states: one model turn past its reservation plus the rating, per tick.
        bound = sum(
            max(_priced(x) for x in xs if not asked_tool(x.body)) + sum(_priced(x) for x in xs if asked_tool(x.body))
            for xs in claude.values()
        )
        # All twenty claims came before any tick ended: exactly five reservations fit, whichever replica took them.
        assert len(claude) == 5, (len(claude), charged)  # 10 when the advisory lock is taken out
        assert charged <= limit + bound, (charged, limit, bound)
        await asyncio.gather(*(r.outbox.flush() for r in replicas))
        # A tick that spent past its reservation found no room to extend it: stopped after that turn, rated, sealed ok.
        stops = [a for a in await mana.get("actions") if a["toolName"] == "__budget"]
        assert stops and all("fleet budget" in a["errorMessage"] and a["result"] == "ok" for a in stops)
        assert {a["tickId"] for a in stops} <= {a["tickId"] for a in await mana.get("feedback")}
        recorded = await _rows(replicas[0], sa.select(sa.func.sum(model_calls.c.cost_usd)))
        assert recorded[0][0] == pytest.approx(charged, abs=1e-9)

        # The next poll (every replica polls on its schedule) sees the budget spent.
        for d in dispatchers:
            await d.poll_and_deliver()
        await asyncio.gather(*(d.wait_idle() for d in dispatchers))
        assert all(d.budget.exhausted and d.budget.limit_usd == limit for d in dispatchers)
        # Fifteen refused claims, and in `pause` fifteen more at this poll: said once per replica and day.
        said = [e for e in logged if e["event"].startswith("fleet budget spent")]
        assert 1 <= len(said) <= 2 and all(("scripted" in e["event"]) == (mode == "scripted") for e in said)
        assert dispatchers[0].budget.spent_usd == pytest.approx(charged, abs=1e-9)
        assert metrics.REGISTRY.get_sample_value("persona_budget_exhausted") == 1
        assert metrics.REGISTRY.get_sample_value("persona_budget_limit_usd", {"scope": "fleet"}) == limit
        app = httpx.ASGITransport(app=build_app(replicas[1], dispatchers[1]))
        async with httpx.AsyncClient(transport=app, base_url="http://runner") as http:
            health = (await http.get("/health")).json()
        assert health["budget"]["exhausted"] is True and health["budget"]["limitUsd"] == limit
        assert health["budget"]["spentUsd"] == pytest.approx(charged, abs=1e-6)
        assert _by_tick(fake_anthropic, ticks_by_prompt).keys() == claude.keys()  # no Claude tick since
        claimed = await _rows(replicas[0], sa.select(ticks.c.tick_id, ticks.c.state, ticks.c.outcome))
        played = {a["tickId"] for a in await mana.get("actions")}
        if mode == "pause":
            # The others wait: never claimed, so their window is still free.
            assert {t for t, _, _ in claimed} == set(claude) == played
        else:
            # Every persona played once; those beyond the budget played scripted, at no cost.
            assert len(claimed) == 20 and {(s, o) for _, s, o in claimed} == {("sealed", "ok")}
            assert len(played) == 20 and set(claude) < played

        if mode == "pause":
            # A new UTC day (as the database clock sees it): what was spent is yesterday's, the waiting play.
            async with replicas[0].journal._write() as conn:
                await conn.execute(model_calls.update().values(at=model_calls.c.at - 86_400))
            await dispatchers[0].publish_budget()
            assert not dispatchers[0].budget.exhausted and dispatchers[0].budget.spent_usd == 0
            assert metrics.REGISTRY.get_sample_value("persona_budget_exhausted") == 0
            await dispatchers[0].poll_and_deliver()
            await dispatchers[0].wait_idle()
            assert len(_by_tick(fake_anthropic, ticks_by_prompt)) >= len(claude) + 3
        # What the last ticks sealed is delivered before the replicas close.
        await asyncio.gather(*(r.outbox.flush() for r in replicas))
