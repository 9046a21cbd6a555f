"""The durable record of every tick: what it claimed, each tool call, its rating, its batches.

Write-ahead, in this order, each step committed before the next starts:
  claim (tick row) -> call intent (pending) -> call outcome -> ratings -> seal -> batches
A tool call is journaled as *pending* before it is sent, so a SIGKILL at any point leaves
a row for every call that may have reached mana-mcp; recovery turns pending into an error
row ("outcome unknown") instead of guessing. Sealing freezes a tick's rows into batches
whose bytes never change again: the outbox re-sends exactly those bytes until the API
takes them, so the API's row ids ("{tickId}-{index}-{tool}") come out the same on every
retry and nothing is doubled.

SQLAlchemy Core keeps the SQL portable: SQLite (WAL, synchronous=FULL) is the default, and a
PostgreSQL journal is shared by any number of replicas. Every decision that involves time
(leases, retry times, backoff, pruning) is judged by the database's clock, never a replica's.

Several replicas coordinate through the database alone: a claim is the insert of a unique
(persona, window) row; a running tick carries its replica and a lease that the replica renews;
a tick whose lease ran out is sealed as interrupted by whichever live replica finds it first,
under a row lock that also fences the late owner's next call (LeaseLost); a batch is sent by one
replica at a time (SKIP LOCKED and a delivery lease).

A SQLite journal belongs to one process: `open` takes an exclusive OS lock (flock on
`<journal>.lock`) for the life of the process, which also proves that every tick another process
left running is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_insert
from sqlalchemy.dialects import sqlite as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runner.persona import TICK_ROW, ActionRow, FeedbackRow, clean_text
from runner.schema import (
    SchemaError,
    batches,
    calls,
    clock,
    login_blocks,
    persona_vaults,
    personal_spaces,
    ratings,
    ready_probe,
    tick_spaces,
    ticks,
    upgrade,
)

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


def _sqlite(path: Path, own: bool) -> tuple[str, _OwnerLock | None, AsyncEngine]:
    """The SQLite journal's file checks, its owner lock, and an engine with the pragmas it needs."""
    label = f"journal {path}"
    try:
        if path.exists() and path.is_dir():
            raise JournalError(f"{label}: is a directory")
        if path.exists() and not path.is_file():
            raise JournalError(f"{label}: not a regular file")
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JournalError(f"{label}: {exc.strerror or exc}") from None
    owner = _OwnerLock.acquire(path) if own else None
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _: Any) -> None:
        cursor = dbapi_conn.cursor()
        # WAL lets /ready and the outbox read while a tick writes; FULL survives power loss too.
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    return label, owner, engine


def _prepare(conn: sa.Connection) -> None:
    """Bring the schema up to date, then prove the database usable before any tick relies on it."""
    upgrade(conn)
    if conn.dialect.name == "sqlite":
        # Reads every page once: a truncated or damaged file is refused now, not mid-tick.
        verdict = conn.exec_driver_sql("PRAGMA quick_check(1)").scalar()
        if verdict != "ok":
            raise JournalError(f"corrupt: {str(verdict).splitlines()[0][:200]}")
    # Opening a read-only file (or connecting as a read-only role) succeeds; only a write tells.
    conn.execute(ready_probe.delete())


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


class LeaseLost(Exception):
    """This replica no longer holds the tick: its lease ran out and another replica sealed it."""


def replica_id() -> str:
    """Who holds a lease: host, process and a random part, so a restarted process is someone new."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


class Journal:
    def __init__(self, engine: AsyncEngine, owner: _OwnerLock | None = None, lease_s: float = 60.0) -> None:
        self._engine = engine
        self._owner = owner
        self._clock = clock(engine.dialect.name)
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer at a time (see _write); PostgreSQL takes row locks, many writers.
        self._write_lock: asyncio.Lock | None = None if self._postgres else asyncio.Lock()
        self.lease_s = lease_s
        self.replica = replica_id()
        self.kind = "postgresql" if self._postgres else "sqlite"

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (on SQLite, one at a time in this process).

        SQLite has a single write lock; a writer holds it across event-loop round trips and
        SQLite's busy handler only sleeps, so many concurrent ticks could time out on it
        ("database is locked", seen at concurrency 32 in bench/). Queueing here is fair and never times out.
        """
        async with self._write_lock or contextlib.nullcontext(), self._engine.begin() as conn:
            yield conn

    async def _now(self, conn: AsyncConnection) -> float:
        """The database's clock: the one clock every replica agrees on for leases and retry times."""
        return float(await conn.scalar(sa.select(self._clock)) or 0.0)

    def _insert(self, table: sa.Table) -> sqlite_insert.Insert | pg_insert.Insert:
        return pg_insert.insert(table) if self._postgres else sqlite_insert.insert(table)

    async def _upsert(self, conn: AsyncConnection, table: sa.Table, values: dict[str, Any]) -> None:
        keys = [c.name for c in table.primary_key.columns]
        stmt = self._insert(table).values(**values)
        await conn.execute(
            stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in values.items() if k not in keys})
        )

    @classmethod
    async def open(cls, where: Path | str, *, own: bool = True, lease_s: float = 60.0) -> Journal:
        """Open (or create) the journal and migrate it; raises JournalError, one line, for any problem.

        `where` is the SQLite file (a Path) or a PostgreSQL URL (`postgresql+asyncpg://...`).
        `own=False` is for the maintenance commands: they read counts, flip batch states and
        record login blocks in single short transactions, which is safe beside a running owner.
        """
        if isinstance(where, Path):
            label, owner, engine = _sqlite(where, own)
        else:
            url = sa.engine.make_url(where)
            label, owner = f"journal {url.render_as_string(hide_password=True)}", None
            # Generous pool wait: at high concurrency ticks queue for a connection instead of failing.
            engine = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_timeout=120, pool_pre_ping=True, connect_args={"timeout": 10}
            )
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_prepare)
        except BaseException as exc:
            await engine.dispose()
            if owner is not None:
                owner.release()
            if isinstance(exc, (JournalError, SchemaError)):
                raise JournalError(f"{label}: {exc}") from None
            if isinstance(exc, (sa.exc.SQLAlchemyError, sqlite3.Error, OSError)):
                raise JournalError(f"{label}: {_db_problem(exc)}") from None
            raise
        return cls(engine, owner, lease_s)

    async def close(self) -> None:
        await self._engine.dispose()
        if self._owner is not None:
            self._owner.release()

    def _mine(self) -> sa.ColumnElement[bool]:
        return sa.and_(ticks.c.state == "running", ticks.c.owner == self.replica)

    def _abandoned(self, now: float) -> sa.ColumnElement[bool]:
        """Running ticks nobody holds any more.

        On PostgreSQL, those whose lease ran out: their replica died or lost the database. With
        SQLite the owner lock proves every other process that wrote the file is gone, so all
        ticks but this process's own are abandoned, whatever their lease says.
        """
        if self._owner is not None:
            return sa.and_(ticks.c.state == "running", sa.or_(ticks.c.owner.is_(None), ticks.c.owner != self.replica))
        return sa.and_(ticks.c.state == "running", sa.or_(ticks.c.lease_until.is_(None), ticks.c.lease_until < now))

    async def claim(self, persona_id: str, window: str, tick_id: str) -> Claim | None:
        """Take (persona, window) for one run; None when it is done, running or not yet due for a retry.

        Atomic across replicas: the insert of the tick row is the claim, and a second claimant's
        insert does nothing on the unique (persona, window); a retry is taken by a conditional update.
        """
        async with self._write() as conn:
            now = await self._now(conn)
            await self._supersede_retries(conn, persona_id, tick_id, now)
            lease = {"owner": self.replica, "lease_until": now + self.lease_s, "updated_at": now}
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
            return Claim(tick_id, int(attempt)) if attempt is not None else None

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
            await self._seal(conn, old_id, "failed", row, now, when=ticks.c.state == "retry")

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

    async def block_login(
        self, persona_id: str, secret_fingerprint: str, reason: str, email: str | None = None
    ) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                self._insert(login_blocks)
                .values(
                    persona_id=persona_id,
                    secret_fingerprint=secret_fingerprint,
                    reason=clean_text(reason, 500),
                    created_at=now,
                    email=email,
                )
                .on_conflict_do_nothing()
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

    async def known_space(self, persona_id: str, max_age_s: float) -> str | None:
        """The persona's remembered personal space, if it was looked up within `max_age_s`."""
        async with self._engine.connect() as conn:
            space = await conn.scalar(
                sa.select(personal_spaces.c.space_id).where(
                    personal_spaces.c.persona_id == persona_id, personal_spaces.c.resolved_at > self._clock - max_age_s
                )
            )
            return str(space) if space is not None else None

    async def remember_space(self, persona_id: str, space_id: str) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await self._upsert(
                conn, personal_spaces, {"persona_id": persona_id, "space_id": space_id, "resolved_at": now}
            )

    async def forget_space(self, persona_id: str) -> None:
        """Mana refused the remembered space: the next tick looks it up again."""
        async with self._write() as conn:
            await conn.execute(personal_spaces.delete().where(personal_spaces.c.persona_id == persona_id))

    async def vault_known(self, persona_id: str) -> bool:
        async with self._engine.connect() as conn:
            found = await conn.scalar(sa.select(persona_vaults.c.how).where(persona_vaults.c.persona_id == persona_id))
            return found is not None

    async def remember_vault(self, persona_id: str, how: Literal["found", "created"]) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await self._upsert(conn, persona_vaults, {"persona_id": persona_id, "how": how, "at": now})

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

    async def seal(self, tick_id: str, outcome: str, tick_row: ActionRow | None) -> bool:
        """Freeze the tick's rows into batches; after this nothing about the tick changes.

        False when this replica no longer holds the tick (another one sealed it as interrupted).
        """
        async with self._write() as conn:
            now = await self._now(conn)
            return await self._seal(conn, tick_id, outcome, tick_row, now, when=self._mine())

    async def _seal(
        self,
        conn: AsyncConnection,
        tick_id: str,
        outcome: str,
        tick_row: ActionRow | None,
        now: float,
        *,
        when: sa.ColumnElement[bool],
    ) -> bool:
        # The state change comes first and is conditional: it takes the row lock, so of two
        # replicas sealing one tick exactly one writes its batches, and the other finds nothing to do.
        persona_id = await conn.scalar(
            ticks.update()
            .where(ticks.c.tick_id == tick_id, when)
            .values(state="sealed", outcome=outcome, updated_at=now, lease_until=None)
            .returning(ticks.c.persona_id)
        )
        if persona_id is None:
            return False
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
                    persona_id=persona_id,
                    kind=kind,
                    body=body,
                    rows=len(rows),
                    state="pending",
                    attempts=0,
                    created_at=now,
                )
            )
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

    async def take_batch(self, after_id: int = 0) -> Batch | None:
        """The next unsent batch past `after_id` that is due and that no replica is sending.

        Taken with a delivery lease: SKIP LOCKED lets replicas pick different batches at the
        same moment, and the lease keeps the batch theirs while the POST is under way (no
        transaction is held open across HTTP). A sender that dies leaves a lease that runs out.
        A sweep walks forward by id, so each batch is tried at most once per sweep.
        """
        async with self._write() as conn:
            now = await self._now(conn)
            row = (
                (
                    await conn.execute(
                        sa.select(batches)
                        .where(
                            batches.c.state.in_(UNSENT),
                            batches.c.id > after_id,
                            sa.or_(batches.c.next_attempt_at.is_(None), batches.c.next_attempt_at <= now),
                            sa.or_(batches.c.lease_until.is_(None), batches.c.lease_until < now),
                        )
                        .order_by(batches.c.id)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            await conn.execute(
                batches.update()
                .where(batches.c.id == row["id"])
                .values(lease_owner=self.replica, lease_until=now + self.lease_s)
            )
        return Batch(row["id"], row["tick_id"], row["persona_id"], row["kind"], row["body"], row["rows"])

    async def pending_batches(self) -> list[Batch]:
        """Every unsent batch, whatever its backoff or lease (tests and tools)."""
        async with self._engine.connect() as conn:
            rows = (
                (await conn.execute(sa.select(batches).where(batches.c.state.in_(UNSENT)).order_by(batches.c.id)))
                .mappings()
                .all()
            )
        return [Batch(r["id"], r["tick_id"], r["persona_id"], r["kind"], r["body"], r["rows"]) for r in rows]

    async def mark_batch(self, batch_id: int, state: BatchState, error: str | None) -> None:
        """Record one attempt that ended the batch's wait: delivered or refused.

        Only an unsent batch changes: a slow sender whose lease ran out while another replica
        delivered the same batch must not turn it back into anything else.
        """
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.state.in_(UNSENT))
                .values(
                    state=state,
                    attempts=batches.c.attempts + 1,
                    last_error=None if error is None else clean_text(error, 500),
                    delivered_at=now if state == "delivered" else None,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_until=None,
                )
            )

    async def fail_batch(
        self, batch_id: int, error: str, schedule: Callable[[int], tuple[BatchState, float]]
    ) -> tuple[int, BatchState, float, bool] | None:
        """Count a failed attempt and set the batch's own next attempt, `schedule(attempts)` -> (state, wait s).

        Returns the attempts, the new state, the wait, and whether the batch has just been parked;
        None when the batch is no longer unsent (another replica delivered or refused it meanwhile).
        """
        async with self._write() as conn:
            now = await self._now(conn)
            before = (
                await conn.execute(
                    sa.select(batches.c.attempts, batches.c.state).where(
                        batches.c.id == batch_id, batches.c.state.in_(UNSENT)
                    )
                )
            ).first()
            if before is None:
                return None
            attempts = 1 + int(before.attempts)
            state, wait_s = schedule(attempts)
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id)
                .values(
                    state=state,
                    attempts=attempts,
                    last_error=clean_text(error, 500),
                    next_attempt_at=now + wait_s,
                    lease_owner=None,
                    lease_until=None,
                )
            )
            return attempts, state, wait_s, state == "parked" and before.state != "parked"

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
                for table in (calls, ratings, batches, tick_spaces, ticks):
                    await conn.execute(table.delete().where(table.c.tick_id.in_(old)))
            total += len(old)
            if len(old) < PRUNE_CHUNK:
                return total
            await asyncio.sleep(0)  # let ticks waiting for the write lock in between chunks

    async def writable(self) -> bool:
        """For /ready: a real write transaction, not just an open connection."""
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(ready_probe.delete())
            await conn.execute(ready_probe.insert().values(at=now))
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
