"""Several daemon processes on one PostgreSQL journal and one sandbox, as a deployment runs them:
every due persona ticks exactly once per window, the migration race at a shared start, the load
spread over the replicas, a replica started late taking its share, and the SIGKILL of a replica
mid-tick, whose recorded calls land exactly once through another replica without replaying a day."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WEEKDAY, Mana, open_runner
from pg import PgServer
from procs import (
    RunnerProcess,
    SandboxProcess,
    calls_vs_rows,
    free_port,
    runner_env,
    start_runner,
    start_sandbox,
    until,
)
from sqlalchemy.engine import make_url

from runner.agent.loop import Entry, RatingReply, ToolCall, ToolDef, Turn
from runner.dispatch import run_once
from runner.journal import Journal
from runner.persona import TICK_ROW
from runner.schema import SCHEMA_VERSION

SEED = "replica-seed-secret-1234"
KEY = "replica-service-key-5678"
EXTRA_PERSONAS = 14  # with the sandbox's 10: 24 due personas


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    sb = start_sandbox(tmp_path, seed_secret=SEED, service_key=KEY)
    sb.post("clock", {"now": WEEKDAY})
    for i in range(EXTRA_PERSONAS):
        sb.post(
            "personas",
            {
                "name": f"replica-{i}",
                "archetype": "t",
                "systemPrompt": "Du bist eine Testperson.",
                "moduleMix": {"todo": 0.6, "journal": 0.4},
                "tickCadence": "daily",
            },
        )
    yield sb
    sb.stop()


@pytest.fixture
async def runners() -> AsyncIterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for runner in started:
        if runner.proc.poll() is None:
            runner.kill()


class JournalView:
    """The shared journal as an operator would query it (psql), to watch the replicas work."""

    def __init__(self, pg: PgServer, url: str) -> None:
        self._pg = pg
        self._db = str(make_url(url).database)

    def rows(self, sql: str) -> list[list[str]]:
        out = self._pg.psql(sql, database=self._db)
        return [line.split("|") for line in out.splitlines() if line]

    def scalar(self, sql: str) -> str:
        return self.rows(sql)[0][0]


def replica_env(sandbox: SandboxProcess, tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return runner_env(
        sandbox,
        tmp_path / "unused.db",  # RUNNER_STATE_URL wins: no replica writes a local file
        RUNNER_STATE_URL=url,
        RUNNER_LEASE_S="3",
        TICK_INTERVAL_MS="500",
        **extra,
    )


def start(env: dict[str, str], tmp_path: Path, name: str, runners: list[RunnerProcess]) -> RunnerProcess:
    runner = start_runner(dict(env, PORT=str(free_port())), tmp_path / f"{name}.log")
    runners.append(runner)
    return runner


def owner_pid(owner: str) -> int:
    return int(owner.split(":")[-2])  # host:pid:random (runner.journal.replica_id)


def one_tick_per_persona(actions: list[dict[str, Any]]) -> Counter[str]:
    ticks: dict[str, set[str]] = {}
    for a in actions:
        ticks.setdefault(a["personaId"], set()).add(a["tickId"])
    return Counter({p: len(t) for p, t in ticks.items()})


def settled(sandbox: SandboxProcess, journal: JournalView, personas: int) -> bool:
    """Every persona's actions landed and no batch waits anywhere."""
    landed = {a["personaId"] for a in sandbox.get("actions")}
    unsent = int(journal.scalar("SELECT count(*) FROM batches WHERE state <> 'delivered'"))
    running = int(journal.scalar("SELECT count(*) FROM ticks WHERE state <> 'sealed'"))
    return len(landed) >= personas and unsent == 0 and running == 0


async def test_three_replicas_share_the_cast_each_persona_once_and_migrate_once(
    sandbox: SandboxProcess, runners: list[RunnerProcess], tmp_path: Path, pg: PgServer, pg_url: str
) -> None:
    env = replica_env(sandbox, tmp_path, pg_url, PERSONA_CONCURRENCY="3", SCRIPTED_LATENCY_MS="120")
    replicas = [start(env, tmp_path, f"r{i}", runners) for i in range(3)]  # all at once: the migrations race
    for replica in replicas:
        health = await asyncio.to_thread(replica.wait_healthy, 60)
        assert health["journal"] == "postgresql" and owner_pid(health["replica"]) == replica.proc.pid
    journal = JournalView(pg, pg_url)
    personas = len(sandbox.get("personas"))
    await until(lambda: settled(sandbox, journal, personas), what="every persona ticked and delivered")

    actions = sandbox.get("actions")
    assert set(one_tick_per_persona(actions).values()) == {1} and len(one_tick_per_persona(actions)) == personas
    calls, rows, _ = calls_vs_rows(sandbox)
    for user, made in calls.items():
        assert rows.get(user, Counter()) == made, f"calls and rows differ for {user}"
    assert [int(v) for (v,) in journal.rows("SELECT version FROM schema_migrations ORDER BY 1")] == list(
        range(1, SCHEMA_VERSION + 1)
    )
    # No leader: every replica ran ticks (a tick keeps its owner when sealed).
    owners = Counter(owner_pid(o) for (o,) in journal.rows("SELECT owner FROM ticks"))
    assert set(owners) == {r.proc.pid for r in replicas}, owners
    assert sum(owners.values()) == personas
    for replica in replicas:
        assert replica.terminate() == 0


async def test_a_replica_killed_mid_tick_is_finished_by_a_running_one_and_a_late_one_takes_a_share(
    sandbox: SandboxProcess, runners: list[RunnerProcess], tmp_path: Path, pg: PgServer, pg_url: str
) -> None:
    env = replica_env(sandbox, tmp_path, pg_url, SCRIPTED_LATENCY_MS="400")
    first = start(dict(env, PERSONA_CONCURRENCY="4"), tmp_path, "first", runners)
    survivor = start(dict(env, PERSONA_CONCURRENCY="1"), tmp_path, "survivor", runners)
    for replica in (first, survivor):
        await asyncio.to_thread(replica.wait_healthy, 60)
    journal = JournalView(pg, pg_url)
    mine = f"t.owner LIKE '%:{first.proc.pid}:%'"
    await until(
        lambda: journal.rows(f"SELECT t.tick_id FROM ticks t JOIN calls c USING (tick_id) WHERE {mine} LIMIT 1"),
        what="a tick of the first replica with a call journaled",
    )
    first.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.proc.wait)
    # What the dead replica left: its running ticks and every call it journaled in them.
    left: dict[str, list[str]] = {}
    for tick_id, tool in journal.rows(
        "SELECT t.tick_id, c.tool_name FROM ticks t LEFT JOIN calls c USING (tick_id)"
        f" WHERE t.state = 'running' AND {mine} ORDER BY t.tick_id, c.seq"
    ):
        left.setdefault(tick_id, []).extend([tool] if tool else [])
    assert left and any(left.values())
    # The survivor was running before the kill: only its polls, not a start-up, can seal these.
    ids = ", ".join(f"'{t}'" for t in left)
    await until(
        lambda: journal.scalar(f"SELECT count(*) FROM ticks WHERE tick_id IN ({ids}) AND state <> 'sealed'") == "0",
        timeout=30,
        what="the dead replica's ticks sealed by the one still running",
    )

    late = start(dict(env, PERSONA_CONCURRENCY="4"), tmp_path, "late", runners)  # takes its share from its first poll
    personas = len(sandbox.get("personas"))
    await until(lambda: settled(sandbox, journal, personas), what="every persona delivered")

    actions = sandbox.get("actions")
    outcome = dict(journal.rows("SELECT tick_id, outcome FROM ticks"))
    for tick_id, tools in left.items():
        assert outcome[tick_id] == "interrupted"
        rows = [a for a in actions if a["tickId"] == tick_id]
        # Exactly the calls it journaled, once each, in order, then the interruption.
        assert [r["toolName"] for r in rows] == [*tools, TICK_ROW], tick_id
        assert "interrupted" in rows[-1]["errorMessage"]
    assert set(one_tick_per_persona(actions).values()) == {1}  # nobody's day was played twice
    calls, rows_by_user, _ = calls_vs_rows(sandbox)
    for user, made in calls.items():
        have = rows_by_user.get(user, Counter())
        assert not made - have, f"a call that reached Mana has no row: {user}"
        unknown = [a for a in actions if a["personaId"] == user and "outcome unknown" in (a["errorMessage"] or "")]
        assert sum((have - made).values()) <= len(unknown)
    owners = Counter(owner_pid(o) for (o,) in journal.rows("SELECT owner FROM ticks"))
    assert owners[first.proc.pid] >= len(left) and owners[survivor.proc.pid] > 0 and owners[late.proc.pid] > 0
    assert survivor.terminate() == 0 and late.terminate() == 0


class SlowThinker:
    """One call, then a think longer than the lease, then another call: a tick that must keep its lease alive."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        done = sum(1 for e in transcript if isinstance(e, Turn))
        if done == 0:
            return Turn(text="", calls=[ToolCall("c0", "todo.list", {})])
        if done == 1:
            await asyncio.sleep(self.pause_s)
            return Turn(text="", calls=[ToolCall("c1", "todo.create", {"title": "Nach langem Nachdenken"})])
        return Turn(text="Fertig.", calls=[])

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        return RatingReply({"ratings": [{"module": m, "rating": 4, "notes": "ok"} for m in modules]}, "")


async def test_ticks_thinking_longer_than_the_lease_keep_it_while_another_replica_looks(
    mana: Mana, tmp_path: Path, pg_url: str
) -> None:
    settings = mana.settings(tmp_path, runner_state_url=pg_url, runner_lease_s=1, persona_concurrency=16)
    other = await Journal.open(pg_url, lease_s=1)
    taken: list[str] = []

    async def look() -> None:
        while True:
            taken.extend(await other.recover())
            await asyncio.sleep(0.2)

    try:
        async with open_runner(settings, lambda p, t: SlowThinker(pause_s=2.5)) as runtime:
            watcher = asyncio.create_task(look())
            try:
                report = await run_once(runtime)
            finally:
                watcher.cancel()
            summaries = await runtime.journal.summaries([t for _, t in report.ticks])
    finally:
        await other.close()
    assert taken == []  # renewed a third of a lease apart, no tick looked abandoned
    assert len(report.ticks) == 10 and report.backlog == 0
    assert {s.outcome for s in summaries.values()} == {"ok"} and {s.ok for s in summaries.values()} == {2}
