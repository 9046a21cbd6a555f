#!/usr/bin/env python
"""Throughput benchmark of one runner round against the sandbox on loopback.

    .venv/bin/python bench/run_bench.py                  # the default plan (~5 min on 2 cores)
    .venv/bin/python bench/run_bench.py --quick          # 100 personas x {2,8,32} (~1 min)
    .venv/bin/python bench/run_bench.py --runs 200x8     # one configuration: N personas x PERSONA_CONCURRENCY
    .venv/bin/python bench/run_bench.py --sizes 200,1000 --concurrency 2,8,32   # a full matrix
    .venv/bin/python bench/run_bench.py --runs 200x8 --profile          # + cProfile summary per run
    .venv/bin/python bench/run_bench.py --runs 200x8 --sandbox process  # sandbox in its own process
    .venv/bin/python bench/run_bench.py --runs 200x8 --ablate ssl,fsync # what-if patches (see README)

Every configuration runs in a fresh worker subprocess (fresh sandbox DB, fresh journal, its
own peak RSS, no shared Prometheus/secret state). The worker:

1. starts the sandbox (in-process by default, port 0, tmp db, an empty demo catalog so the
   due list is exactly the N bench personas) and sets its clock to a Wednesday;
2. creates N personas through POST /__sandbox/personas;
3. times GET /due on its own (3 times, median);
4. runs ONE round: ``open_runtime(settings, <provider_factory(settings)>)`` + ``run_once``
   with the scripted provider (3-8 tool calls per tick);
5. reads the journal and the sandbox, and asserts that every journaled row landed
   (actions and feedback), every tool call the journal recorded reached mana-mcp, and the
   outbox is empty.

Nothing under runner/ is modified. The worker does wrap a few runner methods with a
perf_counter (phase timings; microseconds against ticks of tens of milliseconds), and
opt-in "what-if" patches exist (--ablate ssl|fsync|writer|switch) to measure suggested fixes;
they are bench-side monkeypatches that live only in the worker process.

Sandbox artefact (see README): the sandbox binds its listening sockets itself with
``socket.socket(AF_INET, SOCK_STREAM)`` (proto 0), so asyncio never sets TCP_NODELAY on the
accepted connections and every keep-alive request pays Nagle + delayed-ACK (~40 ms). The
bench sets TCP_NODELAY on the listening sockets (inherited by accepted sockets on Linux)
unless --no-nodelay is given, so the numbers measure the runner, not that artefact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WEEKDAY = "2026-11-25T09:30:00+00:00"  # a Wednesday: daily personas are due whatever day it is
SEED_SECRET = "bench-seed-secret"
SERVICE_KEY = "bench-service-key"
# Until the runner's tool policy lands (issue 6) it withholds every unannotated tool, so on the real
# surface a persona would do nothing measurable: benchmark on the annotated variant meanwhile.
MCP_SURFACE = "annotated"
DEFAULT_RUNS = "200x2,200x8,200x32,1000x8"
PERSONA_SPEC = {
    "archetype": "bench",
    "systemPrompt": "Du bist eine Benchmark-Persona: du planst den Tag, schreibst Tagebuch, notierst die Stimmung.",
    "moduleMix": {"todo": 0.4, "journal": 0.3, "mood": 0.3},
    "tickCadence": "daily",
}


# --------------------------------------------------------------------------------------------
# worker: one configuration, one process
# --------------------------------------------------------------------------------------------


class PhaseTimer:
    """Wall time spent inside selected runner coroutines (sum, count), keyed by phase name."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:  # the code moved on: lose one phase, not the run
            print(f"bench: cannot time {phase}: {getattr(owner, '__name__', owner)}.{attr} is gone", file=sys.stderr)
            return
        timer = self

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                timer.total[phase] += time.perf_counter() - started
                timer.count[phase] += 1

        timed.__name__ = getattr(original, "__name__", attr)
        setattr(owner, attr, timed)

    def report(self) -> dict[str, dict[str, float]]:
        return {
            phase: {
                "calls": self.count[phase],
                "total_s": round(total, 4),
                "mean_ms": round(1000 * total / self.count[phase], 3),
            }
            for phase, total in sorted(self.total.items(), key=lambda kv: -kv[1])
        }


def install_phase_timers() -> PhaseTimer:
    import runner.dispatch as dispatch
    from runner.journal import Journal
    from runner.mana.auth import AuthClient
    from runner.mana.mcp import McpGateway
    from runner.mana.personas_api import PersonasApi
    from runner.outbox import Outbox

    timer = PhaseTimer()
    timer.wrap(dispatch, "run_tick", "tick (run_tick)")
    timer.wrap(PersonasApi, "due", "GET /due (runner)")
    timer.wrap(AuthClient, "login", "login")
    timer.wrap(AuthClient, "personal_space", "personal space")
    timer.wrap(McpGateway, "__aenter__", "mcp session open")
    timer.wrap(McpGateway, "tools", "mcp tools/list")
    timer.wrap(McpGateway, "call", "mcp tools/call")
    timer.wrap(McpGateway, "__aexit__", "mcp session close")
    timer.wrap(Journal, "claim", "journal claim")
    timer.wrap(Journal, "begin_call", "journal begin_call")
    timer.wrap(Journal, "end_call", "journal end_call")
    timer.wrap(Journal, "save_ratings", "journal ratings")
    timer.wrap(Journal, "seal", "journal seal")
    timer.wrap(Journal, "mark_batch", "journal mark_batch")
    timer.wrap(Outbox, "deliver", "outbox sweep (incl. lock wait)")
    timer.wrap(PersonasApi, "post_batch", "POST batch")
    return timer


def install_ablations(names: list[str]) -> None:
    """Bench-only what-if patches; each models a fix suggested in the README."""
    if "ssl" in names:
        # One SSL context for the process instead of one per tick (httpx2.AsyncClient() loads the
        # CA bundle every time it is created: ~25 ms of CPU).
        import ssl

        import httpx2
        from mcp.shared._httpx_utils import MCP_DEFAULT_SSE_READ_TIMEOUT, MCP_DEFAULT_TIMEOUT

        import runner.mana.mcp as mcp_mod

        shared = ssl.create_default_context()

        def client(headers: dict[str, str] | None = None, timeout: Any = None, auth: Any = None) -> Any:
            timeout = timeout or httpx2.Timeout(MCP_DEFAULT_TIMEOUT, read=MCP_DEFAULT_SSE_READ_TIMEOUT)
            return httpx2.AsyncClient(headers=headers, timeout=timeout, verify=shared)

        mcp_mod.create_mcp_http_client = client  # type: ignore[assignment]
    if "fsync" in names:
        # synchronous=NORMAL (WAL): no fsync per commit; survives a process crash, not a power cut.
        import sqlalchemy as sa

        import runner.journal.store as journal_mod

        original = journal_mod.create_async_engine

        def engine(*args: Any, **kwargs: Any) -> Any:
            made = original(*args, **kwargs)

            @sa.event.listens_for(made.sync_engine, "checkout")
            def _normal(dbapi_conn: Any, record: Any, proxy: Any) -> None:
                if not record.info.get("bench_sync"):
                    cursor = dbapi_conn.cursor()
                    cursor.execute("PRAGMA synchronous=NORMAL")
                    cursor.close()
                    record.info["bench_sync"] = True

            return made

        journal_mod.create_async_engine = engine  # type: ignore[assignment]
    if "writer" in names:
        # One journal connection (pool_size=1): tasks queue on the pool (event-driven, FIFO)
        # instead of on SQLite's write lock (busy handler sleeping 1..100 ms between tries).
        import runner.journal.store as journal_mod

        original_engine = journal_mod.create_async_engine

        def single(*args: Any, **kwargs: Any) -> Any:
            return original_engine(*args, pool_size=1, max_overflow=0, **kwargs)

        journal_mod.create_async_engine = single  # type: ignore[assignment]
    if "switch" in names:
        # GIL switch interval 0.5 ms instead of 5 ms, to test whether the journal's aiosqlite
        # thread hops wait on the GIL (measured: no measurable effect; kept to rule it out again).
        sys.setswitchinterval(0.0005)
    unknown = set(names) - {"ssl", "fsync", "writer", "switch"}
    if unknown:
        raise SystemExit(f"unknown --ablate: {', '.join(sorted(unknown))} (known: ssl, fsync, writer, switch)")


def set_nodelay(sandbox: Any) -> None:
    """TCP_NODELAY on the sandbox's listening sockets; Linux passes it on to accepted sockets."""
    for server in sandbox._servers:  # noqa: SLF001 - bench-only reach into the sandbox
        for asyncio_server in server.servers:
            for sock in asyncio_server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_steal_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies over all CPUs from /proc/stat: is the hypervisor taking our cores?"""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    return (fields[7] if len(fields) > 7 else 0, sum(fields))


def disk_bytes(path: Path) -> dict[str, int]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        out[suffix.strip("-") or "db"] = p.stat().st_size if p.exists() else 0
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class ChildSandbox:
    """The sandbox in its own process (--sandbox process), so the runner's CPU can be told apart."""

    def __init__(self, db_path: str, catalog: Path, nodelay: bool) -> None:
        self._args = [
            sys.executable,
            __file__,
            "--sandbox-child",
            json.dumps({"db": db_path, "catalog": str(catalog), "nodelay": nodelay}),
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.auth_url = self.api_url = self.mcp_url = ""

    async def __aenter__(self) -> ChildSandbox:
        self.proc = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise RuntimeError("sandbox child did not start")
        urls = json.loads(line)
        self.auth_url, self.api_url, self.mcp_url = urls["auth"], urls["api"], urls["mcp"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        await asyncio.to_thread(self.proc.wait, 30)


async def sandbox_child(spec: dict[str, Any]) -> None:
    from runner import log
    from runner.sandbox import Sandbox, SandboxConfig

    log.configure("console", "warning")
    config = SandboxConfig(
        db_path=spec["db"],
        seed_secret=SEED_SECRET,
        service_key=SERVICE_KEY,
        personas_file=Path(spec["catalog"]),
        mcp_surface=MCP_SURFACE,
    )
    async with Sandbox(config) as sandbox:
        if spec["nodelay"]:
            set_nodelay(sandbox)
        print(json.dumps({"auth": sandbox.auth_url, "api": sandbox.api_url, "mcp": sandbox.mcp_url}), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin


async def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import cProfile

    import httpx

    from runner import log
    from runner.dispatch import run_once
    from runner.runtime import open_runtime, provider_factory
    from runner.sandbox import Sandbox, SandboxConfig
    from runner.settings import load_settings

    log.configure("console", "warning")
    install_ablations(cfg["ablate"])
    phases = install_phase_timers()
    n, concurrency = cfg["n"], cfg["concurrency"]
    tmp = Path(tempfile.mkdtemp(prefix="persona-bench-", dir=cfg.get("tmpdir")))
    catalog = tmp / "empty-catalog.json"
    catalog.write_text("[]")  # no demo personas: the due list is exactly the bench personas
    journal_path = tmp / "runner.db"
    result: dict[str, Any] = {
        "n": n,
        "concurrency": concurrency,
        "sandbox": cfg["sandbox"],
        "nodelay": cfg["nodelay"],
        "ablate": cfg["ablate"],
        "tmpdir": str(tmp),
    }

    sandbox: Any
    if cfg["sandbox"] == "process":
        sandbox = ChildSandbox(str(tmp / "sandbox.db"), catalog, cfg["nodelay"])
    else:
        sandbox = Sandbox(
            SandboxConfig(
                db_path=str(tmp / "sandbox.db"),
                seed_secret=SEED_SECRET,
                service_key=SERVICE_KEY,
                personas_file=catalog,
                mcp_surface=MCP_SURFACE,
            )
        )

    async with sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=120) as control:
        if cfg["sandbox"] == "inproc" and cfg["nodelay"]:
            set_nodelay(sandbox)
        (await control.post("/__sandbox/clock", json={"now": WEEKDAY})).raise_for_status()

        started = time.perf_counter()
        for i in range(n):
            answer = await control.post("/__sandbox/personas", json={"name": f"bench{i:05d}", **PERSONA_SPEC})
            answer.raise_for_status()
        result["setup_personas_s"] = round(time.perf_counter() - started, 2)

        due_times, due_bytes = [], 0
        for _ in range(3):
            started = time.perf_counter()
            answer = await control.get("/api/v1/personas/internal/due", headers={"X-Service-Key": SERVICE_KEY})
            due_times.append(time.perf_counter() - started)
            answer.raise_for_status()
            due_bytes = len(answer.content)
            assert len(answer.json()["personas"]) == n, (
                f"expected {n} due personas, /due listed {len(answer.json()['personas'])}"
            )
        result["due_ms"] = round(1000 * statistics.median(due_times), 2)
        result["due_kb"] = round(due_bytes / 1024, 1)

        settings = load_settings(
            _env_file=None,
            mana_api_url=sandbox.api_url,
            mana_auth_url=sandbox.auth_url,
            mana_mcp_url=sandbox.mcp_url,
            mana_service_key=SERVICE_KEY,
            persona_seed_secret=SEED_SECRET,
            llm_provider="scripted",
            scripted_seed="bench",
            runner_env="development",
            node_env=None,
            runner_state_path=journal_path,
            persona_concurrency=concurrency,
            persona_max_turns=15,
            persona_tick_timeout_s=600,
            # The bench measures the runner, not Mana's sign-in limit (the sandbox does not limit loopback).
            mana_login_rate="100000/1s",
            log_format="console",
            log_level="warning",
        )
        rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_cpu0 = proc_cpu_s(sandbox.proc.pid) if cfg["sandbox"] == "process" else 0.0
        profiler = cProfile.Profile() if cfg["profile"] else None
        async with provider_factory(settings) as make, open_runtime(settings, make) as runtime:
            steal0 = cpu_steal_jiffies()
            cpu0, main0, t0 = cpu_s(), time.thread_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            report = await run_once(runtime)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - t0
            cpu = cpu_s() - cpu0
            main_thread_cpu = time.thread_time() - main0
            steal1 = cpu_steal_jiffies()
            result["journal_open_bytes"] = disk_bytes(journal_path)
        result["journal_closed_bytes"] = disk_bytes(journal_path)
        if cfg["sandbox"] == "process":
            result["sandbox_cpu_s"] = round(proc_cpu_s(sandbox.proc.pid) - child_cpu0, 2)
            result["sandbox_peak_rss_mb"] = round(proc_hwm_mb(sandbox.proc.pid), 1)

        landed_actions = await control.get("/__sandbox/actions")
        landed_feedback = await control.get("/__sandbox/feedback")
        mcp_calls = await control.get("/__sandbox/mcp-calls")
        for answer in (landed_actions, landed_feedback, mcp_calls):
            answer.raise_for_status()
        landed = {"actions": len(landed_actions.json()), "feedback": len(landed_feedback.json())}
        reached_mcp = len(mcp_calls.json())

    db = sqlite3.connect(journal_path)
    outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM ticks GROUP BY outcome").fetchall())
    durations = [row[0] for row in db.execute("SELECT updated_at - created_at FROM ticks WHERE state = 'sealed'")]
    tool_calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    call_errors = db.execute("SELECT COUNT(*) FROM calls WHERE status != 'ok'").fetchone()[0]
    journaled = {kind: 0 for kind in ("actions", "feedback")}
    journaled.update(dict(db.execute("SELECT kind, SUM(rows) FROM batches GROUP BY kind").fetchall()))
    undelivered = db.execute("SELECT COUNT(*) FROM batches WHERE state != 'delivered'").fetchone()[0]
    batch_count = db.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    # Delivery lag: seal (batch created) -> the API took it. The outbox is one serial sender.
    lags = [
        row[0] for row in db.execute("SELECT delivered_at - created_at FROM batches WHERE delivered_at IS NOT NULL")
    ]
    last_seal, last_delivery = db.execute(
        "SELECT (SELECT MAX(updated_at) FROM ticks), (SELECT MAX(delivered_at) FROM batches)"
    ).fetchone()
    db.close()

    ticks = len(report.ticks)
    per_tick = max(1, ticks)
    # The invariants the benchmark must not trade away for speed.
    # Not asserted: a tick that failed or a persona never claimed is a finding to report, not a
    # reason to lose the run's numbers. The parent prints a warning for either.
    assert report.backlog == 0 and undelivered == 0, (
        f"outbox not empty: backlog {report.backlog}, undelivered {undelivered}"
    )
    assert landed == journaled, f"rows landed {landed} != rows journaled {journaled}"
    assert reached_mcp == tool_calls, f"mana-mcp saw {reached_mcp} tool calls, journal has {tool_calls}"

    # The cost of one info-level log line's redaction with the secrets this round registered.
    from runner.log import _secrets, redact

    sample = "tool call persona=persona.bench00042@mana.test tick_id=652bde96-0ebd-58b6-8fa1-ed2987b96f32 stage=play"
    reps = 200
    started = time.perf_counter()
    for _ in range(reps):
        redact(sample)
    redact_us = 1e6 * (time.perf_counter() - started) / reps

    journal_bytes = sum(result["journal_open_bytes"].values())
    result.update(
        wall_s=round(wall, 2),
        ticks=ticks,
        unclaimed=n - ticks,
        outcomes=outcomes,
        ticks_per_s=round(ticks / wall, 2),
        tool_calls=tool_calls,
        tool_call_errors=call_errors,
        tool_calls_per_s=round(tool_calls / wall, 1),
        tick_p50_ms=round(1000 * percentile(durations, 0.50)),
        tick_p95_ms=round(1000 * percentile(durations, 0.95)),
        tick_max_ms=round(1000 * max(durations, default=float("nan"))),
        cpu_s=round(cpu, 2),
        cpu_ms_per_tick=round(1000 * cpu / per_tick, 1),
        cpu_util=round(cpu / wall, 2),
        main_thread_util=round(main_thread_cpu / wall, 2),
        cpu_steal_pct=round(100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1]), 2),
        journal_mb=round(journal_bytes / 2**20, 2),
        journal_kb_per_tick=round(sum(result["journal_closed_bytes"].values()) / 1024 / per_tick, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        rss_before_round_mb=round(rss_before_mb, 1),
        rows_journaled=journaled,
        rows_landed=landed,
        batches=batch_count,
        delivery_lag_p50_s=round(percentile(lags, 0.5), 2),
        delivery_lag_p95_s=round(percentile(lags, 0.95), 2),
        delivery_lag_max_s=round(max(lags), 2) if lags else None,
        drain_after_last_seal_s=round(last_delivery - last_seal, 2) if last_delivery and last_seal else None,
        mcp_calls_seen_by_sandbox=reached_mcp,
        registered_secrets=len(_secrets),
        redact_us_per_string=round(redact_us, 1),
        phases=phases.report(),
    )
    if profiler:
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        label = run_label(result)
        raw = out / f"profile-{label}.pstats"
        profiler.dump_stats(str(raw))
        text = out / f"profile-{label}.txt"
        text.write_text(profile_summary(raw, result))
        result["profile"] = str(text.relative_to(REPO)) if text.is_relative_to(REPO) else str(text)
    if not cfg.get("keep"):
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def profile_summary(path: Path, result: dict[str, Any]) -> str:
    """Own time (tottime) grouped by package, then the top functions: where the CPU went."""
    import io
    import pstats
    import re

    stats = pstats.Stats(str(path))
    groups: dict[str, float] = defaultdict(float)
    total = 0.0
    for (filename, _, func), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~":
            m = re.search(r"method '(\w+)' of '([\w.]+)'", func)
            key = f"C: {m.group(2).split('.')[0]}.{m.group(1)}" if m else "C: builtins (isinstance, len, getattr, ...)"
        elif "/runner/sandbox/" in filename:
            key = "runner.sandbox (our stand-in)"
        elif "/runner/" in filename and "site-packages" not in filename:
            key = "runner (the code under test)"
        elif m := re.search(r"site-packages/([^/]+)", filename):
            key = m.group(1).removesuffix(".py")
        elif m := re.search(r"python3\.\d+/([^/]+)", filename):
            key = "stdlib " + m.group(1).removesuffix(".py")
        else:
            key = filename
        groups[key] += tottime
        total += tottime
    layers: dict[str, float] = defaultdict(float)
    for key, value in groups.items():
        layers[layer_of(key)] += value
    busy = total - layers.get("idle: waiting in epoll", 0.0)
    lines = [
        f"cProfile of one round: {run_label(result)}; wall {result['wall_s']} s under the profiler "
        f"(profiling slows Python code ~1.5-2x more than C code; read shares, not absolutes)",
        f"profiled own-time total {total:.2f} s",
        "",
        "own time by layer (rough roll-up of the packages below; % of busy time, epoll wait excluded):",
    ]
    for key, value in sorted(layers.items(), key=lambda kv: -kv[1]):
        share = "" if key.startswith("idle") else f"{100 * value / busy:5.1f} %"
        lines.append(f"  {value:7.2f} s  {share:>7}  {key}")
    lines += ["", "own time by package:"]
    for key, value in sorted(groups.items(), key=lambda kv: -kv[1])[:30]:
        lines.append(f"  {value:7.2f} s  {100 * value / total:5.1f} %  {key}")
    lines += ["", "top functions by own time:"]
    buffer = io.StringIO()
    pstats.Stats(str(path), stream=buffer).sort_stats("tottime").print_stats(30)
    lines.append(buffer.getvalue().split("\n", 6)[-1])
    return "\n".join(lines)


_LAYERS = [
    ("idle: waiting in epoll", ("C: select.poll",)),
    (
        "journal: SQLAlchemy Core + aiosqlite thread hand-off + sqlite3",
        ("sqlalchemy", "aiosqlite", "greenlet", "C: greenlet", "C: _queue", "C: sqlite3", "stdlib sqlite3"),
    ),
    (
        "HTTP + MCP client stacks (httpx/httpx2, httpcore, h11, anyio, mcp SDK, pydantic, sockets, ssl)",
        (
            "httpx",
            "httpx2",
            "httpcore",
            "httpcore2",
            "h11",
            "anyio",
            "sniffio",
            "mcp",
            "mcp_types",
            "pydantic",
            "pydantic_core",
            "C: pydantic_core",
            "C: _socket",
            "C: _ssl",
            "stdlib socket",
            "stdlib ssl",
            "httpx_sse",
            "sse_starlette",
            "stdlib ipaddress",
        ),
    ),
    (
        "sandbox: uvicorn, starlette, our stand-in",
        ("uvicorn", "starlette", "runner.sandbox (our stand-in)", "jwt", "cryptography", "C: cryptography"),
    ),
    (
        "event loop: asyncio, selectors, contextvars",
        ("stdlib asyncio", "stdlib selectors", "C: select", "C: _contextvars", "C: _asyncio"),
    ),
    ("runner (the code under test)", ("runner (the code under test)",)),
]


def layer_of(key: str) -> str:
    for layer, prefixes in _LAYERS:
        if any(key == p or key.startswith(p + ".") for p in prefixes):
            return layer
    return "other (stdlib contextlib/json/enum/..., structlog, builtins, bench wrappers)"


def run_label(r: dict[str, Any]) -> str:
    parts = [f"{r['n']}x{r['concurrency']}"]
    if r["sandbox"] != "inproc":
        parts.append(f"sandbox-{r['sandbox']}")
    if not r["nodelay"]:
        parts.append("no-nodelay")
    if r["ablate"]:
        parts.append("ablate-" + "+".join(r["ablate"]))
    return "-".join(parts)


# --------------------------------------------------------------------------------------------
# parent: plan, spawn, tabulate
# --------------------------------------------------------------------------------------------

COLUMNS = [
    ("personas", lambda r: r["n"]),
    ("conc", lambda r: r["concurrency"]),
    ("variant", lambda r: run_label(r).split("-", 1)[1] if "-" in run_label(r) else "-"),
    ("wall s", lambda r: r["wall_s"]),
    ("ticks/s", lambda r: r["ticks_per_s"]),
    ("calls/s", lambda r: r["tool_calls_per_s"]),
    ("calls/tick", lambda r: round(r["tool_calls"] / r["ticks"], 2)),
    ("tick p50 ms", lambda r: r["tick_p50_ms"]),
    ("tick p95 ms", lambda r: r["tick_p95_ms"]),
    ("CPU util", lambda r: r["cpu_util"]),
    (
        "CPU ms/tick",
        lambda r: (
            r["cpu_ms_per_tick"]
            if r["sandbox"] == "inproc"
            else f"{r['cpu_ms_per_tick']} (+{round(1000 * r['sandbox_cpu_s'] / r['ticks'], 1)} sbx)"
        ),
    ),
    ("delivery lag p50/max s", lambda r: f"{r['delivery_lag_p50_s']}/{r['delivery_lag_max_s']}"),
    ("/due ms", lambda r: r["due_ms"]),
    ("not ok", lambda r: r["n"] - r["outcomes"].get("ok", 0)),
    ("journal MB open (KB/tick closed)", lambda r: f"{r['journal_mb']} ({r['journal_kb_per_tick']})"),
    ("peak RSS MB", lambda r: r["peak_rss_mb"]),
    (
        "rows journaled = landed",
        lambda r: (
            f"{r['rows_journaled']['actions']}+{r['rows_journaled']['feedback']}"
            f" = {r['rows_landed']['actions']}+{r['rows_landed']['feedback']}"
        ),
    ),
]


def table(results: list[dict[str, Any]]) -> str:
    head = [c for c, _ in COLUMNS]
    rows = [[str(f(r)) for _, f in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(out)


def phase_table(result: dict[str, Any]) -> str:
    lines = [
        f"phases, {run_label(result)} (wall time inside each step, summed over all ticks):",
        "| phase | calls | mean ms | total s |",
        "|---|---|---|---|",
    ]
    for phase, p in result["phases"].items():
        lines.append(f"| {phase} | {p['calls']} | {p['mean_ms']} | {p['total_s']} |")
    return "\n".join(lines)


def parse_runs(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.quick:
        return [(100, 2), (100, 8), (100, 32)]
    if args.sizes or args.concurrency:
        sizes = [int(s) for s in (args.sizes or "200,1000").split(",")]
        levels = [int(c) for c in (args.concurrency or "2,8,32").split(",")]
        return [(n, c) for n in sizes for c in levels]
    return [tuple(int(x) for x in spec.split("x")) for spec in args.runs.split(",")]  # type: ignore[misc]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", default=DEFAULT_RUNS, help=f"NxC,... (personas x PERSONA_CONCURRENCY); default {DEFAULT_RUNS}"
    )
    parser.add_argument("--quick", action="store_true", help="100x2,100x8,100x32: a ~1 min check")
    parser.add_argument("--sizes", help="matrix mode: comma-separated persona counts (with --concurrency)")
    parser.add_argument("--concurrency", help="matrix mode: comma-separated PERSONA_CONCURRENCY values")
    parser.add_argument(
        "--sandbox",
        choices=["inproc", "process"],
        default="inproc",
        help="where the sandbox runs (default: in this process)",
    )
    parser.add_argument(
        "--no-nodelay",
        action="store_true",
        help="leave the sandbox's missing TCP_NODELAY as it is (+~40 ms per request)",
    )
    parser.add_argument(
        "--ablate",
        default="",
        help="what-if patches: ssl (one SSL context, not one per tick), fsync (journal synchronous=NORMAL)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile each round; summaries land in --out")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), help="where results (json, md, profiles) go")
    parser.add_argument("--name", default="latest", help="results file stem")
    parser.add_argument("--tmpdir", default=None, help="where the journals and sandbox DBs live (default: system tmp)")
    parser.add_argument("--keep", action="store_true", help="keep each run's journal and sandbox DB (path in the json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.sandbox_child:
        asyncio.run(sandbox_child(json.loads(args.sandbox_child)))
        return 0
    if args.worker:
        result = asyncio.run(worker(json.loads(args.worker)))
        print("BENCH-RESULT " + json.dumps(result))
        return 0

    runs = parse_runs(args)
    ablate = [a for a in args.ablate.split(",") if a]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor(),
    }
    print(
        f"machine: {machine['nproc']} cpu ({machine['cpu']}), Python {machine['python']}, {machine['platform']}",
        file=sys.stderr,
    )
    print(
        f"runs: {', '.join(f'{n}x{c}' for n, c in runs)}; sandbox {args.sandbox}; "
        f"nodelay {not args.no_nodelay}; ablate {ablate or '-'}",
        file=sys.stderr,
    )

    results: list[dict[str, Any]] = []
    bench_started = time.perf_counter()
    for n, c in runs:
        cfg = {
            "n": n,
            "concurrency": c,
            "sandbox": args.sandbox,
            "nodelay": not args.no_nodelay,
            "ablate": ablate,
            "profile": args.profile,
            "keep": args.keep,
            "out": str(out),
            "tmpdir": args.tmpdir,
        }
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, cwd=REPO
        )
        line = next((text for text in proc.stdout.splitlines() if text.startswith("BENCH-RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"run {n}x{c} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        if proc.stderr.strip():  # warnings the runner logged: surface them, they matter
            sys.stderr.write(f"--- warnings from run {n}x{c} ---\n{proc.stderr[-2000:]}\n")
        result = json.loads(line.removeprefix("BENCH-RESULT "))
        result["run_s"] = round(time.perf_counter() - started, 1)
        if result["unclaimed"] or set(result["outcomes"]) - {"ok"}:
            print(
                f"  WARNING {n}x{c}: outcomes {result['outcomes']}, {result['unclaimed']} due personas never claimed",
                file=sys.stderr,
            )
        results.append(result)
        print(
            f"  {run_label(result)}: {result['ticks']} ticks in {result['wall_s']} s = "
            f"{result['ticks_per_s']} ticks/s, "
            f"{result['tool_calls_per_s']} calls/s, p50/p95 {result['tick_p50_ms']}/{result['tick_p95_ms']} ms, "
            f"rows {result['rows_journaled']} landed ok  [{result['run_s']} s incl. setup]",
            file=sys.stderr,
        )
    total = round(time.perf_counter() - bench_started, 1)

    rendered = table(results)
    print(rendered)
    print(f"\ntotal bench time {total} s")
    (out / f"{args.name}.json").write_text(
        json.dumps({"machine": machine, "total_s": total, "results": results}, indent=2)
    )
    md = [
        f"machine: {machine['nproc']} cpu ({machine['cpu']}), Python {machine['python']}",
        f"total bench time {total} s",
        "",
        rendered,
        "",
    ]
    for result in results:
        md += [phase_table(result), ""]
    md.append(
        "other measurements per run: "
        + json.dumps(
            [
                {
                    k: r[k]
                    for k in (
                        "n",
                        "concurrency",
                        "cpu_util",
                        "main_thread_util",
                        "cpu_steal_pct",
                        "delivery_lag_p95_s",
                        "drain_after_last_seal_s",
                        "batches",
                        "rss_before_round_mb",
                        "journal_kb_per_tick",
                        "registered_secrets",
                        "redact_us_per_string",
                        "due_kb",
                        "setup_personas_s",
                        "outcomes",
                        "tool_call_errors",
                    )
                }
                for r in results
            ],
            indent=1,
        )
    )
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"results: {out / (args.name + '.json')} and {out / (args.name + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
