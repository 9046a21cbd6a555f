"""Real processes for end-to-end tests: the sandbox and the runner, as a user would start them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from runner.persona import TICK_ROW, input_hash

ROOT = Path(__file__).resolve().parents[1]

# The one place runner-level tests pick the sandbox's MCP surface: the real one (mana-tools.json, no
# annotations), as the runner meets it in production. The annotated variant with its destructive bait
# has tests of its own (test_mcp_runner.py), which keep the annotation path of the tool policy tested.
MCP_SURFACE = "real"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SandboxProcess:
    proc: subprocess.Popen[str]
    auth_url: str
    api_url: str
    mcp_url: str
    service_key: str
    seed_secret: str

    def get(self, what: str) -> Any:
        response = httpx.get(f"{self.api_url}/__sandbox/{what}", timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, what: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api_url}/__sandbox/{what}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sandbox(
    tmp: Path,
    *,
    seed_secret: str,
    service_key: str,
    python: str = sys.executable,
    extra: tuple[str, ...] = (),
    db: Path | None = None,
    log: Path | None = None,
) -> SandboxProcess:
    """The sandbox as a process on free ports; its database at `db` (default tmp/sandbox.db), its
    stderr in `log` when given (a long run's log must not fill an unread pipe)."""
    with contextlib.ExitStack() as files:
        stderr: Any = files.enter_context(log.open("ab")) if log is not None else subprocess.PIPE
        proc = subprocess.Popen(
            [
                python,
                "-m",
                "runner.sandbox",
                "--db",
                str(db or tmp / "sandbox.db"),
                "--auth-port",
                "0",
                "--api-port",
                "0",
                "--mcp-port",
                "0",
                "--seed-secret",
                seed_secret,
                "--service-key",
                service_key,
                "--mcp-surface",
                MCP_SURFACE,
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        said = log.read_text(errors="replace")[-1000:] if log is not None else proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"sandbox did not start: {said}")
    urls = json.loads(line)
    return SandboxProcess(proc, urls["auth_url"], urls["api_url"], urls["mcp_url"], service_key, seed_secret)


@dataclass
class RunnerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner exited {self.proc.returncode}: {self.logs()[-2000:]}")
            try:
                response = httpx.get(f"{self.url}/health", timeout=2)
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("runner never became healthy")

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def runner_env(sandbox: SandboxProcess, state: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "ANTHROPIC_", "RUNNER_", "LLM_"))
    }
    env.update(
        MANA_API_URL=sandbox.api_url,
        MANA_AUTH_URL=sandbox.auth_url,
        MANA_MCP_URL=sandbox.mcp_url,
        MANA_SERVICE_KEY=sandbox.service_key,
        PERSONA_SEED_SECRET=sandbox.seed_secret,
        LLM_PROVIDER="scripted",
        RUNNER_STATE_PATH=str(state),
        TICK_INTERVAL_MS="1000",
        MANA_RETRY_BASE_S="0.05",
        MANA_LOGIN_RATE="1000/1s",  # the sandbox does not limit loopback sign-ins unless asked
        PERSONA_RETRY_BASE_S="0.5",
        LOG_FORMAT="json",
        LOG_LEVEL="debug",
        PORT=str(free_port()),
    )
    env.update(extra)
    return env


def start_runner(
    env: dict[str, str],
    log_path: Path,
    *,
    args: tuple[str, ...] = ("serve",),
    python: str = sys.executable,
    cwd: Path = ROOT,
) -> RunnerProcess:
    with log_path.open("ab") as log:
        proc = subprocess.Popen([python, "-m", "runner", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return RunnerProcess(proc, int(env["PORT"]), log_path, env)


async def until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """wait_for for async tests: the check runs in a thread, so the event loop (a fake Messages
    API, an in-process sandbox) goes on serving while a check blocks on HTTP or psql."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def calls_vs_rows(
    sandbox: SandboxProcess,
) -> tuple[dict[str, Counter[tuple[str, str]]], dict[str, Counter[tuple[str, str]]], list[dict[str, Any]]]:
    """Per user: the (tool, input hash) of every call that reached the gateway, and of every action row."""
    calls: dict[str, Counter[tuple[str, str]]] = {}
    for c in sandbox.get("mcp-calls"):
        calls.setdefault(c["userId"], Counter())[(c["tool"], input_hash(c["arguments"]))] += 1
    actions = sandbox.get("actions")
    rows: dict[str, Counter[tuple[str, str]]] = {}
    for a in actions:
        if a["toolName"] != TICK_ROW:
            rows.setdefault(a["personaId"], Counter())[(a["toolName"], a["inputHash"])] += 1
    return calls, rows, actions


def run_tiny_bench(script: str, out: Path, name: str) -> subprocess.CompletedProcess[str]:
    """A bench script's --tiny self-check, so the suite keeps the benchmarks from rotting."""
    return subprocess.run(
        [sys.executable, f"bench/{script}", "--tiny", "--out", str(out), "--name", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
