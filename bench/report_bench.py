"""How long `python -m runner report` takes, and how much memory, on a month of a 1,000-persona fleet.

A journal is seeded through the seal's own read-model writer (`record_sealed`, the code every sealed
tick runs) with synthetic ticks: each persona plays every day, 3 to 8 calls over 2 to 3 modules of
the 33 served tools, about one call in ten failing with one of 24 causes whose texts carry ids and
numbers (so normalisation has work to do), log-normal latencies, a rating per module used. Then the
report command runs as a user runs it, in its own process: wall time (including the interpreter's
start-up and imports, about 1 s here), its peak RSS, and `report.build`'s own time in this process.

    .venv/bin/python bench/report_bench.py                 # 1,000 x 30 on SQLite and PostgreSQL
    .venv/bin/python bench/report_bench.py --tiny          # 20 x 3, what the suite runs

Results go to bench/results/report-<kind>.json and the figures into bench/README.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runner import report  # noqa: E402
from runner.journal import Journal  # noqa: E402
from runner.journal.rollup import SealedCall, SealedTick, record_sealed  # noqa: E402
from runner.sandbox.mana_tools import load_tools  # noqa: E402
from runner.settings import load_settings  # noqa: E402
from tests.pg import start_postgres  # noqa: E402

# Ticks per seeding transaction: few commits, short enough transactions.
SEED_CHUNK = 500
CAUSES = [
    "Tool {tool} failed: Cannot read properties of undefined (reading 'filter')",
    "Tool {tool} failed: mana-sync pull failed: 401 Unauthorized — token is expired",
    "Invalid arguments for tool {tool}: title: Required",
    "Tool {tool} failed: vault for user {id} not found",
    "Tool {tool} not allowed: rate-limit-exceeded: {n} calls in 60s",
    "outcome unknown: the tick timed out during the call",
]


def _ticks(personas: int, days: int, seed: int) -> list[SealedTick]:
    rng = random.Random(seed)
    tools = [t["name"] for t in load_tools()[0]]
    failing = rng.sample(tools, 4)  # 4 tools x 6 causes = 24 distinct findings at most
    today = datetime.now(UTC).date()
    out = []
    for d in range(days):
        window = (today - timedelta(days=days - 1 - d)).isoformat()
        for p in range(personas):
            chosen = rng.sample(tools, 3)
            calls = []
            for _ in range(rng.randint(3, 8)):
                tool = rng.choice(chosen)
                fails = tool in failing and rng.random() < 0.5
                error = rng.choice(CAUSES).format(tool=tool, id=f"u{rng.getrandbits(40):x}9", n=rng.randint(30, 99))
                latency = int(rng.lognormvariate(3.5, 0.8))
                calls.append(
                    SealedCall(tool, not fails, error if fails else None, latency, f"{rng.getrandbits(64):016x}")
                )
            used = sorted({c.tool.split(".", 1)[0] for c in calls})
            out.append(
                SealedTick(
                    tick_id=f"t-{p}-{window}",
                    persona_id=f"persona-{p:05d}",
                    window=window,
                    outcome="ok",
                    stage="seal",
                    calls=calls,
                    ratings=[(m, rng.randint(1, 5)) for m in used],
                    parse_failure=None,
                    tick_error=None,
                    space_id=f"space-{p}",
                    now=time.time(),
                )
            )
    return out


async def _seed(where: Path | str, ticks: list[SealedTick]) -> float:
    journal = await Journal.open(where, own=False)
    started = time.perf_counter()
    try:
        for at in range(0, len(ticks), SEED_CHUNK):
            # The seal's own writer; a whole seal would also freeze batches the report never reads.
            async with journal._write() as conn:  # noqa: SLF001 - the bench seeds through the journal's transaction
                for tick in ticks[at : at + SEED_CHUNK]:
                    await record_sealed(conn, tick)
    finally:
        await journal.close()
    return time.perf_counter() - started


async def _size_mb(where: Path | str) -> float:
    """The journal's size on disk: the read model only, as no raw tick was written."""
    if isinstance(where, Path):
        return where.stat().st_size / 2**20
    journal = await Journal.open(where, read_only=True)
    try:
        async with journal.reading() as conn:
            return float(await conn.scalar(sa.text("SELECT pg_database_size(current_database())")) or 0) / 2**20
    finally:
        await journal.close()


async def _build(where: Path | str, days: int) -> tuple[float, dict[str, Any]]:
    journal = await Journal.open(where, read_only=True)
    try:
        started = time.perf_counter()
        found = await report.build(
            journal, report.period_of(days, datetime.now(UTC).date()), report.Thresholds.of(load_settings())
        )
        return time.perf_counter() - started, found
    finally:
        await journal.close()


# Spawns its arguments and reports the child's peak RSS. The command is started through this small
# process because Linux carries a process's peak RSS across exec: started from the bench itself,
# which holds a month of synthetic ticks, the command would be charged with the bench's memory.
_PEAK_RSS = (
    "import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); _, st, ru = os.wait4(pid, 0); "
    "sys.stderr.write(f'peak_rss_kb={ru.ru_maxrss}\\n'); sys.exit(os.waitstatus_to_exitcode(st))"
)


def _command(env: dict[str, str], days: int) -> tuple[float, float, dict[str, Any]]:
    """The command as a user runs it: wall seconds, its own peak RSS in MB, its JSON."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "runner", "report", "--since", f"{days}d", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"report failed: {done.stderr[-2000:]}")
    peak_kb = int(done.stderr.strip().splitlines()[-1].removeprefix("peak_rss_kb="))
    return wall, peak_kb / 1024, json.loads(done.stdout)


def _measure(kind: str, where: Path | str, ticks: list[SealedTick], days: int) -> dict[str, Any]:
    seed_s = asyncio.run(_seed(where, ticks))
    build_s, found = asyncio.run(_build(where, days))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "REPORT_"))}
    env.update(RUNNER_STATE_URL=where) if isinstance(where, str) else env.update(RUNNER_STATE_PATH=str(where))
    wall, peak_mb, printed = _command(env, days)
    size_mb = asyncio.run(_size_mb(where))
    calls = sum(len(t.calls) for t in ticks)
    checks = {
        "calls_add_up": sum(t["calls"] for t in printed["tools"]) == calls,
        "ratings_add_up": sum(m["rating_n"] for m in printed["modules"]) == sum(len(t.ratings) for t in ticks),
        "personas": len(printed["personas"]) == len({t.persona_id for t in ticks}),
        "same_as_in_process": printed["findings"] == found["findings"],
    }
    return {
        "journal": kind,
        "ticks": len(ticks),
        "calls": calls,
        "findings": len(printed["findings"]),
        "seed_s": round(seed_s, 1),
        "build_s": round(build_s, 3),
        "command_s": round(wall, 3),
        "command_peak_rss_mb": round(peak_mb, 1),
        "journal_mb": round(size_mb, 1),
        "checks": checks,
        "ok": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--personas", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="20 personas x 3 days: the suite's run")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), help="one journal kind")
    parser.add_argument("--out", type=Path, help="write report-<kind>.json here (default: print only)")
    args = parser.parse_args()
    personas, days = (20, 3) if args.tiny else (args.personas, args.days)
    ticks = _ticks(personas, days, seed=14)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="report-bench-"))
    try:
        if args.only in (None, "sqlite"):
            results.append(_measure("sqlite", tmp / "runner.db", ticks, days))
        if args.only in (None, "postgresql"):
            (tmp / "pg").mkdir()
            server = start_postgres(tmp / "pg")
            try:
                results.append(_measure("postgresql", server.create_database(), ticks, days))
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        print(json.dumps(r))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"report-{r['journal']}.json").write_text(
                json.dumps({"personas": personas, "days": days, **r}, indent=2)
            )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
