"""Delivery when the personas API (or what stands in front of it) misbehaves: nothing lost, nothing blocked.

A real proxy on loopback (tests/fault_proxy.py) sits between the runner and the sandbox's API
and answers for it where a test says so.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Mana, open_runner
from fault_proxy import FaultProxy
from hypothesis import given
from hypothesis import strategies as st
from procs import ROOT
from starlette.responses import JSONResponse, Response

from runner import metrics
from runner.dispatch import run_once
from runner.journal import Journal
from runner.mana.errors import error_from_response
from runner.outbox import is_refusal
from runner.persona import TICK_ROW, ActionRow, FeedbackRow, clean_text, tick_id, tick_window
from runner.settings import Settings

ROW_ROUTE = ("/actions", "/feedback")


def _is_row_post(method: str, path: str) -> bool:
    return method == "POST" and path.endswith(ROW_ROUTE)


def _metric(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def _rows_match_calls(mana: Mana) -> None:
    """Every MCP call the sandbox saw is exactly one action row: none lost, none doubled."""
    calls: Counter[tuple[str, str]] = Counter((c["userId"], c["tool"]) for c in await mana.get("mcp-calls"))
    rows: Counter[tuple[str, str]] = Counter(
        (a["personaId"], a["toolName"]) for a in await mana.get("actions") if a["toolName"] != TICK_ROW
    )
    assert rows == calls


async def _seal_first(settings: Settings, persona_id: str) -> None:
    """Make this persona's batch the oldest in the journal, ahead of everything a round adds."""
    from datetime import datetime

    window = tick_window("daily", datetime.fromisoformat("2026-11-25T09:30:00+00:00"))
    journal = await Journal.open(settings.runner_state_path)
    try:
        tid = tick_id(persona_id, window)
        assert await journal.claim(persona_id, window, tid)
        assert await journal.seal(tid, "ok", ActionRow(TICK_ROW, "ok"))
    finally:
        await journal.close()


async def test_a_batch_failing_forever_blocks_no_other_persona_is_parked_and_lands_when_redriven(
    mana: Mana, tmp_path: Path
) -> None:
    people = await mana.get("personas")
    poison = people[0]["userId"]
    async with FaultProxy(mana.sandbox.api_url) as proxy:
        # The real API answers 500 when PostgreSQL refuses a row; here, forever, for one persona.
        proxy.rule = lambda m, path, _: (
            JSONResponse({"error": "Internal Server Error"}, 500) if _is_row_post(m, path) and poison in path else None
        )
        # Due again at once and never parked: only the outbox's per-batch walk keeps the others going.
        settings = mana.settings(tmp_path, mana_api_url=proxy.url, mana_retry_attempts=1, outbox_park_after=1000)
        await _seal_first(settings, poison)
        async with open_runner(settings) as runtime:
            report = await run_once(runtime)
            assert report.backlog == 1  # only the poison batch is left
            counts = await runtime.journal.batch_counts()
            assert counts["pending"] == 1 and counts["parked"] == 0 and counts["refused"] == 0
        # It keeps failing: parked after OUTBOX_PARK_AFTER attempts, then left to the slow schedule.
        settings = mana.settings(
            tmp_path, mana_api_url=proxy.url, mana_retry_attempts=1, outbox_park_after=2, outbox_parked_retry_s=3600
        )
        parked_before = _metric("persona_batches_parked_total", kind="actions")
        async with open_runner(settings) as runtime:
            for _ in range(2):
                assert await runtime.outbox.deliver() == 1
            counts = await runtime.journal.batch_counts()
            assert counts["parked"] == 1 and counts["pending"] == 0
            assert _metric("persona_outbox_batches", state="parked") == 1
            assert _metric("persona_batches_parked_total", kind="actions") == parked_before + 1
            posts = proxy.answered.copy()
            assert await runtime.outbox.deliver() == 1
            assert proxy.answered == posts  # parked: another sweep now does not touch it
        landed = {a["personaId"] for a in await mana.get("actions")}
        assert landed == {p["userId"] for p in people} - {poison}
        print(
            f"\nmeasured: poison batch refused {sum(proxy.answered.values())} times; {len(landed)} personas delivered"
        )
        await _rows_match_calls(mana)

        proxy.rule = lambda m, path, _: None  # the API is fixed
        done = _cli(["outbox", "--retry"], settings.runner_state_path)
        assert done.returncode == 0 and "re-queued 1 batches" in done.stdout
        async with open_runner(settings) as runtime:
            assert (await run_once(runtime)).backlog == 0
    poison_rows = [a for a in await mana.get("actions") if a["personaId"] == poison]
    assert [(a["toolName"], a["result"]) for a in poison_rows] == [(TICK_ROW, "ok")]


def _ingress_outage(state: dict[str, int]) -> Any:
    """An ingress during a deploy: HTML 404, a proxy's 413, a 400 without the API's envelope, in turn."""
    answers = [
        lambda: Response("<html><body><h1>404 Not Found</h1>nginx</body></html>", 404, media_type="text/html"),
        lambda: Response("<html><body>413 Request Entity Too Large</body></html>", 413, media_type="text/html"),
        lambda: JSONResponse({"message": "Bad Request", "statusCode": 400}, 400),
        lambda: Response("", 404),
    ]

    def rule(method: str, path: str, _: bytes) -> Response | None:
        if not _is_row_post(method, path) or state["left"] <= 0:
            return None
        state["left"] -= 1
        return answers[state["left"] % len(answers)]()

    return rule


async def test_an_ingress_outage_answering_404_413_400_loses_no_row(mana: Mana, tmp_path: Path) -> None:
    state = {"left": 10_000}
    async with FaultProxy(mana.sandbox.api_url) as proxy:
        proxy.rule = _ingress_outage(state)
        settings = mana.settings(tmp_path, mana_api_url=proxy.url, mana_retry_attempts=2)
        async with open_runner(settings) as runtime:
            first = await run_once(runtime)
            counts = await runtime.journal.batch_counts()
        assert first.backlog > 0 and counts["refused"] == 0 and counts["delivered"] == 0
        assert sum(proxy.answered.values()) >= first.backlog  # every batch met the outage
        state["left"] = 0  # the deploy is over
        async with open_runner(settings) as runtime:
            second = await run_once(runtime)
        assert second.backlog == 0 and second.ticks == []
        print(
            f"\nmeasured: ingress outage answered {sum(proxy.answered.values())} row posts, "
            f"{first.backlog} batches held"
        )
    await _rows_match_calls(mana)
    assert {a["personaId"] for a in await mana.get("actions")} == {p["userId"] for p in await mana.get("personas")}


async def test_the_apis_own_refusal_is_kept_listed_and_redriven(mana: Mana, tmp_path: Path) -> None:
    people = await mana.get("personas")
    gone = people[1]["userId"]
    async with FaultProxy(mana.sandbox.api_url) as proxy:
        proxy.rule = lambda m, path, _: (
            JSONResponse({"error": "Persona not found"}, 404) if _is_row_post(m, path) and gone in path else None
        )
        settings = mana.settings(tmp_path, mana_api_url=proxy.url)
        refused_before = _metric("persona_batches_refused_total", kind="actions")
        async with open_runner(settings) as runtime:
            report = await run_once(runtime)
            assert report.backlog == 0  # a refusal is not retried by itself...
            counts = await runtime.journal.batch_counts()
        assert counts["refused"] >= 1  # ...but kept
        assert _metric("persona_batches_refused_total", kind="actions") == refused_before + 1
        listed = _cli(["outbox"], settings.runner_state_path)
        assert listed.returncode == 0 and f"refused={counts['refused']}" in listed.stdout
        assert "Persona not found" in listed.stdout
        proxy.rule = lambda m, path, _: None
        assert _cli(["outbox", "--retry"], settings.runner_state_path).returncode == 0
        async with open_runner(settings) as runtime:
            assert (await run_once(runtime)).backlog == 0
            assert (await runtime.journal.batch_counts())["refused"] == 0
    assert any(a["personaId"] == gone for a in await mana.get("actions"))
    await _rows_match_calls(mana)


def _cli(args: list[str], state: Path) -> subprocess.CompletedProcess[str]:
    env = {"RUNNER_STATE_PATH": str(state), "PATH": "/usr/bin:/bin", "LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("status", "content_type", "body", "refusal"),
    [
        (404, "application/json", {"error": "Persona not found"}, True),
        (400, "application/json", {"error": "One or more action rows failed validation"}, True),
        (400, "application/json", {"error": "`feedback` batch size must be ≤ 100"}, True),
        (400, "application/json", {"error": "Invalid JSON"}, True),
        (404, "text/html", "<html>404 Not Found</html>", False),
        (404, "text/plain", "404 Not Found", False),  # Hono's own unknown-route answer: a wrong path, retried
        (404, "application/json", {"error": "Not Found"}, False),
        (413, "text/html", "<html>413</html>", False),
        (413, "application/json", {"error": "Payload Too Large"}, False),
        (400, "application/json", {"message": "Bad Request"}, False),
        (400, "text/html", "<html>400 Bad Request</html>", False),
        (422, "application/json", {"error": "Unprocessable"}, False),
        (502, "text/html", "<html>502</html>", False),
    ],
)
def test_only_the_apis_own_envelope_is_a_refusal(status: int, content_type: str, body: Any, refusal: bool) -> None:
    raw = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    response = httpx.Response(status, headers={"content-type": content_type}, content=raw)
    assert is_refusal(error_from_response(response, "actions", raw)) is refusal


@given(st.text())
def test_clean_text_leaves_only_storable_text(text: str) -> None:
    cleaned = clean_text(text)
    cleaned.encode("utf-8")  # no lone surrogate survives
    assert not any(ord(c) < 0x20 and c not in "\n\t" for c in cleaned)
    assert not any(0x7F <= ord(c) <= 0x9F for c in cleaned)
    assert clean_text(cleaned) == cleaned and len(cleaned) <= 2000


async def test_rows_with_nul_surrogates_and_controls_are_frozen_clean(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "j.db")
    try:
        tid = "t-1"
        assert await journal.claim("p-1", "2026-11-25", tid)
        await journal.begin_call(tid, 0, "todo.create\x00\ud800", "abcd")
        await journal.end_call(tid, 0, False, "bad\x00 value \udcff\x1b[31m here", 5)
        await journal.save_ratings(tid, [FeedbackRow("todo", 3, "note\x00\ud83d")])
        assert await journal.seal(tid, "ok", None)
        bodies = [b.body for b in await journal.pending_batches()]
    finally:
        await journal.close()
    assert len(bodies) == 2
    for body in bodies:
        text = body.decode("utf-8")  # strict: valid UTF-8
        assert "\\u0000" not in text and "\\ud" not in text and "\\u001b" not in text
    actions = json.loads(bodies[0])["actions"]
    assert actions[0]["toolName"] == "todo.create" and actions[0]["errorMessage"] == "bad value [31m here"
    assert json.loads(bodies[1])["feedback"][0]["notes"] == "note"


async def test_a_journal_from_before_the_outbox_columns_opens_and_keeps_its_batches(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE ticks (tick_id VARCHAR(64) PRIMARY KEY, persona_id VARCHAR(255) NOT NULL,
              window VARCHAR(32) NOT NULL, state VARCHAR(16) NOT NULL, outcome VARCHAR(32),
              attempts INTEGER NOT NULL, next_attempt_at FLOAT, last_error TEXT,
              created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL);
            CREATE TABLE login_blocks (persona_id VARCHAR(255), secret_fingerprint VARCHAR(32),
              reason TEXT NOT NULL, created_at FLOAT NOT NULL, PRIMARY KEY (persona_id, secret_fingerprint));
            CREATE TABLE batches (id INTEGER PRIMARY KEY, tick_id VARCHAR(64) NOT NULL,
              persona_id VARCHAR(255) NOT NULL, kind VARCHAR(16) NOT NULL, body BLOB NOT NULL,
              rows INTEGER NOT NULL, state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL,
              last_error TEXT, created_at FLOAT NOT NULL, delivered_at FLOAT);
            INSERT INTO batches VALUES (1, 't', 'p', 'actions', X'7B7D', 1, 'dead', 1, 'HTTP 404', 1.0, NULL);
            INSERT INTO batches VALUES (2, 't', 'p', 'actions', X'7B7D', 1, 'pending', 0, NULL, 1.0, NULL);
            """
        )
    for _ in range(2):  # the upgrade is idempotent
        journal = await Journal.open(path)
        try:
            assert await journal.batch_counts() == {"pending": 1, "parked": 0, "refused": 1, "delivered": 0}
            assert await journal.login_block(None, "f", "x@y.z") is None
        finally:
            await journal.close()
