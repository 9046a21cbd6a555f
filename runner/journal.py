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

One process owns a journal: `open` takes an exclusive OS lock (flock on `<journal>.lock`) for
the life of the process. A second runner's start-up recovery would otherwise seal the first
one's running ticks, and their later calls would never reach a batch.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runner.persona import TICK_ROW, ActionRow, FeedbackRow, clean_text

ACTIONS_PER_BATCH = 500
FEEDBACK_PER_BATCH = 100
# Rows deleted per prune transaction: SQLite caps bound variables (32766), and a short
# transaction does not hold the write lock against running ticks for long.
PRUNE_CHUNK = 500
# Batch states. `pending` waits for its next attempt; `parked` kept failing and is retried on
# the slow schedule; `refused` is the API's own final no to this batch (kept, re-drivable with
# `python -m runner outbox --retry`); `delivered` is done. `dead` is the pre-0.2 name of refused.
BatchState = Literal["pending", "parked", "refused", "delivered"]
UNSENT: tuple[BatchState, ...] = ("pending", "parked")

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
    # /diag/login knows only an email; it must see (and record) the same blocks as ticks.
    sa.Column("email", sa.String(320)),
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
    sa.Column("state", sa.String(16), nullable=False, index=True),  # see BatchState
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
    # Per-batch backoff: a failing batch waits on its own, the others go on.
    sa.Column("next_attempt_at", sa.Float),
)

# STOPGAP until versioned migrations exist: columns added after the first release, with the
# SQLite type to ADD when an older journal lacks them. Idempotent; run at every open.
_ADDED_COLUMNS: dict[tuple[str, str], str] = {
    ("batches", "next_attempt_at"): "FLOAT",
    ("login_blocks", "email"): "VARCHAR(320)",
}
_OWN_TABLES = frozenset(_meta.tables) | {"ready_probe"}


class JournalError(Exception):
    """The journal cannot be used; the message is one line naming the file and the problem."""


class _OwnerLock:
    """An exclusive flock on `<journal>.lock`, held while the file descriptor is open.

    fcntl.flock rather than the filelock package: the kernel drops the lock when the process
    dies, however it dies (SIGKILL included), so there is never a stale lock to clean up, and
    it needs no dependency. POSIX only, like the runner's signals. Local disks only (flock on
    NFS is not reliable), as the README already asks of the journal.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, journal: Path) -> _OwnerLock:
        lock_path = journal.with_name(journal.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"journal {journal}: cannot create its lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JournalError(
                    f"journal {journal}: in use by another runner process (pid {owner}); one process per journal"
                ) from None
            raise JournalError(f"journal {journal}: cannot lock: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _db_problem(exc: BaseException) -> str:
    """SQLite's own words for what is wrong with the file, on one line."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0][:200] if text else type(orig).__name__


def _check_and_upgrade(conn: sa.Connection) -> None:
    """Refuse what is not a runner journal; create what is missing; add the stopgap columns."""
    tables = set(sa.inspect(conn).get_table_names())
    if tables and not tables & _OWN_TABLES:
        foreign = ", ".join(sorted(tables)[:5])
        raise JournalError(f"not a runner journal (it holds other tables: {foreign})")
    for name in sorted(tables & set(_meta.tables)):
        present = {c["name"] for c in sa.inspect(conn).get_columns(name)}
        for column in _meta.tables[name].columns:
            if column.name in present:
                continue
            if (name, column.name) not in _ADDED_COLUMNS:
                raise JournalError(f"foreign schema: table {name} has no column {column.name}")
            conn.exec_driver_sql(f'ALTER TABLE {name} ADD COLUMN "{column.name}" {_ADDED_COLUMNS[(name, column.name)]}')
    _meta.create_all(conn)
    if "batches" in tables:
        conn.execute(batches.update().where(batches.c.state == "dead").values(state="refused"))
    # Reads every page once: a truncated or damaged file is refused now, not mid-tick.
    verdict = conn.exec_driver_sql("PRAGMA quick_check(1)").scalar()
    if verdict != "ok":
        raise JournalError(f"corrupt: {str(verdict).splitlines()[0][:200]}")
    # Opening a read-only file succeeds; only a write tells.
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS ready_probe (at REAL)")
    conn.exec_driver_sql("DELETE FROM ready_probe")


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


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """One batch as an operator sees it (`python -m runner outbox`)."""

    id: int
    tick_id: str
    kind: str
    state: str
    rows: int
    attempts: int
    last_error: str | None


class Journal:
    def __init__(self, engine: AsyncEngine, owner: _OwnerLock | None = None) -> None:
        self._engine = engine
        self._owner = owner
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
    async def open(cls, path: Path, *, own: bool = True) -> Journal:
        """Open (or create) the journal; raises JournalError, one line, for any problem with it.

        `own=False` is for the `outbox` maintenance command: it only reads counts and flips
        batch states in single short transactions, which is safe beside a running owner.
        """
        where = f"journal {path}"
        try:
            if path.exists() and path.is_dir():
                raise JournalError(f"{where}: is a directory")
            if path.exists() and not path.is_file():
                raise JournalError(f"{where}: not a regular file")
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"{where}: {exc.strerror or exc}") from None
        owner = _OwnerLock.acquire(path) if own else None
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets /ready and the outbox read while a tick writes; FULL survives power loss too.
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        try:
            async with engine.begin() as conn:
                await conn.run_sync(_check_and_upgrade)
        except BaseException as exc:
            await engine.dispose()
            if owner is not None:
                owner.release()
            if isinstance(exc, JournalError):
                raise JournalError(f"{where}: {exc}") from None
            if isinstance(exc, (sa.exc.SQLAlchemyError, sqlite3.Error, OSError)):
                raise JournalError(f"{where}: {_db_problem(exc)}") from None
            raise
        return cls(engine, owner)

    async def close(self) -> None:
        await self._engine.dispose()
        if self._owner is not None:
            self._owner.release()

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
                .values(state="retry", last_error=clean_text(error, 500), next_attempt_at=retry_at, updated_at=now)
            )

    async def block_login(
        self, persona_id: str, secret_fingerprint: str, reason: str, now: float, email: str | None = None
    ) -> None:
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
                        reason=clean_text(reason, 500),
                        created_at=now,
                        email=email,
                    )
                )

    async def login_block(self, persona_id: str | None, secret_fingerprint: str, email: str) -> str | None:
        """The reason this persona's login is not to be tried with this secret, if any.

        Looked up by email as well as by user id: the `login`/`tools` commands and /diag/login
        know a persona by its email only (a refused login reveals no user id).
        """
        who = sa.or_(login_blocks.c.email == email, login_blocks.c.persona_id == email)
        if persona_id is not None:
            who = sa.or_(who, login_blocks.c.persona_id == persona_id)
        async with self._engine.connect() as conn:
            reason = await conn.scalar(
                sa.select(login_blocks.c.reason)
                .where(who, login_blocks.c.secret_fingerprint == secret_fingerprint)
                .limit(1)
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

    async def due_batches(self, now: float, after_id: int = 0, limit: int = 50) -> list[Batch]:
        """Unsent batches whose own next attempt is due, oldest first, past `after_id`.

        A sweep walks forward by id, so each batch is tried at most once per sweep, and the
        bodies in memory stay bounded by `limit`.
        """
        async with self._engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(batches)
                        .where(
                            batches.c.state.in_(UNSENT),
                            batches.c.id > after_id,
                            sa.or_(batches.c.next_attempt_at.is_(None), batches.c.next_attempt_at <= now),
                        )
                        .order_by(batches.c.id)
                        .limit(limit)
                    )
                )
                .mappings()
                .all()
            )
        return [Batch(r["id"], r["tick_id"], r["persona_id"], r["kind"], r["body"], r["rows"]) for r in rows]

    async def pending_batches(self) -> list[Batch]:
        """Every unsent batch, whatever its backoff (tests and tools)."""
        return await self.due_batches(float("inf"), limit=1_000_000)

    async def mark_batch(
        self,
        batch_id: int,
        state: BatchState,
        error: str | None,
        now: float,
    ) -> None:
        """Record one attempt that ended the batch's wait: delivered or refused."""
        async with self._write() as conn:
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id)
                .values(
                    state=state,
                    attempts=batches.c.attempts + 1,
                    last_error=None if error is None else clean_text(error, 500),
                    delivered_at=now if state == "delivered" else None,
                    next_attempt_at=None,
                )
            )

    async def fail_batch(
        self, batch_id: int, error: str, now: float, schedule: Callable[[int], tuple[BatchState, float]]
    ) -> tuple[int, BatchState, float, bool]:
        """Count a failed attempt and set the batch's own next attempt from `schedule(attempts)`.

        Returns the attempts, the new state and time, and whether the batch has just been parked.
        """
        async with self._write() as conn:
            before = (
                await conn.execute(sa.select(batches.c.attempts, batches.c.state).where(batches.c.id == batch_id))
            ).first()
            attempts = 1 + int(before.attempts if before else 0)
            state, at = schedule(attempts)
            newly_parked = state == "parked" and (before is None or before.state != "parked")
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id)
                .values(state=state, attempts=attempts, last_error=clean_text(error, 500), next_attempt_at=at)
            )
            return attempts, state, at, newly_parked

    async def requeue(self, states: tuple[str, ...] = ("refused", "parked")) -> int:
        """Operator's re-drive: these batches go back to pending, due now, with a fresh count."""
        async with self._write() as conn:
            result = await conn.execute(
                batches.update()
                .where(batches.c.state.in_(states))
                .values(state="pending", attempts=0, next_attempt_at=None)
            )
            return int(result.rowcount or 0)

    async def batch_counts(self) -> dict[str, int]:
        """Batches by state: what /metrics and `python -m runner outbox` show."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(batches.c.state, sa.func.count()).group_by(batches.c.state))).all()
        counts = {state: 0 for state in ("pending", "parked", "refused", "delivered")}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    async def problem_batches(self, limit: int = 20) -> list[BatchStatus]:
        """Parked and refused batches, the ones an operator has to look at."""
        async with self._engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(batches)
                        .where(batches.c.state.in_(("parked", "refused")))
                        .order_by(batches.c.id)
                        .limit(limit)
                    )
                )
                .mappings()
                .all()
            )
        return [
            BatchStatus(r["id"], r["tick_id"], r["kind"], r["state"], r["rows"], r["attempts"], r["last_error"])
            for r in rows
        ]

    async def backlog(self) -> int:
        """Batches still to be sent (pending or parked); refused ones wait for an operator."""
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(batches).where(batches.c.state.in_(UNSENT))
            )
            return int(count or 0)

    async def prune(self, before: float) -> int:
        """Forget ticks sealed before `before` whose every batch the API accepted.

        Keeps the journal's size flat over weeks. A tick with an unsent or refused batch stays:
        its rows are not safe anywhere else yet. Claims only ever look at the current window,
        so pruning ticks older than a day changes no decision. Works in chunks of PRUNE_CHUNK
        ticks, one short transaction each, so any backlog of prunable ticks shrinks.
        """
        total = 0
        while True:
            async with self._write() as conn:
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
                for table in (calls, ratings, batches, tick_spaces, ticks):
                    await conn.execute(table.delete().where(table.c.tick_id.in_(old)))
            total += len(old)
            if len(old) < PRUNE_CHUNK:
                return total
            await asyncio.sleep(0)  # let ticks waiting for the write lock in between chunks

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
