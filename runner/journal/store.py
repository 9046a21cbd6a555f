"""The journal's ground floor: opening the database (SQLite or PostgreSQL), its owner lock, and the
few primitives every concern builds on: one write transaction, the database clock, upserts, leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_insert
from sqlalchemy.dialects import sqlite as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runner.schema import SchemaError, check, clock, ready_probe, ticks, upgrade


def insert(dialect: str, table: sa.Table) -> sqlite_insert.Insert | pg_insert.Insert:
    """The dialect's INSERT, which has ON CONFLICT (upserts) on both SQLite and PostgreSQL."""
    return pg_insert.insert(table) if dialect == "postgresql" else sqlite_insert.insert(table)


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


class LeaseLost(Exception):
    """This replica no longer holds the tick: its lease ran out and another replica sealed it."""


def replica_id() -> str:
    """Who holds a lease: host, process and a random part, so a restarted process is someone new."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


class Store:
    """What every part of the journal stands on; `Journal` (in __init__) is the sum of the parts."""

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
        return insert(self._engine.dialect.name, table)

    async def _upsert(self, conn: AsyncConnection, table: sa.Table, values: dict[str, Any]) -> None:
        keys = [c.name for c in table.primary_key.columns]
        stmt = self._insert(table).values(**values)
        await conn.execute(
            stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in values.items() if k not in keys})
        )

    @classmethod
    async def open(cls, where: Path | str, *, own: bool = True, lease_s: float = 60.0, read_only: bool = False) -> Self:
        """Open (or create) the journal and migrate it; raises JournalError, one line, for any problem.

        `where` is the SQLite file (a Path) or a PostgreSQL URL (`postgresql+asyncpg://...`).
        `own=False` is for the maintenance commands: they read counts, flip batch states and
        record login blocks in single short transactions, which is safe beside a running owner.
        `read_only=True` is for the report and status: an existing journal at this code's version,
        opened without a write (no migration, no probe), so it never waits on nor holds up a writer.
        """
        if read_only and isinstance(where, Path) and not where.is_file():
            raise JournalError(f"journal {where}: no such file")
        if isinstance(where, Path):
            label, owner, engine = _sqlite(where, own and not read_only)
        else:
            url = sa.engine.make_url(where)
            label, owner = f"journal {url.render_as_string(hide_password=True)}", None
            # Generous pool wait: at high concurrency ticks queue for a connection instead of failing.
            engine = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_timeout=120, pool_pre_ping=True, connect_args={"timeout": 10}
            )
        try:
            async with engine.begin() as conn:
                await conn.run_sync(check if read_only else _prepare)
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

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads only (the report): on SQLite's WAL it neither waits for nor blocks the writer."""
        async with self._engine.connect() as conn:
            yield conn

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

    async def writable(self) -> bool:
        """For /ready: a real write transaction, not just an open connection."""
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(ready_probe.delete())
            await conn.execute(ready_probe.insert().values(at=now))
        return True
