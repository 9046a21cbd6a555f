"""The durable record of every tick: what it claimed, each tool call, its rating, its batches.

Write-ahead, in this order, each step committed before the next starts:
  claim (tick row) -> call intent (pending) -> call outcome -> ratings -> seal -> batches
A tool call is journaled as *pending* before it is sent, so a SIGKILL at any point leaves
a row for every call that may have reached mana-mcp; recovery turns pending into an error
row ("outcome unknown") instead of guessing. Sealing freezes a tick's rows into batches
whose bytes never change again: the outbox re-sends exactly those bytes until the API
takes them, so the API's row ids ("{tickId}-{index}-{tool}") come out the same on every
retry and nothing is doubled.

SQLAlchemy Core keeps the SQL portable; SQLite (WAL, synchronous=FULL) is the default.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runner.persona import TICK_ROW, ActionRow, FeedbackRow

ACTIONS_PER_BATCH = 500
FEEDBACK_PER_BATCH = 100

_meta = sa.MetaData()
ticks = sa.Table(
    "ticks",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("persona_id", sa.String(255), nullable=False, index=True),
    sa.Column("window", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(32)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
calls = sa.Table(
    "calls",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("tool_name", sa.String(255), nullable=False),
    sa.Column("input_hash", sa.String(16)),
    sa.Column("status", sa.String(16), nullable=False),  # pending | ok | error
    sa.Column("error_message", sa.Text),
    sa.Column("latency_ms", sa.Integer),
)
ratings = sa.Table(
    "ratings",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("module", sa.String(255), primary_key=True),
    sa.Column("rating", sa.Integer, nullable=False),
    sa.Column("notes", sa.Text),
)
# A persona whose password was refused is not tried again with the same secret: every
# INVALID_CREDENTIALS counts toward Mana's lockout, and a wrong secret would otherwise
# spend one attempt per window until the account locks. A new secret lifts the block.
login_blocks = sa.Table(
    "login_blocks",
    _meta,
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("secret_fingerprint", sa.String(32), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
# A persona's personal space id never changes (contract §3): remembering it saves the space
# lookup, which on the real mana-auth costs a second, rate-limited sign-in per tick.
personal_spaces = sa.Table(
    "personal_spaces",
    _meta,
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("space_id", sa.String(255), nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=False),
)
# The space each tick played in, and how it was known (journal | bearer | cookie).
tick_spaces = sa.Table(
    "tick_spaces",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("persona_id", sa.String(255), nullable=False),
    sa.Column("space_id", sa.String(255), nullable=False),
    sa.Column("via", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)
batches = sa.Table(
    "batches",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tick_id", sa.String(64), nullable=False, index=True),
    sa.Column("persona_id", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # actions | feedback
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # pending | delivered | dead
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
)


@dataclass(frozen=True, slots=True)
class Claim:
    tick_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Batch:
    id: int
    tick_id: str
    persona_id: str
    kind: Literal["actions", "feedback"]
    body: bytes
    rows: int


@dataclass(frozen=True, slots=True)
class TickSummary:
    outcome: str
    ok: int
    errors: int
    ratings: list[tuple[str, int]]


class Journal:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction at a time.

        SQLite has a single write lock; a writer holds it across event-loop round trips and
        SQLite's busy handler only sleeps, so many concurrent ticks could time out on it
        ("database is locked", seen at concurrency 32 in bench/). Queueing here is fair and never times out.
        """
        async with self._write_lock, self._engine.begin() as conn:
            yield conn

    @classmethod
    async def open(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets /ready and the outbox read while a tick writes; FULL survives power loss too.
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        async with engine.begin() as conn:
            await conn.run_sync(_meta.create_all)
        return cls(engine)

    async def close(self) -> None:
        await self._engine.dispose()

    async def claim(
        self, persona_id: str, window: str, tick_id: str, now: float, retry_at_least: float | None = None
    ) -> Claim | None:
        """Take (persona, window) for one run; None when it is done, running or not yet due for a retry."""
        async with self._write() as conn:
            row = (await conn.execute(sa.select(ticks).where(ticks.c.tick_id == tick_id))).mappings().first()
            if row is None:
                await self._supersede_retries(conn, persona_id, tick_id, now)
                await conn.execute(
                    ticks.insert().values(
                        tick_id=tick_id,
                        persona_id=persona_id,
                        window=window,
                        state="running",
                        attempts=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
                return Claim(tick_id, 1)
            if row["state"] != "retry" or (row["next_attempt_at"] or 0) > now:
                return None
            attempt = row["attempts"] + 1
            await conn.execute(
                ticks.update()
                .where(ticks.c.tick_id == tick_id)
                .values(state="running", attempts=attempt, next_attempt_at=None, updated_at=now)
            )
            return Claim(tick_id, attempt)

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
            await self._seal(conn, old_id, "failed", ActionRow(TICK_ROW, "error", error_message=last_error), now)

    async def defer(self, tick_id: str, error: str, retry_at: float, now: float) -> None:
        """A failure before any tool call: nothing happened in Mana, so running again is safe."""
        async with self._write() as conn:
            await conn.execute(
                ticks.update()
                .where(ticks.c.tick_id == tick_id)
                .values(state="retry", last_error=error[:500], next_attempt_at=retry_at, updated_at=now)
            )

    async def block_login(self, persona_id: str, secret_fingerprint: str, reason: str, now: float) -> None:
        async with self._write() as conn:
            exists = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(login_blocks)
                .where(login_blocks.c.persona_id == persona_id, login_blocks.c.secret_fingerprint == secret_fingerprint)
            )
            if not exists:
                await conn.execute(
                    login_blocks.insert().values(
                        persona_id=persona_id,
                        secret_fingerprint=secret_fingerprint,
                        reason=reason[:500],
                        created_at=now,
                    )
                )

    async def login_block(self, persona_id: str, secret_fingerprint: str) -> str | None:
        """The reason this persona's login is not to be tried with this secret, if any."""
        async with self._engine.connect() as conn:
            reason = await conn.scalar(
                sa.select(login_blocks.c.reason).where(
                    login_blocks.c.persona_id == persona_id, login_blocks.c.secret_fingerprint == secret_fingerprint
                )
            )
            return str(reason) if reason is not None else None

    async def known_space(self, persona_id: str, resolved_after: float) -> str | None:
        """The persona's remembered personal space, if it was looked up after `resolved_after`."""
        async with self._engine.connect() as conn:
            space = await conn.scalar(
                sa.select(personal_spaces.c.space_id).where(
                    personal_spaces.c.persona_id == persona_id, personal_spaces.c.resolved_at > resolved_after
                )
            )
            return str(space) if space is not None else None

    async def remember_space(self, persona_id: str, space_id: str, now: float) -> None:
        async with self._write() as conn:
            await conn.execute(personal_spaces.delete().where(personal_spaces.c.persona_id == persona_id))
            await conn.execute(
                personal_spaces.insert().values(persona_id=persona_id, space_id=space_id, resolved_at=now)
            )

    async def forget_space(self, persona_id: str) -> None:
        """Mana refused the remembered space: the next tick looks it up again."""
        async with self._write() as conn:
            await conn.execute(personal_spaces.delete().where(personal_spaces.c.persona_id == persona_id))

    async def record_tick_space(self, tick_id: str, persona_id: str, space_id: str, via: str, now: float) -> None:
        async with self._write() as conn:
            # A retried tick may resolve again; the latest attempt's space is the one it played in.
            await conn.execute(tick_spaces.delete().where(tick_spaces.c.tick_id == tick_id))
            await conn.execute(
                tick_spaces.insert().values(tick_id=tick_id, persona_id=persona_id, space_id=space_id, via=via, at=now)
            )

    async def tick_space(self, tick_id: str) -> tuple[str, str] | None:
        """(space id, via) of a tick, for reports and tests."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(tick_spaces.c.space_id, tick_spaces.c.via).where(tick_spaces.c.tick_id == tick_id)
                )
            ).first()
        return (str(row[0]), str(row[1])) if row is not None else None

    async def begin_call(self, tick_id: str, seq: int, tool_name: str, input_hash: str | None) -> None:
        async with self._write() as conn:
            await conn.execute(
                calls.insert().values(
                    tick_id=tick_id, seq=seq, tool_name=tool_name, input_hash=input_hash, status="pending"
                )
            )

    async def end_call(self, tick_id: str, seq: int, ok: bool, error_message: str | None, latency_ms: int) -> None:
        async with self._write() as conn:
            await conn.execute(
                calls.update()
                .where(calls.c.tick_id == tick_id, calls.c.seq == seq)
                .values(status="ok" if ok else "error", error_message=error_message, latency_ms=latency_ms)
            )

    async def save_ratings(self, tick_id: str, rows: Iterable[FeedbackRow]) -> None:
        async with self._write() as conn:
            for row in rows:
                await conn.execute(
                    ratings.insert().values(tick_id=tick_id, module=row.module, rating=row.rating, notes=row.notes)
                )

    async def seal(self, tick_id: str, outcome: str, tick_row: ActionRow | None, now: float) -> None:
        """Freeze the tick's rows into batches; after this nothing about the tick changes."""
        async with self._write() as conn:
            await self._seal(conn, tick_id, outcome, tick_row, now)

    async def _seal(
        self, conn: AsyncConnection, tick_id: str, outcome: str, tick_row: ActionRow | None, now: float
    ) -> None:
        tick = (await conn.execute(sa.select(ticks).where(ticks.c.tick_id == tick_id))).mappings().first()
        if tick is None or tick["state"] == "sealed":
            return
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
        if tick_row is not None:
            action_rows.append(tick_row)
        feedback_rows = [
            FeedbackRow(r.module, r.rating, r.notes)
            for r in (
                await conn.execute(sa.select(ratings).where(ratings.c.tick_id == tick_id).order_by(ratings.c.module))
            ).all()
        ]
        # The API ids a row by its index in the request, so a tick's actions must travel as
        # ONE batch forever: the loop caps calls per tick far below the 500-row limit.
        assert len(action_rows) <= ACTIONS_PER_BATCH, "a tick's actions must fit one batch"
        planned: list[tuple[str, list[dict[str, Any]]]] = []
        if action_rows:
            planned.append(("actions", [r.to_json(tick_id) for r in action_rows]))
        for start in range(0, len(feedback_rows), FEEDBACK_PER_BATCH):
            chunk = feedback_rows[start : start + FEEDBACK_PER_BATCH]
            planned.append(("feedback", [r.to_json(tick_id) for r in chunk]))
        for kind, rows in planned:
            body = json.dumps({kind: rows}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            await conn.execute(
                batches.insert().values(
                    tick_id=tick_id,
                    persona_id=tick["persona_id"],
                    kind=kind,
                    body=body,
                    rows=len(rows),
                    state="pending",
                    attempts=0,
                    created_at=now,
                )
            )
        await conn.execute(
            ticks.update().where(ticks.c.tick_id == tick_id).values(state="sealed", outcome=outcome, updated_at=now)
        )

    async def recover(self, now: float) -> list[str]:
        """Close ticks a dead process left running; their day is never replayed."""
        async with self._write() as conn:
            running = (await conn.execute(sa.select(ticks.c.tick_id).where(ticks.c.state == "running"))).scalars().all()
            for tick_id in running:
                row = ActionRow(TICK_ROW, "error", error_message="interrupted: the runner stopped during this tick")
                await self._seal(conn, tick_id, "interrupted", row, now)
            return list(running)

    async def pending_batches(self) -> list[Batch]:
        async with self._engine.connect() as conn:
            rows = (
                (await conn.execute(sa.select(batches).where(batches.c.state == "pending").order_by(batches.c.id)))
                .mappings()
                .all()
            )
        return [Batch(r["id"], r["tick_id"], r["persona_id"], r["kind"], r["body"], r["rows"]) for r in rows]

    async def mark_batch(
        self, batch_id: int, state: Literal["pending", "delivered", "dead"], error: str | None, now: float
    ) -> None:
        async with self._write() as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id)
                .values(
                    state=state,
                    attempts=batches.c.attempts + 1,
                    last_error=error,
                    delivered_at=now if state == "delivered" else None,
                )
            )

    async def backlog(self) -> int:
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(batches).where(batches.c.state == "pending")
            )
            return int(count or 0)

    async def prune(self, before: float) -> int:
        """Forget ticks sealed before `before` whose every batch the API accepted.

        Keeps the journal's size flat over weeks. A tick with a pending or dead batch stays:
        its rows are not safe anywhere else yet. Claims only ever look at the current window,
        so pruning ticks older than a day changes no decision.
        """
        async with self._write() as conn:
            unfinished = sa.select(batches.c.tick_id).where(batches.c.state != "delivered")
            old = (
                (
                    await conn.execute(
                        sa.select(ticks.c.tick_id).where(
                            ticks.c.state == "sealed", ticks.c.updated_at < before, ticks.c.tick_id.not_in(unfinished)
                        )
                    )
                )
                .scalars()
                .all()
            )
            for table in (calls, ratings, batches, tick_spaces, ticks):
                await conn.execute(table.delete().where(table.c.tick_id.in_(old)))
            return len(old)

    async def writable(self) -> bool:
        """For /ready: a real write transaction, not just an open file."""
        async with self._write() as conn:
            await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS ready_probe (at REAL)"))
            await conn.execute(sa.text("DELETE FROM ready_probe"))
            await conn.execute(sa.text("INSERT INTO ready_probe (at) VALUES (:at)"), {"at": time.time()})
        return True

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
