"""The daemon against the sandbox as a real process: windows and outages with the daemon in-process
(serve(runtime, stop)); SIGKILL and restart, SIGTERM drain, pause by signal, metrics and logs with the
daemon as a real process, since those are about the process itself."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import WEEKDAY, serving
from fake_anthropic import FakeAnthropic, default_brain
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
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runner import metrics as runner_metrics
from runner.persona import TICK_ROW, derive_password
from runner.settings import Settings, load_settings

SEED = "daemon-seed-secret-4711"
KEY = "daemon-service-key-0815"
ANTHROPIC_KEY = "daemon-anthropic-key-4242"


@pytest.fixture
def sandbox(tmp_path: Path) -> Any:
    sb = start_sandbox(tmp_path, seed_secret=SEED, service_key=KEY)
    sb.post("clock", {"now": WEEKDAY})
    yield sb
    sb.stop()


@pytest.fixture
async def runners(tmp_path: Path) -> AsyncIterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for runner in started:
        if runner.proc.poll() is None:
            runner.kill()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metrics(runner: RunnerProcess) -> Samples:
    return parse_metrics(httpx.get(f"{runner.url}/metrics", timeout=5).text)


def local_metrics() -> Samples:
    """This process's counters: an in-process daemon's, added to whatever ran before it in the suite."""
    return parse_metrics(generate_latest(runner_metrics.REGISTRY).decode())


def daemon_settings(sandbox: SandboxProcess, tmp_path: Path, **overrides: Any) -> Settings:
    """What runner_env gives a daemon process, as settings for one started in this process."""
    values: dict[str, Any] = dict(
        mana_api_url=sandbox.api_url,
        mana_auth_url=sandbox.auth_url,
        mana_mcp_url=sandbox.mcp_url,
        mana_service_key=sandbox.service_key,
        persona_seed_secret=sandbox.seed_secret,
        llm_provider="scripted",
        runner_env="development",
        node_env=None,
        runner_state_path=tmp_path / "runner.db",
        tick_interval_ms=1000,
        mana_retry_base_s=0.05,
        mana_login_rate="1000/1s",
        persona_retry_base_s=0.5,
        log_format="json",
        port=free_port(),
    )
    values.update(overrides)
    return load_settings(**values)


def metric_sum(values: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, lv) in ls for k, lv in labels.items()))


def catalog(sandbox: SandboxProcess) -> list[dict[str, Any]]:
    return list(sandbox.get("personas"))


def all_delivered(sandbox: SandboxProcess, expected: int) -> bool:
    return len({a["personaId"] for a in sandbox.get("actions")}) >= expected


def anthropic_env(fake: FakeAnthropic) -> dict[str, str]:
    return {"LLM_PROVIDER": "anthropic", "ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}


def slow_brain(delay_s: float) -> Callable[[dict[str, Any]], Any]:
    async def brain(body: dict[str, Any]) -> Any:
        await asyncio.sleep(delay_s)
        return default_brain(body)

    return brain


async def test_a_quiet_persona_runs_once_per_window_not_once_per_poll(
    sandbox: SandboxProcess, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.brain = lambda body: ([{"type": "text", "text": "Heute mache ich nichts."}], "end_turn")
    sticky = sandbox.post(
        "personas",
        {
            "name": "sticky",
            "archetype": "t",
            "systemPrompt": "",
            "moduleMix": {"todo": 1},
            "tickCadence": "hourly",
            "options": {"alwaysDue": True},
        },
    )
    people = catalog(sandbox)
    settings = daemon_settings(
        sandbox,
        tmp_path,
        tick_interval_ms=300,
        llm_provider="anthropic",
        anthropic_base_url=fake_anthropic.base_url,
        anthropic_api_key=ANTHROPIC_KEY,
    )

    def polls() -> float:
        return metric_sum(local_metrics(), "persona_polls_total", result="ok")

    async with serving(settings) as url:
        # The round first (however long a busy machine takes), then polls that find the sticky persona due again.
        await until(
            lambda: (
                all_delivered(sandbox, len(people))
                and metric_sum(parse_metrics(httpx.get(f"{url}/metrics", timeout=5).text), "persona_ticks_in_flight")
                == 0
            ),
            what="the first round delivered",
        )
        after_round = polls()
        await until(lambda: polls() >= after_round + 4, what="4 more polls")
    actions = sandbox.get("actions")
    assert Counter(a["personaId"] for a in actions)[sticky["userId"]] == 1
    assert all((a["toolName"], a["result"]) == (TICK_ROW, "ok") for a in actions)
    assert len(actions) == len(people)  # one quiet-day row per persona, however often polled
    assert len(fake_anthropic.requests) == len(actions)  # one model turn each: no rating without tools
    assert any(
        p["userId"] == sticky["userId"]
        for p in httpx.get(f"{sandbox.api_url}/api/v1/personas/internal/due", headers={"X-Service-Key": KEY}).json()[
            "personas"
        ]
    )


async def test_an_outage_of_three_failures_on_each_route_loses_and_doubles_nothing(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    for route in ("due", "login", "organizations", "mcp", "actions", "feedback"):
        sandbox.post("faults", {"route": route, "status": 503, "count": 3})
    errors_before = metric_sum(local_metrics(), "persona_errors_total")
    expected = len(catalog(sandbox))
    async with serving(daemon_settings(sandbox, tmp_path, mana_retry_attempts=2)) as url:
        await until(
            lambda: (
                all_delivered(sandbox, expected)
                and metric_sum(parse_metrics(httpx.get(f"{url}/metrics", timeout=5).text), "persona_outbox_backlog")
                == 0
            ),
            timeout=90,
            what="every persona delivered",
        )
    calls, rows, actions = calls_vs_rows(sandbox)
    assert rows == calls
    for persona_id in {a["personaId"] for a in actions}:
        assert len({a["tickId"] for a in actions if a["personaId"] == persona_id}) == 1
    assert metric_sum(local_metrics(), "persona_errors_total") > errors_before  # the outage was seen, and survived


async def test_sigkill_mid_tick_then_restart_records_every_call_once_and_replays_no_day(
    sandbox: SandboxProcess, runners: list[RunnerProcess], tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.brain = slow_brain(0.3)
    env = runner_env(sandbox, tmp_path / "runner.db", **anthropic_env(fake_anthropic))
    first = start_runner(env, tmp_path / "runner.log")
    runners.append(first)
    await until(lambda: len(sandbox.get("mcp-calls")) >= 3, what="tool calls under way")
    first.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.proc.wait)
    killed_at_calls = len(sandbox.get("mcp-calls"))

    second = start_runner(env, tmp_path / "runner.log")
    runners.append(second)
    expected = len(catalog(sandbox))
    await until(
        lambda: all_delivered(sandbox, expected) and metric_sum(metrics(second), "persona_outbox_backlog") == 0,
        timeout=90,
        what="every persona delivered after restart",
    )
    calls, rows, actions = calls_vs_rows(sandbox)
    for user, made in calls.items():
        assert not made - rows.get(user, Counter()), f"a call that reached Mana has no row: {user}"
        extra = rows.get(user, Counter()) - made
        unknown = [a for a in actions if a["personaId"] == user and "outcome unknown" in (a["errorMessage"] or "")]
        assert sum(extra.values()) <= len(unknown)  # only calls cut before they were sent may lack a server trace
    for persona_id in {a["personaId"] for a in actions}:
        assert len({a["tickId"] for a in actions if a["personaId"] == persona_id}) == 1
    per_user_calls = Counter(c["userId"] for c in sandbox.get("mcp-calls"))
    assert max(per_user_calls.values()) <= 4  # the brain's day is 2 turns of 2 calls: nobody played twice
    interrupted = [a for a in actions if a["toolName"] == TICK_ROW and "interrupted" in (a["errorMessage"] or "")]
    assert interrupted and killed_at_calls >= 3
    assert second.terminate() == 0


async def test_sigterm_drains_cuts_at_the_deadline_and_exits_zero(
    sandbox: SandboxProcess, runners: list[RunnerProcess], tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.brain = slow_brain(1.5)
    env = runner_env(sandbox, tmp_path / "runner.db", DRAIN_TIMEOUT_S="1", **anthropic_env(fake_anthropic))
    runner = start_runner(env, tmp_path / "runner.log")
    runners.append(runner)
    await until(lambda: len(sandbox.get("mcp-calls")) >= 1, what="a tick under way")
    started = time.monotonic()
    code = await asyncio.to_thread(runner.terminate, 30)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 1 + 10 + 3  # drain deadline + final flush bound + process start-up slack
    # What the cut ticks did was flushed before exit: every call that reached Mana has its row.
    calls, rows, actions = calls_vs_rows(sandbox)
    for user, made in calls.items():
        assert not made - rows.get(user, Counter())
    assert any("runner shut down" in (a["errorMessage"] or "") for a in actions)
    assert "drain deadline reached" in runner.logs()


async def test_pause_and_resume_by_signal_keep_health_green(
    sandbox: SandboxProcess, runners: list[RunnerProcess], tmp_path: Path
) -> None:
    runner = start_runner(
        runner_env(sandbox, tmp_path / "runner.db", RUNNER_PAUSED="true", TICK_INTERVAL_MS="300"),
        tmp_path / "runner.log",
    )
    runners.append(runner)
    health = await asyncio.to_thread(runner.wait_healthy)
    assert health["paused"] is True
    await asyncio.sleep(1.5)
    assert sandbox.get("actions") == [] and sandbox.get("logins") == []
    runner.proc.send_signal(signal.SIGUSR2)
    await until(lambda: all_delivered(sandbox, len(catalog(sandbox))), what="ticks after resume")
    assert httpx.get(f"{runner.url}/health").json()["paused"] is False
    runner.proc.send_signal(signal.SIGUSR1)
    await until(lambda: httpx.get(f"{runner.url}/health").json()["paused"] is True, what="paused again")
    assert runner.terminate() == 0


async def test_metrics_match_the_rows_and_no_secret_reaches_any_output(
    sandbox: SandboxProcess, runners: list[RunnerProcess], tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    env = runner_env(sandbox, tmp_path / "runner.db", RUNNER_DIAG="true", **anthropic_env(fake_anthropic))
    runner = start_runner(env, tmp_path / "runner.log")
    runners.append(runner)
    await asyncio.to_thread(runner.wait_healthy)
    assert httpx.get(f"{runner.url}/ready", timeout=10).status_code == 200
    people = catalog(sandbox)
    await until(
        lambda: (
            all_delivered(sandbox, len(people))
            and metric_sum(metrics(runner), "persona_outbox_backlog") == 0
            and metric_sum(metrics(runner), "persona_ticks_in_flight") == 0
        ),
        what="a full round",
    )
    diag = httpx.get(f"{runner.url}/diag/login", params={"email": people[0]["email"]}, timeout=10)
    assert diag.status_code == 200 and diag.json()["ok"] is True
    assert diag.json()["via"] == "cookie"  # the sandbox's space list refuses Bearer, as the real one does

    values = metrics(runner)
    actions, feedback, calls = sandbox.get("actions"), sandbox.get("feedback"), sandbox.get("mcp-calls")
    assert metric_sum(values, "persona_rows_delivered_total", kind="actions") == len(actions)
    assert metric_sum(values, "persona_rows_delivered_total", kind="feedback") == len(feedback)
    assert metric_sum(values, "persona_tool_calls_total") == len(calls)
    assert metric_sum(values, "persona_tool_calls_total", result="error") == sum(1 for c in calls if c["isError"])
    assert metric_sum(values, "persona_ticks_total", outcome="ok") == len(people)
    assert metric_sum(values, "persona_llm_tokens_total", kind="input") > 0
    assert runner.terminate() == 0

    output = runner.logs() + diag.text
    secrets = [SEED, KEY, ANTHROPIC_KEY] + [derive_password(SEED, p["email"]) for p in people]
    leaked = [s for s in secrets if s in output]
    assert not leaked
    assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.", output), "a JWT reached the logs"
    assert "refuses Bearer" in output  # the cookie path ran, so there were cookies to leak

    # Nor in what the runner wrote: the rows in Mana, the journal on disk (with its WAL).
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("runner.db*")).decode("utf-8", "replace")
    rows = json.dumps([sandbox.get("actions"), sandbox.get("feedback"), sandbox.get("mcp-calls")])
    for where, text in (("logs", output), ("journal", journal), ("rows", rows)):
        assert not [s for s in secrets if s in text], where
        assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.", text), f"a JWT reached the {where}"
        assert "session_token" not in text, f"a session cookie reached the {where}"
        # Better Auth's signed cookie value, URL-encoded or not: <token>.<base64 HMAC-SHA256>.
        signed = r"[A-Za-z0-9]{16,}\.(?:[A-Za-z0-9+/]|%2[BbFf]){42,43}(?:=|%3[Dd]){1,2}"
        assert not re.search(signed, text), f"a signed session cookie reached the {where}"
    assert '"tick_id"' in output and '"stage"' in output and '"persona"' in output  # tick lines carry their context
