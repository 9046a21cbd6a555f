"""`python -m runner status` and `report` beside a daemon that is writing: what is in flight, per replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import WEEKDAY
from procs import ROOT, runner_env, start_runner, start_sandbox, wait_for

SEED = "status-seed-secret-1234"
KEY = "status-service-key-5678"


def _runner(command: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "RUNNER_"))}
    env.update(RUNNER_STATE_PATH=str(state), LOG_FORMAT="json", TICK_INTERVAL_MS="1000")
    return subprocess.run(
        [sys.executable, "-m", "runner", *command.split()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_beside_no_daemon_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "runner.db"
    assert _runner("outbox", state).returncode == 0  # a journal, migrated, that no daemon polls
    done = _runner("status", state)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["no runner has polled this journal in the last 63 s"]


def test_status_and_report_beside_a_running_daemon_show_its_ticks_and_never_block_it(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path, seed_secret=SEED, service_key=KEY)
    try:
        sandbox.post("clock", {"now": WEEKDAY})
        state = tmp_path / "runner.db"
        # Slow thinkers, so that ticks stay in flight while status looks.
        env = runner_env(sandbox, state, SCRIPTED_LATENCY_MS="1500", PERSONA_CONCURRENCY="2")
        daemon = start_runner(env, tmp_path / "runner.log")
        try:
            replica = daemon.wait_healthy()["replica"]
            users = {p["userId"] for p in sandbox.get("personas")}

            def in_flight() -> list[str]:
                shown = _runner("status", state)
                assert shown.returncode == 0, shown.stderr
                lines = [line for line in shown.stdout.splitlines() if any(u in line for u in users)]
                return lines if len(lines) == 2 else []

            lines = wait_for(in_flight, timeout=60, what="two ticks in flight in status")
            assert all(replica in line for line in lines)
            assert all(any(stage in line.split() for stage in ("login", "mcp", "play", "seal")) for line in lines)
            shown = _runner("status", state).stdout
            assert replica in shown and "fleet: 1 replica(s) polling, running" in shown and "outbox: pending=" in shown
            # The report reads beside the writer: it answers, and the daemon goes on sealing ticks.
            sealed_before = len(sandbox.get("actions"))
            report = _runner("report --json", state)
            assert report.returncode == 0, report.stderr
            assert json.loads(report.stdout)["period"]
            wait_for(lambda: len(sandbox.get("actions")) > sealed_before, timeout=60, what="ticks sealed after report")
            assert httpx.get(f"{daemon.url}/health", timeout=5).json()["status"] == "ok"
        finally:
            assert daemon.terminate() == 0
    finally:
        sandbox.stop()
