"""Unit tests of the pure rules: vectors, names, ratings, settings, retry classification."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runner.agent.loop import ToolDef, bound
from runner.agent.providers.anthropic import api_names
from runner.agent.providers.scripted import ScriptedProvider
from runner.agent.rating import parse_failure_row, parse_ratings, rating_schema
from runner.mana.errors import ApiError, RetryPolicy, TransportError, is_retryable
from runner.persona import (
    DEV_SEED_SECRET,
    PARSE_MODULE,
    derive_password,
    input_hash,
    js_stringify,
    tick_id,
    tick_window,
)
from runner.settings import SettingsError, load_settings

VECTORS = Path(__file__).resolve().parent / "vectors"  # copies of shared/vectors: the repo tests alone


def _vectors(name: str) -> list[dict[str, Any]]:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))["vectors"]


@pytest.mark.parametrize("vector", _vectors("persona-password.json"), ids=lambda v: f"{v['secret'][:6]}/{v['email']}")
def test_password_matches_reference(vector: dict[str, str]) -> None:
    assert derive_password(vector["secret"], vector["email"]) == vector["password"]


@pytest.mark.parametrize("vector", _vectors("input-hash.json"), ids=lambda v: v["inputHash"])
def test_input_hash_matches_reference(vector: dict[str, str]) -> None:
    value = json.loads(vector["raw_json_from_llm"])
    assert js_stringify(value) == vector["js_stringified"]
    assert input_hash(value) == vector["inputHash"]


@pytest.mark.parametrize(
    ("number", "js"),
    [
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.5e-7, "1.5e-7"),
        (1e-6, "0.000001"),
        (-2.5, "-2.5"),
        (5e-324, "5e-324"),
        (float("nan"), "null"),
        (2**53 + 1, "9007199254740992"),
    ],
)
def test_numbers_print_as_javascript(number: float, js: str) -> None:
    assert js_stringify(number) == js


def test_js_key_order_puts_array_indexes_first() -> None:
    assert js_stringify({"b": 1, "2": 2, "1": 3, "01": 4, "a": 5}) == '{"1":3,"2":2,"b":1,"01":4,"a":5}'


def test_lone_surrogate_is_escaped_like_v8() -> None:
    assert js_stringify(json.loads('"\\ud83c x"')) == '"\\ud83c x"'


def test_tick_id_is_pure_in_persona_and_window() -> None:
    morning = datetime(2026, 11, 23, 8, 5, tzinfo=UTC)
    evening = datetime(2026, 11, 23, 20, 0, tzinfo=UTC)
    assert tick_window("daily", morning) == tick_window("weekdays", evening) == "2026-11-23"
    assert tick_window("hourly", morning) == "2026-11-23T08"
    assert tick_id("u1", "2026-11-23") == tick_id("u1", "2026-11-23")
    assert tick_id("u1", "2026-11-23") != tick_id("u2", "2026-11-23")
    assert tick_id("u1", "2026-11-23") != tick_id("u1", "2026-11-24")


def test_api_names_are_legal_unique_and_reversible() -> None:
    names = ["todo.create", "todo_create", "notes.search", "x" * 70 + ".verb", "x" * 70 + ".other", "ümlaut.tool"]
    mapping = api_names(names)
    assert set(mapping) == set(names)
    assert len(set(mapping.values())) == len(names)
    for api in mapping.values():
        assert len(api) <= 64 and all(c.isalnum() and c.isascii() or c in "_-" for c in api)
    assert mapping["notes.search"] == "notes_search"
    assert {v: k for k, v in mapping.items()}[mapping["todo.create"]] == "todo.create"
    assert api_names(list(reversed(names))) == mapping  # stable whatever order the server lists tools in


def test_ratings_are_clamped_filtered_and_deduplicated() -> None:
    payload = {
        "ratings": [
            {"module": "todo", "rating": 9, "notes": "super"},
            {"module": "todo", "rating": 1, "notes": "second opinion ignored"},
            {"module": "journal", "rating": "0", "notes": ""},
            {"module": "calendar", "rating": 4, "notes": "not used today"},
            {"module": "mood", "rating": 3.6},
        ]
    }
    rows = parse_ratings(payload, ["todo", "journal", "mood"])
    assert rows is not None
    assert [(r.module, r.rating, r.notes) for r in rows] == [
        ("todo", 5, "super"),
        ("journal", 1, None),
        ("mood", 4, None),
    ]


@pytest.mark.parametrize(
    "payload", [None, "Ich fand alles gut!", {"ratings": "viele"}, {"ratings": [{"module": "todo"}]}, 42]
)
def test_unreadable_ratings_give_none(payload: Any) -> None:
    assert parse_ratings(payload, ["todo"]) is None


def test_ratings_accept_a_json_string() -> None:
    rows = parse_ratings('{"ratings":[{"module":"todo","rating":2,"notes":"hakt"}]}', ["todo"])
    assert rows is not None and rows[0].rating == 2


def test_parse_failure_row_keeps_the_raw_text() -> None:
    row = parse_failure_row("Alles super, fünf Sterne")
    assert (row.module, row.rating, row.notes) == (PARSE_MODULE, 3, "Alles super, fünf Sterne")


def test_rating_schema_only_offers_used_modules() -> None:
    schema = rating_schema(["journal", "todo"])
    item = schema["properties"]["ratings"]["items"]
    assert item["properties"]["module"]["enum"] == ["journal", "todo"]
    jsonschema.validate({"ratings": [{"module": "todo", "rating": 5, "notes": "gut"}]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ratings": [{"module": "todo", "rating": 6, "notes": "gut"}]}, schema)


def test_bound_cuts_long_tool_results() -> None:
    assert bound("short") == "short"
    cut = bound("x" * 10_000, limit=100)
    assert cut.startswith("x" * 100) and "9900 more characters cut" in cut and len(cut) < 200


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 3},
            "due": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
            "priority": {"type": "integer", "minimum": 1, "maximum": 3},
        },
        "required": ["title"],
    },
    {"type": "object", "properties": {"status": {"enum": ["open", "done", "all"]}}},
    {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        "required": ["items"],
    },
    {
        "type": "object",
        "$defs": {
            "Entry": {
                "type": "object",
                "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 11}},
                "required": ["score"],
            }
        },
        "properties": {"entry": {"$ref": "#/$defs/Entry"}, "flag": {"type": "boolean"}},
        "required": ["entry"],
    },
]


async def test_scripted_provider_builds_schema_valid_arguments_deterministically() -> None:
    tools = [ToolDef(f"m{i}.verb", "", schema) for i, schema in enumerate(SCHEMAS)]
    first = await _script(tools, "seed-a")
    assert first == await _script(tools, "seed-a")
    assert 3 <= len(first) <= 8
    for name, arguments in first:
        jsonschema.validate(arguments, tools[int(name[1])].input_schema)
    seen = {name for seed in range(30) for name, _ in await _script(tools, f"s{seed}")}
    assert seen == {t.name for t in tools}


async def test_scripted_provider_follows_the_module_mix() -> None:
    tools = [ToolDef("todo.create", "", SCHEMAS[0]), ToolDef("journal.add", "", SCHEMAS[1])]
    picked = [
        name for seed in range(40) for name, _ in await _script(tools, f"s{seed}", {"todo": 1.0, "calendar": 5.0})
    ]
    assert set(picked) == {"todo.create"}


async def _script(tools: list[ToolDef], seed: str, mix: dict[str, float] | None = None) -> list[tuple[str, Any]]:
    from runner.agent.loop import Results, ToolResult

    provider = ScriptedProvider(seed, mix or {})
    transcript: list[Any] = []
    calls: list[tuple[str, Any]] = []
    for _ in range(15):
        turn = await provider.next_turn("", tools, transcript)
        transcript.append(turn)
        if not turn.calls:
            break
        calls += [(c.name, c.input) for c in turn.calls]
        transcript.append(Results([ToolResult(c.id, "ok", False) for c in turn.calls]))
    return calls


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONA_CONCURRENCY", "zero")
    with pytest.raises(SettingsError, match=r"^PERSONA_CONCURRENCY: "):
        load_settings()


def test_settings_never_echo_a_secret_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANA_API_URL", "ftp://secret-host-value")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "secret-host-value" not in str(caught.value) and str(caught.value).startswith("MANA_API_URL: ")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://runner:pw-secret-1@db/runner", "driver 'mysql' is not supported"),
        ("sqlite+aiosqlite:///pw-secret-1.db", "use RUNNER_STATE_PATH for SQLite"),
        ("postgresql+asyncpg://runner:pw-secret-1@/runner", "needs a host and a database name"),
        ("not a url pw-secret-1", "not a database URL"),
    ],
)
def test_a_bad_state_url_is_one_line_that_never_echoes_it(url: str, says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(runner_state_url=url)
    assert str(caught.value).startswith("RUNNER_STATE_URL: ") and says in str(caught.value)
    assert "pw-secret-1" not in str(caught.value)


def test_a_state_url_selects_postgresql_through_asyncpg_and_its_password_is_a_secret(tmp_path: Path) -> None:
    settings = load_settings(
        runner_state_url="postgres://runner:pw-secret-2@db:5432/runner", runner_state_path=tmp_path
    )
    assert settings.journal_location == "postgresql+asyncpg://runner:pw-secret-2@db:5432/runner"
    assert "pw-secret-2" in settings.secrets()
    assert load_settings(runner_state_url="", runner_state_path=tmp_path / "j.db").journal_location == tmp_path / "j.db"


def test_production_refuses_the_dev_seed_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_ENV", "production")
    monkeypatch.setenv("MANA_SERVICE_KEY", "k" * 20)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "a" * 20)
    monkeypatch.setenv("PERSONA_SEED_SECRET", DEV_SEED_SECRET)
    with pytest.raises(SettingsError, match="PERSONA_SEED_SECRET"):
        load_settings()
    monkeypatch.setenv("PERSONA_SEED_SECRET", "a-real-secret")
    assert load_settings().production
    monkeypatch.delenv("MANA_SERVICE_KEY")
    with pytest.raises(SettingsError, match="MANA_SERVICE_KEY"):
        load_settings()


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (TransportError("x", stage="login"), True),
        (ApiError(500, "INTERNAL", "", stage="login"), True),
        (ApiError(503, "SERVICE_UNAVAILABLE", "", stage="due"), True),
        (ApiError(429, "RATE_LIMITED", "", stage="login", retry_after=2), True),
        (ApiError(429, "RATE_LIMITED", "", stage="login", retry_after=3600), False),
        (ApiError(429, "ACCOUNT_LOCKED", "", stage="login", retry_after=5), False),
        (ApiError(401, "INVALID_CREDENTIALS", "", stage="login"), False),
        (ApiError(403, "EMAIL_NOT_VERIFIED", "", stage="login"), False),
        (ApiError(400, "VALIDATION", "", stage="actions"), False),
        (ApiError(404, "Persona not found", "", stage="actions"), False),
    ],
)
def test_retry_classification(error: Exception, retry: bool) -> None:
    assert is_retryable(error) is retry


async def test_retry_policy_honours_retry_after_and_stops() -> None:
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    async def flaky() -> str:
        attempts.append(loop.time())
        if len(attempts) < 3:
            raise ApiError(429, "RATE_LIMITED", "", stage="login", retry_after=0.3)
        return "ok"

    assert await RetryPolicy(attempts=5, base_s=0.01).run(flaky) == "ok"
    assert len(attempts) == 3
    assert attempts[1] - attempts[0] >= 0.29 and attempts[2] - attempts[1] >= 0.29

    refused: list[int] = []

    async def wrong_password() -> None:
        refused.append(1)
        raise ApiError(401, "INVALID_CREDENTIALS", "", stage="login")

    with pytest.raises(ApiError):
        await RetryPolicy(attempts=5, base_s=0.01).run(wrong_password)
    assert refused == [1]

    down: list[int] = []

    async def outage() -> None:
        down.append(1)
        raise TransportError("refused", stage="due")

    with pytest.raises(TransportError):
        await RetryPolicy(attempts=4, base_s=0.01).run(outage)
    assert len(down) == 4


def test_redaction_removes_registered_secrets_longest_first_and_any_jwt() -> None:
    from runner.log import REDACTED, redact, register_secret

    register_secret("short")  # too short to register: it would eat ordinary words
    register_secret("abcdef-secret")
    register_secret("abcdef-secret-longer")
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJlLWJ5dGVz"
    text = f"short abcdef-secret-longer / abcdef-secret / Bearer {jwt_like}"
    assert redact(text) == f"short {REDACTED} / {REDACTED} / Bearer {REDACTED}"


async def test_prune_forgets_only_ticks_whose_rows_all_landed(tmp_path: Path) -> None:
    from runner.journal import Journal

    path = tmp_path / "j.db"
    journal = await Journal.open(path)
    try:
        for tick in ("landed", "pending", "fresh"):
            assert await journal.claim(f"p-{tick}", "2026-11-20", tick)
            await journal.begin_call(tick, 0, "todo.create", "0123456789abcdef")
            await journal.end_call(tick, 0, True, None, 5)
            assert await journal.seal(tick, "ok", None)
        for batch in await journal.pending_batches():
            if batch.tick_id != "pending":
                await journal.mark_batch(batch.id, "delivered", None)
        # Seal times come from the database's clock: age two ticks by an hour, as time would.
        with sqlite3.connect(path) as db:
            db.execute("UPDATE ticks SET updated_at = updated_at - 3600 WHERE tick_id IN ('landed', 'pending')")
        assert await journal.prune(older_than_s=1800) == 1
        assert await journal.tick_state("landed") is None
        assert await journal.tick_state("pending") is not None and await journal.tick_state("fresh") is not None
        assert [b.tick_id for b in await journal.pending_batches()] == ["pending"]
        assert await journal.claim("p-landed", "2026-11-20", "landed") is not None  # old window: harmless
    finally:
        await journal.close()
