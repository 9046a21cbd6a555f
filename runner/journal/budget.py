"""What model calls cost, and the daily budgets that hold for every replica sharing the journal.

Each model call's usage is a row of `model_calls`, written as soon as its answer is known, and
added to `cost_days` (day x persona x model) in the same transaction, so cost per day outlives
the pruning of ticks. Today's fleet spend is what today's calls cost plus, for every running
tick, the part of its reservation it has not spent yet. A claim reserves the tick's expected cost
and is refused (`BudgetSpent`, nothing written) when that would pass the fleet's limit; a tick
that spends past its reservation extends it while the fleet has room, else it is told to stop.

The check and the write it decides are one transaction. On PostgreSQL every budget decision
first takes one transaction-scoped advisory lock, so replicas decide one at a time and two
claims can never both take the last dollar; a SQLite journal has one writer (`_write`) already.
The day is the UTC day of the database clock, the one clock every replica agrees on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from runner.agent.loop import Usage
from runner.journal.store import Store
from runner.schema import cost_days, model_calls, ticks

# Any fixed number, other than the migration's: the lock every replica's budget decision queues on.
_BUDGET_LOCK = 0x62756467  # "budg"
# A persona's expected tick cost is the mean of this many of its latest priced ticks.
RECENT_TICKS = 5
DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class Budget:
    """The daily limits in USD (None: no limit) and what a tick of an unknown persona is expected to cost."""

    fleet_usd: float | None = None
    persona_usd: float | None = None
    tick_default_usd: float = 0.02

    @property
    def limited(self) -> bool:
        return self.fleet_usd is not None or self.persona_usd is not None

    def fleet_spent(self, spent_usd: float) -> bool:
        """The fleet's budget counts as spent when a tick expected at the default no longer fits."""
        return self.fleet_usd is not None and spent_usd + self.tick_default_usd > self.fleet_usd


class BudgetSpent(Exception):
    """A claim would pass a daily budget; nothing was claimed. `scope` is fleet or persona."""

    def __init__(self, scope: str, day: str, spent: float, limit: float, expected: float) -> None:
        super().__init__(
            f"{scope} budget for {day} spent: ${spent:.4f} of ${limit:.4f}, a tick is expected to cost ${expected:.4f}"
        )
        self.scope, self.day, self.spent, self.limit, self.expected = scope, day, spent, limit, expected


@dataclass(frozen=True, slots=True)
class FleetSpend:
    day: str  # UTC, by the database clock
    spent_usd: float  # today's calls plus the unspent reservations of running ticks


def utc_day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).date().isoformat()


def _day_start(epoch: float) -> float:
    return epoch - epoch % DAY_S


class Costs(Store):
    """Model calls, their daily sums, and the budget checks at claim and after each call."""

    async def _budget_lock(self, conn: AsyncConnection) -> None:
        if self._postgres:
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_BUDGET_LOCK)))

    async def _cost(self, conn: AsyncConnection, *where: sa.ColumnElement[bool]) -> float:
        """What the model calls matching `where` cost, in USD."""
        spent = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(model_calls.c.cost_usd), 0.0)).where(*where))
        return float(spent or 0.0)

    async def _fleet_spent(self, conn: AsyncConnection, now: float) -> float:
        spent_by_tick = (
            sa.select(sa.func.coalesce(sa.func.sum(model_calls.c.cost_usd), 0.0))
            .where(model_calls.c.tick_id == ticks.c.tick_id)
            .scalar_subquery()
        )
        reserved = sa.func.coalesce(ticks.c.reserved_usd, 0.0)
        # A running tick holds what it reserved and has not spent yet: that money may still go.
        unspent = sa.case((reserved > spent_by_tick, reserved - spent_by_tick), else_=0.0)
        held = await conn.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(unspent), 0.0)).where(ticks.c.state == "running")
        )
        return await self._cost(conn, model_calls.c.at >= _day_start(now)) + float(held or 0.0)

    async def _persona_spent(self, conn: AsyncConnection, persona_id: str, now: float) -> float:
        return await self._cost(conn, model_calls.c.persona_id == persona_id, model_calls.c.at >= _day_start(now))

    async def _expected(self, conn: AsyncConnection, persona_id: str, default: float) -> float:
        """The mean cost of the persona's latest priced ticks, else the configured default."""
        per_tick = (
            sa.select(sa.func.sum(model_calls.c.cost_usd).label("cost"))
            .join(ticks, ticks.c.tick_id == model_calls.c.tick_id)
            .where(model_calls.c.persona_id == persona_id, ticks.c.state == "sealed")
            .group_by(model_calls.c.tick_id)
            .having(sa.func.sum(model_calls.c.cost_usd) > 0)
            .order_by(sa.func.max(model_calls.c.at).desc())
            .limit(RECENT_TICKS)
            .subquery()
        )
        mean = await conn.scalar(sa.select(sa.func.avg(per_tick.c.cost)))
        return float(mean) if mean else default

    async def _reserve(self, conn: AsyncConnection, tick_id: str, persona_id: str, budget: Budget, now: float) -> None:
        """Inside the claim's transaction: reserve the tick's expected cost, or raise BudgetSpent
        (the caller's transaction then rolls back, so the window is not used up)."""
        await self._budget_lock(conn)
        expected = await self._expected(conn, persona_id, budget.tick_default_usd)
        day = utc_day(now)
        if budget.persona_usd is not None:
            spent = await self._persona_spent(conn, persona_id, now)
            if spent >= budget.persona_usd:
                raise BudgetSpent("persona", day, spent, budget.persona_usd, expected)
        if budget.fleet_usd is None:
            return
        spent = await self._fleet_spent(conn, now)
        if spent + expected > budget.fleet_usd:
            raise BudgetSpent("fleet", day, spent, budget.fleet_usd, expected)
        await conn.execute(ticks.update().where(ticks.c.tick_id == tick_id).values(reserved_usd=expected))

    async def record_model_call(
        self, tick_id: str, persona_id: str, usage: Usage, budget: Budget | None = None
    ) -> str | None:
        """Journal one model call's usage and cost; with a budget, say why the tick must stop (else None).

        The persona's budget stops the tick once today's spend reaches it. Past its reservation the
        tick extends it by its expected cost when the fleet has room for that, and is stopped when not.
        """
        if not usage.model:
            return None  # the scripted player: no model, no cost, nothing to record
        async with self._write() as conn:
            if budget is not None and budget.limited:
                await self._budget_lock(conn)
            now = await self._now(conn)
            seq = await conn.scalar(
                sa.select(sa.func.coalesce(sa.func.max(model_calls.c.seq) + 1, 0)).where(
                    model_calls.c.tick_id == tick_id
                )
            )
            written_1h = usage.cache_creation_1h_tokens
            tokens = {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_write_5m_tokens": usage.cache_creation_input_tokens - written_1h,
                "cache_write_1h_tokens": written_1h,
                "cache_read_tokens": usage.cache_read_input_tokens,
                "cost_usd": usage.cost_usd,
            }
            await conn.execute(
                model_calls.insert().values(
                    tick_id=tick_id, seq=int(seq or 0), persona_id=persona_id, model=usage.model, at=now, **tokens
                )
            )
            # Added, never overwritten: replicas recording at once add up.
            day_row = {"day": utc_day(now), "persona_id": persona_id, "model": usage.model, "calls": 1, **tokens}
            stmt = self._insert(cost_days).values(**day_row)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["day", "persona_id", "model"],
                    set_={k: cost_days.c[k] + stmt.excluded[k] for k in ("calls", *tokens)},
                )
            )
            if budget is None or not budget.limited:
                return None
            return await self._judge(conn, tick_id, persona_id, budget, now)

    async def _judge(
        self, conn: AsyncConnection, tick_id: str, persona_id: str, budget: Budget, now: float
    ) -> str | None:
        day = utc_day(now)
        if budget.persona_usd is not None:
            spent = await self._persona_spent(conn, persona_id, now)
            if spent >= budget.persona_usd:
                return f"persona budget for {day} reached: ${spent:.4f} of ${budget.persona_usd:.4f}"
        if budget.fleet_usd is None:
            return None
        reserved = float(await conn.scalar(sa.select(ticks.c.reserved_usd).where(ticks.c.tick_id == tick_id)) or 0.0)
        spent_here = await self._cost(conn, model_calls.c.tick_id == tick_id)
        if spent_here <= reserved:
            return None
        expected = await self._expected(conn, persona_id, budget.tick_default_usd)
        # This tick's reservation is used up, so the fleet's spend holds none of it: room for one more share?
        fleet = await self._fleet_spent(conn, now)
        if fleet + expected <= budget.fleet_usd:
            await conn.execute(
                ticks.update().where(ticks.c.tick_id == tick_id).values(reserved_usd=spent_here + expected)
            )
            return None
        return (
            f"fleet budget for {day} reached: ${fleet:.4f} of ${budget.fleet_usd:.4f} spent or reserved, "
            f"this tick ${spent_here:.4f} past its reservation of ${reserved:.4f}"
        )

    async def fleet_spend(self) -> FleetSpend:
        """Today's spend of the whole fleet (running reservations included), for /health, metrics and status."""
        async with self._engine.connect() as conn:
            now = await self._now(conn)
            return FleetSpend(utc_day(now), await self._fleet_spent(conn, now))

    async def tick_cost(self, tick_id: str) -> float:
        async with self._engine.connect() as conn:
            return await self._cost(conn, model_calls.c.tick_id == tick_id)
