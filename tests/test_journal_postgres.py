"""The journal on a real PostgreSQL server, as several replicas share it: migrations racing,
atomic claims, leases judged by the database's clock, fencing of a replica that lost its lease,
and batches taken by one sender at a time."""

from __future__ import annotations

import asyncio
import json

import sqlalchemy as sa
from pg import PgServer
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from runner.journal import Journal, JournalError, LeaseLost
from runner.persona import TICK_ROW, ActionRow
from runner.schema import SCHEMA_VERSION


async def _versions(url: str) -> list[int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(sa.text("SELECT version FROM schema_migrations ORDER BY 1"))).scalars())
    finally:
        await engine.dispose()


async def test_replicas_starting_at_once_migrate_once(pg_url: str) -> None:
    journals = await asyncio.gather(*(Journal.open(pg_url) for _ in range(4)))
    try:
        assert await _versions(pg_url) == list(range(1, SCHEMA_VERSION + 1))
        assert len({j.replica for j in journals}) == 4
    finally:
        await asyncio.gather(*(j.close() for j in journals))


async def test_a_window_is_claimed_by_exactly_one_of_many_racing_replicas(pg_url: str) -> None:
    journals = await asyncio.gather(*(Journal.open(pg_url) for _ in range(3)))
    try:
        for round_ in range(20):
            window = f"2026-11-{round_:02d}"
            claims = await asyncio.gather(*(j.claim("p-1", window, f"t-{round_}") for j in journals for _ in range(3)))
            assert sum(c is not None for c in claims) == 1, round_
    finally:
        await asyncio.gather(*(j.close() for j in journals))


async def test_a_live_lease_is_never_recovered_and_an_expired_one_is_sealed_once_with_its_calls(
    pg_url: str,
) -> None:
    owner = await Journal.open(pg_url, lease_s=1.0)
    others = await asyncio.gather(*(Journal.open(pg_url, lease_s=1.0) for _ in range(2)))
    try:
        assert await owner.claim("p-1", "2026-11-30", "t-1")
        await owner.begin_call("t-1", 0, "todo.create", "abcd")
        await owner.end_call("t-1", 0, True, None, 5)
        await owner.begin_call("t-1", 1, "todo.list", "ef01")  # sent, no answer yet
        for _ in range(3):  # the owner keeps renewing: nobody may take the tick
            await asyncio.sleep(0.5)
            assert await owner.renew_leases() == 1
            assert await others[0].recover() == [] and await others[1].recover() == []
        await asyncio.sleep(1.3)  # the owner stalls past its lease
        recovered = await asyncio.gather(*(o.recover() for o in others))
        assert sorted(recovered, key=len) == [[], ["t-1"]]
        # The late owner is fenced: its next call is refused before it is made, and its seal is a no-op.
        try:
            await owner.begin_call("t-1", 2, "todo.complete", "0000")
            raise AssertionError("a replica without its lease journaled a call")
        except LeaseLost:
            pass
        assert await owner.seal("t-1", "ok", None) is False
        assert await owner.renew_leases() == 0
        (batch,) = await others[0].pending_batches()
        rows = json.loads(batch.body)["actions"]
        assert [r["toolName"] for r in rows] == ["todo.create", "todo.list", TICK_ROW]
        assert rows[1]["errorMessage"].startswith("outcome unknown") and rows[0]["result"] == "ok"
        # The window stays taken: the day is never replayed.
        assert all([await j.claim("p-1", "2026-11-30", "t-1") is None for j in (owner, *others)])
    finally:
        await asyncio.gather(*(j.close() for j in (owner, *others)))


async def test_retry_times_and_leases_follow_the_database_clock(pg_url: str) -> None:
    journal = await Journal.open(pg_url, lease_s=30.0)
    try:
        assert await journal.claim("p-1", "2026-11-30", "t-1")
        await journal.defer("t-1", "model unavailable", retry_in_s=0.6)
        assert await journal.claim("p-1", "2026-11-30", "t-1") is None  # not yet
        await asyncio.sleep(0.8)
        claim = await journal.claim("p-1", "2026-11-30", "t-1")
        assert claim is not None and claim.attempt == 2
        engine = create_async_engine(pg_url)
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        "SELECT lease_until - extract(epoch from clock_timestamp())::float8, owner"
                        " FROM ticks WHERE tick_id = 't-1'"
                    )
                )
            ).one()
        await engine.dispose()
        assert 28.0 < row[0] <= 30.0 and row[1] == journal.replica
    finally:
        await journal.close()


async def test_replicas_sweeping_together_take_each_batch_once(pg_url: str) -> None:
    journals = await asyncio.gather(*(Journal.open(pg_url, lease_s=30.0) for _ in range(3)))
    try:
        for i in range(30):
            assert await journals[0].claim(f"p-{i}", "2026-11-30", f"t-{i}")
            assert await journals[0].seal(f"t-{i}", "ok", ActionRow(TICK_ROW, "ok"))

        async def sweep(journal: Journal) -> list[int]:
            taken, after = [], 0
            while (batch := await journal.take_batch(after)) is not None:
                taken.append(batch.id)
                after = batch.id
                await asyncio.sleep(0)  # the POST would happen here
            return taken

        sweeps = await asyncio.gather(*(sweep(j) for j in journals))
        ids = [i for s in sweeps for i in s]
        assert len(ids) == len(set(ids)) == 30
        # While their leases hold, nobody takes them again; a sender that died leaves them after the lease.
        assert await journals[1].take_batch() is None
        for batch_id in ids[:10]:
            await journals[0].mark_batch(batch_id, "delivered", None)
        assert await journals[0].backlog() == 20
    finally:
        await asyncio.gather(*(j.close() for j in journals))


async def test_an_unreachable_server_is_one_line_without_the_password(pg: PgServer) -> None:
    from procs import free_port

    url = f"postgresql+asyncpg://runner:hunter2-not-for-logs@127.0.0.1:{free_port()}/runner"
    try:
        await Journal.open(url)
        raise AssertionError("a journal opened on a closed port")
    except JournalError as exc:
        message = str(exc)
    assert "\n" not in message and "hunter2-not-for-logs" not in message
    assert message.startswith("journal postgresql+asyncpg://runner:***@127.0.0.1:")


async def test_a_database_of_another_application_or_a_newer_runner_is_refused(pg: PgServer, pg_url: str) -> None:
    db = str(make_url(pg_url).database)
    pg.psql("CREATE TABLE users (id int)", database=db)
    try:
        await Journal.open(pg_url)
        raise AssertionError("opened a foreign database")
    except JournalError as exc:
        assert "not a runner journal (it holds other tables: users)" in str(exc)
    pg.psql("DROP TABLE users", database=db)
    journal = await Journal.open(pg_url)
    await journal.close()
    pg.psql(f"INSERT INTO schema_migrations VALUES ({SCHEMA_VERSION + 1}, 'future', 0)", database=db)
    try:
        await Journal.open(pg_url)
        raise AssertionError("opened a journal of a newer runner")
    except JournalError as exc:
        assert "newer runner" in str(exc) and "\n" not in str(exc)
