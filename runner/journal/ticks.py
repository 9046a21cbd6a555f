"""The write path of a tick: claim, lease, each call, ratings, seal; recovery of abandoned ticks; pruning.

Write-ahead, in this order, each step committed before the next starts:
  claim (tick row) -> call intent (pending) -> call outcome -> ratings -> seal -> batches
A tool call is journaled as *pending* before it is sent, so a SIGKILL at any point leaves
a row for every call that may have reached mana-mcp; recovery turns pending into an error
row ("outcome unknown") instead of guessing. Sealing freezes a tick's rows into batches (see
batches.py) in the same transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from runner.journal.batches import freeze
from runner.journal.budget import Budget, Costs
from runner.journal.rollup import SealedCall, SealedTick, record_sealed
from runner.journal.store import LeaseLost
from runner.persona import PARSE_MODULE, TICK_ROW, ActionRow, FeedbackRow, clean_text
from runner.schema import batches, calls, model_calls, ratings, tick_spaces, ticks

# Rows deleted per prune transaction: SQLite caps bound variables (32766), and a short
# transaction does not hold the write lock against running ticks for long.
PRUNE_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Claim:
    tick_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class TickSummary:
    outcome: str
    ok: int
    errors: int
    ratings: list[tuple[str, int]]


class TickWrites(Costs):
    """A tick's rows, from its claim to its seal."""

    async def claim(self, persona_id: str, window: str, tick_id: str, budget: Budget | None = None) -> Claim | None:
        """Take (persona, window) for one run; None when it is done, running or not yet due for a retry.

        Atomic across replicas: the insert of the tick row is the claim, and a second claimant's
        insert does nothing on the unique (persona, window); a retry is taken by a conditional update.
        With a `budget` the claim also reserves the tick's expected cost, in the same transaction,
        or raises BudgetSpent, which rolls the claim back: the window stays free for later.
        """
        async with self._write() as conn:
            if budget is not None and budget.limited:
                await self._budget_lock(conn)  # before any row lock: every budget decision queues here first
            now = await self._now(conn)
            await self._supersede_retries(conn, persona_id, tick_id, now)
            # `stage` is the tick's last journaled step, for `python -m runner status`: a claim starts at login.
            lease = {"owner": self.replica, "lease_until": now + self.lease_s, "updated_at": now, "stage": "login"}
            inserted = await conn.scalar(
                self._insert(ticks)
                .values(
                    tick_id=tick_id,
                    persona_id=persona_id,
                    window=window,
                    state="running",
                    attempts=1,
                    created_at=now,
                    **lease,
                )
                .on_conflict_do_nothing()
                .returning(ticks.c.tick_id)
            )
            if inserted is not None:
                if budget is not None and budget.limited:
                    await self._reserve(conn, tick_id, persona_id, budget, now)
                return Claim(tick_id, 1)
            attempt = await conn.scalar(
                ticks.update()
                .where(
                    ticks.c.tick_id == tick_id,
                    ticks.c.state == "retry",
                    sa.or_(ticks.c.next_attempt_at.is_(None), ticks.c.next_attempt_at <= now),
                )
                .values(state="running", attempts=ticks.c.attempts + 1, next_attempt_at=None, **lease)
                .returning(ticks.c.attempts)
            )
            if attempt is None:
                return None
            if budget is not None and budget.limited:
                await self._reserve(conn, tick_id, persona_id, budget, now)
            return Claim(tick_id, int(attempt))

    async def _supersede_retries(self, conn: AsyncConnection, persona_id: str, tick_id: str, now: float) -> None:
        # A tick still waiting for a retry when its window has passed will never run: close it
        # with its last error, so the dashboard sees the failure instead of silence.
        stale = (
            await conn.execute(
                sa.select(ticks.c.tick_id, ticks.c.last_error).where(
                    ticks.c.persona_id == persona_id, ticks.c.state == "retry", ticks.c.tick_id != tick_id
                )
            )
        ).all()
        for old_id, last_error in stale:
            row = ActionRow(TICK_ROW, "error", error_message=last_error)
            await self._seal(conn, old_id, "failed", row, now, when=ticks.c.state == "retry", stage="retry")

    async def renew_leases(self) -> int:
        """Extend the lease of every tick this replica is running; returns how many it holds."""
        async with self._write() as conn:
            now = await self._now(conn)
            result = await conn.execute(ticks.update().where(self._mine()).values(lease_until=now + self.lease_s))
            return int(result.rowcount or 0)

    async def defer(self, tick_id: str, error: str, retry_in_s: float) -> None:
        """A failure before any tool call: nothing happened in Mana, so running again is safe."""
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                ticks.update()
                .where(ticks.c.tick_id == tick_id, self._mine())
                .values(
                    state="retry",
                    last_error=clean_text(error, 500),
                    next_attempt_at=now + retry_in_s,
                    updated_at=now,
                    owner=None,
                    lease_until=None,
                )
            )

    async def record_tick_space(
        self, tick_id: str, persona_id: str, space_id: str, via: str, space_type: str = "personal"
    ) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            # A retried tick may resolve again; the latest attempt's space is the one it played in.
            values = {
                "tick_id": tick_id,
                "persona_id": persona_id,
                "space_id": space_id,
                "via": via,
                "space_type": space_type,
                "at": now,
            }
            await self._upsert(conn, tick_spaces, values)
            await conn.execute(ticks.update().where(ticks.c.tick_id == tick_id).values(stage="mcp"))

    async def tick_space(self, tick_id: str) -> tuple[str, str] | None:
        """(space id, via) of a tick, for reports and tests."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(tick_spaces.c.space_id, tick_spaces.c.via).where(tick_spaces.c.tick_id == tick_id)
                )
            ).first()
        return (str(row[0]), str(row[1])) if row is not None else None

    async def tick_space_type(self, tick_id: str) -> str | None:
        """The type of the space a tick played in (personal, family, team, …)."""
        async with self._engine.connect() as conn:
            found = await conn.scalar(sa.select(tick_spaces.c.space_type).where(tick_spaces.c.tick_id == tick_id))
        return str(found) if found is not None else None

    async def begin_call(self, tick_id: str, seq: int, tool_name: str, input_hash: str | None) -> None:
        """Journal a call as pending before it is sent; raises LeaseLost if the tick is no longer ours.

        The lease check and the pending row are one transaction, and a recovering replica seals
        under the same row lock: either this call is in the sealed batch, or it is never made.
        """
        async with self._write() as conn:
            now = await self._now(conn)
            held = await conn.scalar(
                ticks.update()
                .where(ticks.c.tick_id == tick_id, self._mine())
                .values(lease_until=now + self.lease_s)
                .returning(ticks.c.tick_id)
            )
            if held is None:
                raise LeaseLost(f"tick {tick_id}: lease lost; another replica sealed it")
            await conn.execute(
                calls.insert().values(
                    tick_id=tick_id,
                    seq=seq,
                    tool_name=clean_text(tool_name, 255),
                    input_hash=input_hash,
                    status="pending",
                )
            )

    async def end_call(self, tick_id: str, seq: int, ok: bool, error_message: str | None, latency_ms: int) -> None:
        async with self._write() as conn:
            await conn.execute(
                calls.update()
                .where(calls.c.tick_id == tick_id, calls.c.seq == seq)
                .values(
                    status="ok" if ok else "error",
                    error_message=None if error_message is None else clean_text(error_message),
                    latency_ms=latency_ms,
                )
            )

    async def save_ratings(self, tick_id: str, rows: Iterable[FeedbackRow]) -> None:
        async with self._write() as conn:
            for row in rows:
                await conn.execute(
                    ratings.insert().values(tick_id=tick_id, module=row.module, rating=row.rating, notes=row.notes)
                )
            await conn.execute(ticks.update().where(ticks.c.tick_id == tick_id).values(stage="seal"))

    async def seal(self, tick_id: str, outcome: str, tick_row: ActionRow | None, stage: str | None = None) -> bool:
        """Freeze the tick's rows into batches; after this nothing about the tick changes.

        `stage` is where a failing tick was (login, play, ...): its finding is named after it.
        False when this replica no longer holds the tick (another one sealed it as interrupted).
        """
        async with self._write() as conn:
            now = await self._now(conn)
            return await self._seal(conn, tick_id, outcome, tick_row, now, when=self._mine(), stage=stage)

    async def _seal(
        self,
        conn: AsyncConnection,
        tick_id: str,
        outcome: str,
        tick_row: ActionRow | None,
        now: float,
        *,
        when: sa.ColumnElement[bool],
        stage: str | None = None,
    ) -> bool:
        # The state change comes first and is conditional: it takes the row lock, so of two
        # replicas sealing one tick exactly one writes its batches, and the other finds nothing to do.
        sealed = (
            await conn.execute(
                ticks.update()
                .where(ticks.c.tick_id == tick_id, when)
                .values(state="sealed", outcome=outcome, updated_at=now, lease_until=None)
                .returning(ticks.c.persona_id, ticks.c.window)
            )
        ).first()
        if sealed is None:
            return False
        persona_id, window = str(sealed.persona_id), str(sealed.window)
        action_rows = [
            ActionRow(
                tool_name=r.tool_name,
                result="ok" if r.status == "ok" else "error",
                input_hash=r.input_hash,
                # A pending call may or may not have reached mana-mcp: say so rather than guess.
                error_message=r.error_message
                if r.status != "pending"
                else "outcome unknown: runner stopped during the call",
                latency_ms=r.latency_ms,
            )
            for r in (
                await conn.execute(sa.select(calls).where(calls.c.tick_id == tick_id).order_by(calls.c.seq))
            ).all()
        ]
        feedback_rows = [
            FeedbackRow(r.module, r.rating, r.notes)
            for r in (
                await conn.execute(sa.select(ratings).where(ratings.c.tick_id == tick_id).order_by(ratings.c.module))
            ).all()
        ]
        space = await conn.scalar(sa.select(tick_spaces.c.space_id).where(tick_spaces.c.tick_id == tick_id))
        # The read model, from the very rows that are frozen, in the same transaction.
        parse_failure = next((r.notes or "" for r in feedback_rows if r.module == PARSE_MODULE), None)
        await record_sealed(
            conn,
            SealedTick(
                tick_id=tick_id,
                persona_id=persona_id,
                window=window,
                outcome=outcome,
                stage=stage or outcome,
                calls=[
                    SealedCall(r.tool_name, r.result == "ok", r.error_message, r.latency_ms, r.input_hash)
                    for r in action_rows
                ],
                ratings=[(r.module, r.rating) for r in feedback_rows if r.module != PARSE_MODULE],
                parse_failure=parse_failure,
                tick_error=tick_row.error_message or "error"
                if tick_row is not None and tick_row.result == "error"
                else None,
                space_id=None if space is None else str(space),
                now=now,
            ),
        )
        if tick_row is not None:
            action_rows.append(tick_row)
        await freeze(conn, tick_id, persona_id, action_rows, feedback_rows, now)
        return True

    async def recover(self) -> list[str]:
        """Seal the ticks nobody holds any more as interrupted; their day is never replayed.

        Every live replica calls this as it polls, so a dead replica's ticks are closed (and
        their batches sent) by the others. One transaction per tick keeps each lock short.
        """
        async with self._engine.connect() as conn:
            now = await self._now(conn)
            candidates = (
                (
                    await conn.execute(
                        sa.select(ticks.c.tick_id).where(self._abandoned(now)).order_by(ticks.c.tick_id).limit(500)
                    )
                )
                .scalars()
                .all()
            )
        sealed: list[str] = []
        row = ActionRow(TICK_ROW, "error", error_message="interrupted: the runner stopped during this tick")
        for tick_id in candidates:
            async with self._write() as conn:
                now = await self._now(conn)
                # Judged again under the row lock: a lease renewed meanwhile keeps the tick alive.
                if await self._seal(conn, tick_id, "interrupted", row, now, when=self._abandoned(now)):
                    sealed.append(tick_id)
        return sealed

    async def prune(self, older_than_s: float) -> int:
        """Forget ticks sealed more than `older_than_s` ago whose every batch the API accepted.

        Keeps the journal's size flat over weeks. A tick with an unsent or refused batch stays:
        its rows are not safe anywhere else yet. Claims only ever look at the current window,
        so pruning ticks older than a day changes no decision. Works in chunks of PRUNE_CHUNK
        ticks, one short transaction each, so any backlog of prunable ticks shrinks.
        """
        total = 0
        while True:
            async with self._write() as conn:
                before = await self._now(conn) - older_than_s
                unfinished = sa.select(batches.c.tick_id).where(batches.c.state != "delivered")
                old = (
                    (
                        await conn.execute(
                            sa.select(ticks.c.tick_id)
                            .where(
                                ticks.c.state == "sealed",
                                ticks.c.updated_at < before,
                                ticks.c.tick_id.not_in(unfinished),
                            )
                            .limit(PRUNE_CHUNK)
                        )
                    )
                    .scalars()
                    .all()
                )
                # Their cost stays counted in cost_days; the per-call rows go with the tick.
                for table in (calls, ratings, batches, tick_spaces, model_calls, ticks):
                    await conn.execute(table.delete().where(table.c.tick_id.in_(old)))
            total += len(old)
            if len(old) < PRUNE_CHUNK:
                return total
            await asyncio.sleep(0)  # let ticks waiting for the write lock in between chunks

    async def tick_state(self, tick_id: str) -> dict[str, Any] | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(ticks).where(ticks.c.tick_id == tick_id))).mappings().first()
        return dict(row) if row else None

    async def summaries(self, tick_ids: list[str]) -> dict[str, TickSummary]:
        """What each tick did, for the demo's table and `once`'s report."""
        out: dict[str, TickSummary] = {}
        async with self._engine.connect() as conn:
            for tid in tick_ids:
                outcome = await conn.scalar(sa.select(ticks.c.outcome).where(ticks.c.tick_id == tid))
                statuses = (await conn.execute(sa.select(calls.c.status).where(calls.c.tick_id == tid))).scalars().all()
                rated = (
                    await conn.execute(
                        sa.select(ratings.c.module, ratings.c.rating)
                        .where(ratings.c.tick_id == tid)
                        .order_by(ratings.c.module)
                    )
                ).all()
                out[tid] = TickSummary(
                    outcome=outcome or "open",
                    ok=statuses.count("ok"),
                    errors=len(statuses) - statuses.count("ok"),
                    ratings=[(m, r) for m, r in rated],
                )
        return out
