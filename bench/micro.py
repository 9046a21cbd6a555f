#!/usr/bin/env python
"""Micro-benchmarks behind the findings in bench/README.md (~30 s, no sandbox needed).

    .venv/bin/python bench/micro.py

1. MCP HTTP client set-up, once per tick in McpGateway.__aenter__: create_mcp_http_client()
   builds an httpx2.AsyncClient, whose default SSL context loads the CA bundle each time.
2. Log redaction vs the number of registered secrets: every tick registers its JWT and
   session token and nothing ever unregisters them, so a long-running daemon's set grows.
3. The outbox sweep's two queries (pending_batches + backlog) vs journal history: delivered
   batches are never pruned and batches.state has no index.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


async def client_setup() -> None:
    import ssl

    import httpx2
    from mcp.shared._httpx_utils import create_mcp_http_client

    async def per_call(make: object, reps: int = 40) -> float:
        await make().aclose()  # type: ignore[operator]  # warm imports
        started = time.process_time()
        for _ in range(reps):
            client = make()  # type: ignore[operator]
            await client.aclose()
        return 1000 * (time.process_time() - started) / reps

    shared = ssl.create_default_context()
    a = await per_call(lambda: create_mcp_http_client(headers={"Authorization": "Bearer x"}))
    b = await per_call(lambda: httpx2.AsyncClient(headers={"Authorization": "Bearer x"}, verify=shared))
    print("1. MCP HTTP client per tick (CPU ms per client)")
    print(f"   create_mcp_http_client() as McpGateway does:     {a:6.1f} ms")
    print(f"   httpx2.AsyncClient(verify=<one shared context>): {b:6.1f} ms")


def redaction() -> None:
    from runner import log

    event = {
        "event": "tool call",
        "persona": "persona.bench00042@mana.test",
        "tick_id": "652bde96-0ebd-58b6-8fa1-ed2987b96f32",
        "stage": "play",
        "tool": "todo.create",
        "ok": True,
        "latency_ms": 12,
        "level": "info",
        "timestamp": "2026-11-25T09:30:00.000000Z",
    }
    print("2. Redaction cost of ONE log event vs secrets registered so far")
    print("   (each tick adds its JWT and session token; each persona once adds its derived password)")
    registered = 0
    for target in (0, 1_000, 10_000, 30_000, 100_000):
        while registered < target:
            # a JWT-sized and a session-token-sized value, like a tick registers
            log.register_secret("eyJ" + secrets.token_urlsafe(200)) if registered % 2 else log.register_secret(
                secrets.token_urlsafe(32)
            )
            registered += 1
        reps = 50 if target < 30_000 else 5
        started = time.perf_counter()
        for _ in range(reps):
            log._redact_processor(None, "info", dict(event))  # noqa: SLF001
        per = 1000 * (time.perf_counter() - started) / reps
        ticks = target // 2
        print(f"   {target:>7} secrets (~{ticks:>6} ticks since start): {per:8.3f} ms per log event")


async def sweep_growth() -> None:
    from runner.journal import Journal

    print("3. Outbox sweep queries (pending_batches + backlog) vs delivered batches kept")
    body = json.dumps(
        {
            "actions": [
                {
                    "tickId": "652bde96-0ebd-58b6-8fa1-ed2987b96f32",
                    "toolName": "todo.create",
                    "result": "ok",
                    "inputHash": "44136fa355b3678a",
                    "latencyMs": 12,
                }
            ]
            * 7
        }
    ).encode()
    with tempfile.TemporaryDirectory(prefix="persona-bench-micro-") as tmp:
        path = Path(tmp) / "runner.db"
        journal = await Journal.open(path)
        kept = 0
        for target in (0, 20_000, 100_000):
            db = sqlite3.connect(path)
            db.executemany(
                "INSERT INTO batches (tick_id, persona_id, kind, body, rows, state, attempts, created_at, delivered_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                ((f"t{i}", "p", "actions", body, 7, "delivered", 1, 0.0, 0.0) for i in range(kept, target)),
            )
            db.commit()
            db.close()
            kept = target
            await journal.pending_batches()
            reps = 20
            started = time.perf_counter()
            for _ in range(reps):
                await journal.pending_batches()
                await journal.backlog()
            per = 1000 * (time.perf_counter() - started) / reps
            size = path.stat().st_size / 2**20
            print(
                f"   {target:>7} delivered batches kept ({size:6.1f} MB): {per:7.2f} ms per sweep"
                " (one sweep runs after every tick)"
            )
        await journal.close()


def main() -> None:
    from runner import log

    log.configure("console", "warning")
    asyncio.run(client_setup())
    redaction()
    asyncio.run(sweep_growth())


if __name__ == "__main__":
    main()
