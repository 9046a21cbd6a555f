"""What the personas found, and what the fleet is doing now, read from the journal only: findings, rating
trends, tools, coverage, personas, cost (`report`), and polls, ticks in flight, outbox, today's ticks and
spend against the budget (`status`).

It reads the read model that sealing keeps (runner/journal/rollup.py), never the raw rows' totals, so
a report covers every replica on a shared journal and stays whole after pruning. Every number comes
from one GROUP BY per section over the period's days; nothing here writes.

Days are tick windows (the personas API's serverTime), compared as ISO strings.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from rich.console import Console, Group
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from runner.journal import Journal
from runner.journal.budget import DAY_S, Budget
from runner.journal.rollup import STAGE_PREFIX, quantile
from runner.persona import module_of
from runner.schema import (
    LATENCY_BUCKETS,
    calls,
    catalogue,
    clock,
    cost_days,
    finding_days,
    findings,
    model_calls,
    persona_last,
    polls,
    ratings,
    rollup,
    ticks,
)
from runner.settings import Settings

# Modules that are the runner's own bookkeeping (the tick itself, an unreadable rating), not Mana's.
_INTERNAL = "__"
NOTES_QUOTED = 10


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The report's settings (REPORT_* in runner/settings.py, where their defaults live)."""

    recent_days: int
    prior_days: int
    regression_drop: float
    min_ratings: int
    gone_after: int

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(
            settings.report_recent_days,
            settings.report_prior_days,
            settings.report_regression_drop,
            settings.report_min_ratings,
            settings.report_gone_after,
        )


@dataclass(frozen=True, slots=True)
class Period:
    since: date
    until: date

    @property
    def days(self) -> tuple[str, str]:
        return self.since.isoformat(), self.until.isoformat()


def _in(period: tuple[str, str], column: Any) -> sa.ColumnElement[bool]:
    return sa.and_(column >= period[0], column <= period[1])


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _sum(column: Any, where: sa.ColumnElement[bool] | None = None) -> Any:
    return sa.func.coalesce(sa.func.sum(column if where is None else sa.case((where, column), else_=0)), 0)


async def build(journal: Journal, period: Period, thresholds: Thresholds) -> dict[str, Any]:
    """The whole report as plain data: what `--json` prints and the tables and page are drawn from."""
    async with journal.reading() as conn:
        tools, last_errors = await _tools(conn, period)
        return {
            "period": {"since": period.since.isoformat(), "until": period.until.isoformat()},
            "findings": await _findings(conn, period, thresholds),
            "modules": await _modules(conn, period, thresholds),
            "tools": [{**t, "last_error": last_errors.get(t["tool"])} for t in tools],
            "coverage": await _coverage(conn, period, tools),
            "personas": await _personas(conn, period),
            "notes": await _lowest_notes(conn, period),
            "ratings_by_day": await _ratings_by_day(conn, period),
            "cost": await _cost(conn, period),
        }


async def _findings(conn: AsyncConnection, period: Period, thresholds: Thresholds) -> list[dict[str, Any]]:
    days = period.days
    counts = (
        sa.select(
            finding_days.c.finding_id,
            # The period's counts; findings' own calls and ticks are all-time.
            sa.func.sum(finding_days.c.calls).label("period_calls"),
            sa.func.sum(finding_days.c.ticks).label("period_ticks"),
            sa.func.count(sa.distinct(finding_days.c.persona_id)).label("personas"),
        )
        .where(_in(days, finding_days.c.day))
        .group_by(finding_days.c.finding_id)
        .subquery()
    )
    rows = (await conn.execute(sa.select(findings, counts).join(counts, counts.c.finding_id == findings.c.id))).all()
    out = []
    for r in rows:
        if r.ok_since >= thresholds.gone_after:
            status = "gone"
        elif r.first_day >= days[0]:
            status = "new"
        else:
            status = "ongoing"
        out.append(
            {
                "id": r.id,
                "tool": r.tool,
                "cause": r.cause,
                "cause_class": r.cause_class,
                "status": status,
                "first_seen": r.first_day,
                "last_seen": r.last_day,
                "calls": int(r.period_calls),
                "ticks": int(r.period_ticks),
                "personas": int(r.personas),
                "example": {"error": r.example_error, "input_hash": r.example_input_hash},
            }
        )
    order = {"new": 0, "ongoing": 1, "gone": 2}
    return sorted(out, key=lambda f: (order[f["status"]], -f["calls"], f["id"]))


def _mean(total: float, n: float) -> float | None:
    return round(total / n, 3) if n else None


async def _modules(conn: AsyncConnection, period: Period, thresholds: Thresholds) -> list[dict[str, Any]]:
    own_row = rollup.c.tool == ""
    rows = (
        await conn.execute(
            sa.select(
                rollup.c.module,
                _sum(rollup.c.ticks, own_row).label("ticks"),
                _sum(rollup.c.calls).label("calls"),
                _sum(rollup.c.errors).label("errors"),
                _sum(rollup.c.rating_sum).label("rating_sum"),
                _sum(rollup.c.rating_n).label("rating_n"),
            )
            .where(_in(period.days, rollup.c.day), ~rollup.c.module.startswith(_INTERNAL, autoescape=True))
            .group_by(rollup.c.module)
            .order_by(rollup.c.module)
        )
    ).all()
    trends = await _trends(conn, period.until, thresholds)
    return [
        {
            "module": r.module,
            "ticks": int(r.ticks),
            "calls": int(r.calls),
            "errors": int(r.errors),
            "error_rate": _ratio(r.errors, r.calls),
            "rating_mean": _mean(r.rating_sum, r.rating_n),
            "rating_n": int(r.rating_n),
            "trend": trends.get(r.module, _trend(0, 0, 0, 0, thresholds)),
        }
        for r in rows
    ]


def _trend(recent_sum: int, recent_n: int, prior_sum: int, prior_n: int, thresholds: Thresholds) -> dict[str, Any]:
    recent, prior = _mean(recent_sum, recent_n), _mean(prior_sum, prior_n)
    delta = None if recent is None or prior is None else round(recent - prior, 3)
    enough = recent_n >= thresholds.min_ratings and prior_n >= thresholds.min_ratings
    return {
        "recent_mean": recent,
        "prior_mean": prior,
        "recent_n": recent_n,
        "prior_n": prior_n,
        "delta": delta,
        "regression": bool(enough and delta is not None and delta <= -thresholds.regression_drop),
    }


async def _trends(conn: AsyncConnection, until: date, thresholds: Thresholds) -> dict[str, dict[str, Any]]:
    """Mean rating of the last `recent_days` against the `prior_days` before them, per module."""
    recent_from = (until - timedelta(days=thresholds.recent_days - 1)).isoformat()
    prior_from = (until - timedelta(days=thresholds.recent_days + thresholds.prior_days - 1)).isoformat()
    recent = rollup.c.day >= recent_from
    rows = (
        await conn.execute(
            sa.select(
                rollup.c.module,
                _sum(rollup.c.rating_sum, recent).label("recent_sum"),
                _sum(rollup.c.rating_n, recent).label("recent_n"),
                _sum(rollup.c.rating_sum, ~recent).label("prior_sum"),
                _sum(rollup.c.rating_n, ~recent).label("prior_n"),
            )
            .where(_in((prior_from, until.isoformat()), rollup.c.day), rollup.c.tool == "", rollup.c.rating_n > 0)
            .group_by(rollup.c.module)
        )
    ).all()
    return {
        r.module: _trend(int(r.recent_sum), int(r.recent_n), int(r.prior_sum), int(r.prior_n), thresholds) for r in rows
    }


async def rating_trends(journal: Journal, until: date, thresholds: Thresholds) -> dict[str, dict[str, Any]]:
    """Each module's recent mean rating against its prior one, as the report's `modules` have it."""
    async with journal.reading() as conn:
        return await _trends(conn, until, thresholds)


async def _tools(conn: AsyncConnection, period: Period) -> tuple[list[dict[str, Any]], dict[str, str]]:
    buckets = [rollup.c[f"lat_{k:02d}"] for k in range(LATENCY_BUCKETS)]
    rows = (
        await conn.execute(
            sa.select(
                rollup.c.tool,
                _sum(rollup.c.calls).label("calls"),
                _sum(rollup.c.errors).label("errors"),
                *(_sum(b).label(b.name) for b in buckets),
            )
            .where(
                _in(period.days, rollup.c.day),
                rollup.c.tool != "",
                ~rollup.c.tool.startswith(_INTERNAL, autoescape=True),
            )
            .group_by(rollup.c.tool)
            .order_by(rollup.c.tool)
        )
    ).all()
    tools = []
    for r in rows:
        counts = [int(getattr(r, b.name)) for b in buckets]
        p50, p95 = quantile(counts, 0.5), quantile(counts, 0.95)
        tools.append(
            {
                "tool": r.tool,
                "calls": int(r.calls),
                "errors": int(r.errors),
                "error_rate": _ratio(r.errors, r.calls),
                "latency_ms_p50": None if p50 is None else round(p50, 1),
                "latency_ms_p95": None if p95 is None else round(p95, 1),
            }
        )
    # Each tool's most recent error: the last error of its most recently seen finding.
    latest = (
        await conn.execute(
            sa.select(findings.c.tool, findings.c.last_error)
            .where(findings.c.last_day >= period.days[0])
            .order_by(findings.c.last_at)
        )
    ).all()
    return tools, {tool: error for tool, error in latest}


async def _coverage(conn: AsyncConnection, period: Period, tools: list[dict[str, Any]]) -> dict[str, Any]:
    listed = (
        await conn.execute(
            sa.select(catalogue.c.kind, catalogue.c.name).where(_in(period.days, catalogue.c.day)).distinct()
        )
    ).all()
    served = sorted({name for kind, name in listed if kind == "served"})
    asked = sorted({name for kind, name in listed if kind == "asked"})
    called = {t["tool"] for t in tools if t["calls"]}
    exercised = [name for name in served if name in called]
    by_module: dict[str, dict[str, int]] = defaultdict(lambda: {"served": 0, "exercised": 0})
    for name in served:
        by_module[module_of(name)]["served"] += 1
        by_module[module_of(name)]["exercised"] += name in called
    return {
        "served": len(served),
        "exercised": len(exercised),
        "share": _ratio(len(exercised), len(served)),
        "never_called": [name for name in served if name not in called],
        "modules": {m: {**c, "share": _ratio(c["exercised"], c["served"])} for m, c in sorted(by_module.items())},
        "demand_without_tool": [m for m in asked if m not in by_module],
    }


async def _personas(conn: AsyncConnection, period: Period) -> list[dict[str, Any]]:
    counted = (
        sa.select(rollup.c.persona_id, sa.func.sum(rollup.c.ticks).label("ticks"))
        .where(_in(period.days, rollup.c.day), rollup.c.module == STAGE_PREFIX[:-1], rollup.c.tool == "")
        .group_by(rollup.c.persona_id)
        .subquery()
    )
    rows = (
        await conn.execute(
            sa.select(persona_last, sa.func.coalesce(counted.c.ticks, 0).label("period_ticks"))
            .outerjoin(counted, counted.c.persona_id == persona_last.c.persona_id)
            .order_by(persona_last.c.persona_id)
        )
    ).all()
    return [
        {
            "persona": r.persona_id,
            "ticks": int(r.period_ticks),
            "last_tick": {
                "window": r.window,
                "sealed_at": datetime.fromtimestamp(r.sealed_at, UTC).isoformat(timespec="seconds"),
                "outcome": r.outcome,
                "calls": r.calls,
                "modules": [m for m in r.modules.split(",") if m],
                "space": r.space_id,
            },
        }
        for r in rows
    ]


async def _lowest_notes(conn: AsyncConnection, period: Period) -> list[dict[str, Any]]:
    """The lowest-rated notes of the period, from the raw rows the journal still keeps (RUNNER_RETENTION_DAYS)."""
    day = sa.func.substr(ticks.c.window, 1, 10)
    rows = (
        await conn.execute(
            sa.select(ratings.c.module, ratings.c.rating, ratings.c.notes, ticks.c.persona_id, day.label("day"))
            .join(ticks, ticks.c.tick_id == ratings.c.tick_id)
            .where(
                _in(period.days, day),
                ratings.c.notes.is_not(None),
                ~ratings.c.module.startswith(_INTERNAL, autoescape=True),
            )
            .order_by(ratings.c.rating, sa.desc(day), ratings.c.module)
            .limit(NOTES_QUOTED)
        )
    ).all()
    return [
        {"module": r.module, "rating": r.rating, "notes": r.notes, "persona": r.persona_id, "day": r.day} for r in rows
    ]


async def _ratings_by_day(conn: AsyncConnection, period: Period) -> dict[str, dict[str, float]]:
    """Mean rating per module and day, for the page's chart."""
    rows = (
        await conn.execute(
            sa.select(
                rollup.c.module,
                rollup.c.day,
                sa.func.sum(rollup.c.rating_sum).label("total"),
                sa.func.sum(rollup.c.rating_n).label("n"),
            )
            .where(_in(period.days, rollup.c.day), rollup.c.tool == "", rollup.c.rating_n > 0)
            .group_by(rollup.c.module, rollup.c.day)
            .order_by(rollup.c.module, rollup.c.day)
        )
    ).all()
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        series[r.module][r.day] = round(int(r.total) / int(r.n), 3)
    return dict(series)


# The most expensive ticks the report lists.
COSTLY_TICKS = 10
# The module a tick's cost goes to when it called no tool (a quiet day, a tick cut before its first call).
NO_TOOL = "__tick"


async def _cost(conn: AsyncConnection, period: Period) -> dict[str, Any]:
    """USD by UTC day and persona from the daily cost rollup (kept after pruning); the most expensive
    ticks and the split by module from the raw rows, so within RUNNER_RETENTION_DAYS only."""
    in_days = _in(period.days, cost_days.c.day)
    usd, n = sa.func.sum(cost_days.c.cost_usd), sa.func.sum(cost_days.c.calls)
    by_day = (
        await conn.execute(
            sa.select(cost_days.c.day, usd, n).where(in_days).group_by(cost_days.c.day).order_by(cost_days.c.day)
        )
    ).all()
    by_persona = (
        await conn.execute(
            sa.select(cost_days.c.persona_id, usd, n)
            .where(in_days)
            .group_by(cost_days.c.persona_id)
            .order_by(usd.desc())
        )
    ).all()
    start = datetime.combine(period.since, datetime.min.time(), UTC).timestamp()
    in_period = sa.and_(
        model_calls.c.at >= start, model_calls.c.at < start + DAY_S * ((period.until - period.since).days + 1)
    )
    per_tick = (
        await conn.execute(
            sa.select(
                model_calls.c.tick_id, model_calls.c.persona_id, sa.func.sum(model_calls.c.cost_usd), sa.func.count()
            )
            .where(in_period)
            .group_by(model_calls.c.tick_id, model_calls.c.persona_id)
        )
    ).all()
    priced = sa.select(model_calls.c.tick_id).where(in_period)
    tools_used = (
        await conn.execute(
            sa.select(calls.c.tick_id, calls.c.tool_name, sa.func.count())
            .where(calls.c.tick_id.in_(priced))
            .group_by(calls.c.tick_id, calls.c.tool_name)
        )
    ).all()
    modules_of: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for tick_id, tool, count in tools_used:
        modules_of[tick_id][module_of(tool)] += int(count)
    by_module: dict[str, float] = defaultdict(float)
    for tick_id, _, cost, _ in per_tick:
        used = modules_of.get(tick_id) or {NO_TOOL: 1}
        total = sum(used.values())
        for module, count in used.items():  # a tick's cost split by its calls' share
            by_module[module] += float(cost) * count / total
    costly = sorted(per_tick, key=lambda r: -float(r[2]))[:COSTLY_TICKS]
    return {
        "total_usd": sum(float(r[1]) for r in by_day),
        "by_day": [{"day": d, "usd": float(c), "calls": int(k)} for d, c, k in by_day],
        "by_persona": [{"persona": p, "usd": float(c), "calls": int(k)} for p, c, k in by_persona],
        "by_module": [{"module": m, "usd": c} for m, c in sorted(by_module.items(), key=lambda kv: -kv[1])],
        "costly_ticks": [
            {"tick": t, "persona": p, "usd": float(c), "model_calls": int(k), "modules": sorted(modules_of.get(t, {}))}
            for t, p, c, k in costly
        ],
    }


_SINCE = re.compile(r"(?P<n>[1-9][0-9]{0,3})(?P<unit>[dw])")


def parse_since(text: str) -> int:
    """`7d`, `2w` -> days; ValueError with the one line to show for anything else."""
    match = _SINCE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"--since {text!r}: expected a number of days or weeks, like 7d or 2w")
    return int(match["n"]) * (7 if match["unit"] == "w" else 1)


def period_of(days: int, until: date) -> Period:
    """The last `days` days up to and including `until`."""
    return Period(until - timedelta(days=days - 1), until)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _titled(title: str, *columns: str) -> Table:
    return Table(*columns, title=title, title_justify="left")


def render(report: dict[str, Any], console: Console) -> None:
    """The report as terminal tables."""
    period = report["period"]
    console.print(f"[bold]What the personas found[/bold], {period['since']} to {period['until']}")
    table = _titled(
        "Findings", "id", "status", "tool or stage", "class", "cause", "calls", "ticks", "personas", "first", "last"
    )
    for f in report["findings"]:
        table.add_row(
            f["id"],
            f["status"],
            f["tool"],
            f["cause_class"],
            f["cause"][:80],
            *(_cell(f[k]) for k in ("calls", "ticks", "personas", "first_seen", "last_seen")),
        )
    console.print(table)
    table = _titled(
        "Modules", "module", "ticks", "calls", "error rate", "rating", "n", "recent", "prior", "delta", "regression"
    )
    for m in report["modules"]:
        t = m["trend"]
        table.add_row(
            m["module"],
            *(
                _cell(v)
                for v in (
                    m["ticks"],
                    m["calls"],
                    m["error_rate"],
                    m["rating_mean"],
                    m["rating_n"],
                    t["recent_mean"],
                    t["prior_mean"],
                    t["delta"],
                )
            ),
            "[red]yes[/red]" if t["regression"] else "no",
        )
    console.print(table)
    table = _titled("Tools", "tool", "calls", "errors", "error rate", "p50 ms", "p95 ms", "last error")
    for t in report["tools"]:
        table.add_row(
            t["tool"],
            *(_cell(t[k]) for k in ("calls", "errors", "error_rate", "latency_ms_p50", "latency_ms_p95")),
            (t["last_error"] or "")[:60],
        )
    console.print(table)
    cov = report["coverage"]
    console.print(
        f"Coverage: {cov['exercised']} of {cov['served']} served tools exercised ({_cell(cov['share'])}); "
        f"never called: {', '.join(cov['never_called']) or 'none'}; "
        f"asked for without a tool: {', '.join(cov['demand_without_tool']) or 'none'}"
    )
    if report["notes"]:
        table = _titled("Lowest-rated notes", "rating", "module", "day", "note")
        for n in report["notes"]:
            table.add_row(str(n["rating"]), n["module"], n["day"], n["notes"])
        console.print(table)
    table = _titled("Personas", "persona", "ticks", "last window", "outcome", "calls", "modules", "space")
    for p in report["personas"]:
        last = p["last_tick"]
        table.add_row(
            p["persona"],
            str(p["ticks"]),
            last["window"],
            last["outcome"],
            str(last["calls"]),
            ",".join(last["modules"]),
            last["space"] or "-",
        )
    console.print(table)
    render_cost(report["cost"], console)


def render_cost(cost: dict[str, Any], console: Console) -> None:
    console.print(f"Cost: ${cost['total_usd']:.4f} in the period")
    table = _titled("Cost per day (UTC)", "day", "USD", "model calls")
    for d in cost["by_day"]:
        table.add_row(d["day"], f"{d['usd']:.4f}", str(d["calls"]))
    console.print(table)
    table = _titled("Cost per persona", "persona", "USD", "model calls")
    for p in cost["by_persona"]:
        table.add_row(p["persona"], f"{p['usd']:.4f}", str(p["calls"]))
    console.print(table)
    table = _titled("Cost per module (split by calls, within retention)", "module", "USD")
    for m in cost["by_module"]:
        table.add_row(m["module"], f"{m['usd']:.4f}")
    console.print(table)
    table = _titled("Most expensive ticks (within retention)", "tick", "persona", "USD", "model calls", "modules")
    for t in cost["costly_ticks"]:
        table.add_row(t["tick"], t["persona"], f"{t['usd']:.4f}", str(t["model_calls"]), ",".join(t["modules"]))
    console.print(table)


async def status(journal: Journal, today: date, budget: Budget | None = None) -> dict[str, Any]:
    """What the fleet is doing now, for every replica on the journal: polls, ticks in flight, outbox, today,
    today's spend (UTC, running reservations included) against BUDGET_USD_PER_DAY, and today's cost by
    persona, module and tick."""
    budget = budget or Budget()
    async with journal.reading() as conn:
        now = float(await conn.scalar(sa.select(clock(conn.dialect.name))) or 0.0)
        replicas = (await conn.execute(sa.select(polls).order_by(sa.desc(polls.c.at)))).all()
        running = (
            await conn.execute(
                sa.select(ticks.c.persona_id, ticks.c.stage, ticks.c.created_at, ticks.c.owner, ticks.c.attempts)
                .where(ticks.c.state == "running")
                .order_by(ticks.c.created_at)
            )
        ).all()
        outcomes = (
            await conn.execute(
                sa.select(sa.func.coalesce(ticks.c.outcome, ticks.c.state), sa.func.count())
                .where(sa.func.substr(ticks.c.window, 1, 10) == today.isoformat())
                .group_by(sa.func.coalesce(ticks.c.outcome, ticks.c.state))
            )
        ).all()
        cost = await _cost(conn, period_of(1, today))
    spend = await journal.fleet_spend()
    return {
        "replicas": [
            {
                "replica": r.replica,
                "polled_s_ago": round(now - r.at, 1),
                "result": r.result,
                "due": r.due,
                "started": r.started,
                "error": r.error,
            }
            for r in replicas
        ],
        "in_flight": [
            {"persona": r.persona_id, "stage": r.stage, "age_s": round(now - r.created_at, 1), "replica": r.owner}
            for r in running
        ],
        "outbox": await journal.batch_counts(),
        "problem_batches": [
            {"id": b.id, "state": b.state, "kind": b.kind, "attempts": b.attempts, "last_error": b.last_error}
            for b in await journal.problem_batches()
        ],
        "today": {"day": today.isoformat(), **{str(k): int(n) for k, n in outcomes}},
        "budget": {
            "day": spend.day,
            "spent_usd": spend.spent_usd,
            "limit_usd": budget.fleet_usd,
            "exhausted": budget.fleet_spent(spend.spent_usd),
        },
        # Today's cost by persona, module and tick (the report's cost section for one day).
        "cost": cost,
    }


def render_status(state: dict[str, Any], console: Console) -> None:
    """The fleet as terminal lines and tables (the caller has checked that some replica polls)."""
    live = state["replicas"]
    paused = all(r["result"] == "paused" for r in live)
    console.print(f"fleet: {len(live)} replica(s) polling, {'PAUSED' if paused else 'running'}")
    table = _titled("Replicas", "replica", "last poll", "result", "due", "started", "error")
    for r in live:
        table.add_row(
            r["replica"],
            f"{r['polled_s_ago']:.0f} s ago",
            r["result"],
            _cell(r["due"]),
            _cell(r["started"]),
            (r["error"] or "")[:80],
        )
    console.print(table)
    table = _titled("Ticks in flight", "persona", "stage", "age", "replica")
    for t in state["in_flight"]:
        table.add_row(t["persona"], t["stage"] or "-", f"{t['age_s']:.0f} s", t["replica"] or "-")
    console.print(table)
    console.print("outbox: " + " ".join(f"{k}={v}" for k, v in state["outbox"].items()))
    for b in state["problem_batches"]:
        console.print(f"  batch {b['id']} {b['state']} {b['kind']} attempts={b['attempts']}: {b['last_error'] or ''}")
    today = dict(state["today"])
    day = today.pop("day")
    console.print(f"today ({day}): " + (" ".join(f"{k}={v}" for k, v in sorted(today.items())) or "no ticks"))
    budget = state["budget"]
    limit = "no budget set" if budget["limit_usd"] is None else f"of ${budget['limit_usd']:.4f}"
    spent = " [red]SPENT[/red]" if budget["exhausted"] else ""
    console.print(
        f"spend ({budget['day']} UTC, running ticks' reservations included): ${budget['spent_usd']:.4f} {limit}{spent}"
    )
    if state["cost"]["total_usd"]:
        render_cost(state["cost"], console)


def progress(state: dict[str, Any], total: int, emails: dict[str, str]) -> Group:
    """The demo's live view: personas done out of the cast, and the stage of each running tick."""
    counts = dict(state["today"])
    counts.pop("day")
    done = sum(n for outcome, n in counts.items() if outcome not in ("running", "retry"))
    table = Table("persona", "stage", "for", box=None)
    for t in state["in_flight"]:
        table.add_row(emails.get(t["persona"], t["persona"]), t["stage"] or "-", f"{t['age_s']:.0f} s")
    return Group(f"[bold]{done}[/bold] of {total} personas done, {len(state['in_flight'])} running", table)


def summary(report: dict[str, Any], console: Console) -> None:
    """One screen: the findings, each module's rating and errors, coverage."""
    findings = report["findings"]
    console.print(f"\n[bold]{len(findings)} finding(s)[/bold] on {report['period']['until']}:")
    for f in findings[:5]:
        console.print(f"  {f['id']} {f['tool']} ({f['cause_class']}, {f['calls']} calls): {f['cause'][:90]}")
    if len(findings) > 5:
        console.print(f"  ... and {len(findings) - 5} more")
    rated = [m for m in report["modules"] if m["rating_n"]]
    console.print(
        "modules: "
        + ", ".join(f"{m['module']} {_cell(m['rating_mean'])} ({m['errors']}/{m['calls']} failed)" for m in rated)
    )
    cov = report["coverage"]
    console.print(f"coverage: {cov['exercised']} of {cov['served']} served tools exercised")
