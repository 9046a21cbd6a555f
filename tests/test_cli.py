"""The command line as a user runs it: exit codes, one-line errors, no secrets, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import WEEKDAY
from procs import ROOT, SandboxProcess, runner_env, start_sandbox

SEED = "cli-seed-secret-1234"
KEY = "cli-service-key-5678"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    # One for the module: each test brings its own journal, and none depends on what another did in Mana.
    sb = start_sandbox(tmp_path_factory.mktemp("sandbox"), seed_secret=SEED, service_key=KEY)
    sb.post("clock", {"now": WEEKDAY})
    yield sb
    sb.stop()


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def last_plain(stderr: str) -> str:
    """The error line: the last one that is not a JSON log line (a worker thread may log after it)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("{")][-1]


def test_once_ticks_every_due_persona_and_exits_zero(sandbox: SandboxProcess, tmp_path: Path) -> None:
    done = run(["once"], runner_env(sandbox, tmp_path / "runner.db"))
    assert done.returncode == 0, done.stderr[-3000:]
    personas = {a["personaId"] for a in sandbox.get("actions")}
    assert len(personas) == len(sandbox.get("personas"))
    assert "Traceback" not in done.stderr


def test_once_with_a_wrong_service_key_exits_one_with_one_clear_line(sandbox: SandboxProcess, tmp_path: Path) -> None:
    env = runner_env(sandbox, tmp_path / "runner.db", MANA_SERVICE_KEY="not-the-key-0000")
    done = run(["once"], env)
    assert done.returncode == 1
    last = last_plain(done.stderr)
    assert last.startswith("error: cannot poll the personas API") and "401" in last
    assert "Traceback" not in done.stderr and "not-the-key-0000" not in done.stderr + done.stdout


def test_once_with_the_api_unreachable_exits_one_after_bounded_retries(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "LLM_"))}
    env.update(MANA_API_URL="http://127.0.0.1:9", MANA_RETRY_ATTEMPTS="2", MANA_RETRY_BASE_S="0.01")
    env.update(RUNNER_STATE_PATH=str(tmp_path / "r.db"), LLM_PROVIDER="scripted")
    done = run(["once"], env)
    assert done.returncode == 1
    assert last_plain(done.stderr).startswith("error: cannot poll the personas API: due: ConnectError")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PERSONA_CONCURRENCY", "0"), ("TICK_INTERVAL_MS", "soon"), ("LLM_PROVIDER", "gpt"), ("MANA_AUTH_URL", "auth")],
)
def test_a_bad_setting_exits_two_with_one_line_naming_it(variable: str, value: str) -> None:
    env = {**os.environ, variable: value}
    done = run(["once"], env, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {variable}: ")


def test_production_refuses_the_development_seed_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PERSONA_SEED_SECRET"}
    env.update(NODE_ENV="production", MANA_SERVICE_KEY="k" * 16, ANTHROPIC_API_KEY="a" * 16)
    done = run(["serve"], env, timeout=30)
    assert done.returncode == 2 and "PERSONA_SEED_SECRET" in done.stderr


def test_password_prints_the_reference_derivation() -> None:
    vectors = json.loads((ROOT / "tests" / "vectors" / "persona-password.json").read_text(encoding="utf-8"))
    vector = next(v for v in vectors["vectors"] if v["secret"] == "prod-Secret_2026!")
    done = run(["password", vector["email"]], {**os.environ, "PERSONA_SEED_SECRET": vector["secret"]}, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == vector["password"]


def test_login_proves_the_personal_space_and_prints_no_secret(sandbox: SandboxProcess, tmp_path: Path) -> None:
    people = sandbox.get("personas")
    markus = next(p for p in people if p["options"].get("metadataAsString"))  # metadata served as a JSON string
    personal = next(s["id"] for s in markus["spaces"] if s["type"] == "personal")
    done = run(["login", markus["email"]], runner_env(sandbox, tmp_path / "runner.db"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"ok: {markus['email']} is user {markus['userId']}, personal space {personal} (space list via cookie)"
    )

    from runner.persona import derive_password

    assert derive_password(SEED, markus["email"]) not in done.stdout + done.stderr
    assert "eyJ" not in done.stdout + done.stderr

    refused = run(["login", "persona.nobody@mana.test"], runner_env(sandbox, tmp_path / "runner.db"), timeout=60)
    assert refused.returncode == 1
    assert last_plain(refused.stderr) == f"error: login: HTTP 401 INVALID_CREDENTIALS: {_message(sandbox)}"


def _message(sandbox: SandboxProcess) -> str:
    body = httpx.post(f"{sandbox.auth_url}/api/v1/auth/login", json={"email": "persona.x@mana.test", "password": "x"})
    return str(body.json()["message"])


def test_demo_runs_the_whole_catalog_and_ends_with_a_table() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "MANA_", "PERSONA_", "LLM_"))}
    done = run(["demo"], env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["persona", "outcome", "tools", "ok", "tools", "error", "ratings"]
    rows = lines[2:]
    assert len(rows) == 10 and all(" ok " in row for row in rows)
    assert "provider: scripted (offline)" in done.stderr
