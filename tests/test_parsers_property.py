"""Property tests for every parser at the edges this runner owns: any input has a defined outcome.

/due bodies (bytes and decoded values, and over real HTTP), login and space answers over real
HTTP, settings from the environment, and the model's rating replies. "Defined" means: a value of the documented type, or
the documented error type (ManaError, SettingsError); never anything else, never a traceback.
The example counts are the ones the README's Reliability section quotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from canned import Canned
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.agent.rating import MAX_NOTES_CHARS, parse_failure_row, parse_ratings
from runner.mana.auth import AuthClient, Login, personal_space_of, spaces_of
from runner.mana.errors import ManaError, RetryPolicy, decode_json
from runner.mana.http import shared_client
from runner.mana.personas_api import DueLimits, DueList, PersonasApi, parse_due
from runner.persona import PARSE_MODULE, DuePersona
from runner.settings import Settings, SettingsError, load_settings

DUE_BYTES_EXAMPLES = 600
DUE_VALUE_EXAMPLES = 600
HTTP_EXAMPLES = 100
SETTINGS_EXAMPLES = 400

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
# Rows close to the contract's shape, each field possibly wrong, so validation is exercised deeply.
row_fields = {
    "userId": st.text(max_size=20) | json_scalars,
    "email": st.emails() | st.text(max_size=20) | json_scalars,
    "archetype": st.text(max_size=20) | json_scalars,
    "systemPrompt": st.text(max_size=200) | json_scalars,
    "moduleMix": st.dictionaries(st.text(max_size=10), st.floats(allow_nan=True) | st.integers(), max_size=4)
    | json_values,
    "tickCadence": st.sampled_from(["daily", "weekdays", "hourly", "yearly", ""]) | json_scalars,
    "lastActiveAt": st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=30) | json_scalars,
}
due_rows = st.fixed_dictionaries({}, optional=row_fields)
due_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"personas": st.lists(due_rows, max_size=8) | json_values},
        optional={"serverTime": st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=40) | json_scalars},
    ),
)


def _check_due(due: DueList) -> None:
    assert isinstance(due, DueList)
    assert all(isinstance(p, DuePersona) for p in due.personas)
    assert due.server_time.tzinfo is not None


@settings(max_examples=DUE_VALUE_EXAMPLES, deadline=None)
@given(due_bodies)
def test_parse_due_takes_any_json_value(body: Any) -> None:
    _check_due(parse_due(body, DueLimits(max_rows=5, prompt_max_chars=100)))


def _due_from_bytes(raw: bytes) -> DueList | None:
    try:
        return parse_due(decode_json(raw), DueLimits())
    except ValueError:
        return None  # the documented outcome: the poll fails with BAD_BODY


@settings(max_examples=DUE_BYTES_EXAMPLES, deadline=None)
@given(
    st.binary(max_size=300)
    | due_bodies.map(lambda b: json.dumps(b).encode())
    | st.tuples(due_bodies.map(lambda b: json.dumps(b).encode()), st.integers(0, 200), st.binary(max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]  # a valid body with bytes spliced in
    )
    | st.sampled_from(["utf-16", "utf-32", "latin-1"]).map(
        lambda enc: json.dumps({"personas": [{"userId": "ü", "email": "ä@b.c", "tickCadence": "daily"}]}).encode(enc)
    )
)
def test_any_due_bytes_have_a_defined_outcome(raw: bytes) -> None:
    due = _due_from_bytes(raw)
    if due is not None:
        _check_due(due)


@pytest.fixture(scope="module")
def server() -> Iterator[Canned]:
    canned = Canned()
    yield canned
    canned.close()


statuses = st.sampled_from([200, 201, 400, 401, 404, 413, 429, 500, 502, 503]) | st.integers(200, 599)
bodies = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
retry_after = st.none() | st.sampled_from(["0", "1e300", "inf", "-5", "nan", "Wed, 21 Oct 2015 07:28:00 GMT", "x"])


# An answer that names an encoding its body is not in (issue 13: `gzip` over plain JSON was a traceback).
encodings = st.none() | st.sampled_from(["gzip", "deflate", "br", "zstd", "gzip, deflate"])


def _serve(server: Canned, status: int, body: bytes, after: str | None, encoding: str | None = None) -> None:
    server.status, server.body = status, body
    server.headers = {"Content-Type": "application/json"}
    if after is not None:
        server.headers["Retry-After"] = after
    if encoding is not None:
        server.headers["Content-Encoding"] = encoding


@settings(max_examples=HTTP_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=statuses,
    body=bodies | due_bodies.map(lambda b: json.dumps(b).encode()),
    after=retry_after,
    encoding=encodings,
)
def test_personas_api_answers_are_a_result_or_a_mana_error(
    server: Canned, status: int, body: bytes, after: str | None, encoding: str | None
) -> None:
    _serve(server, status, body, after, encoding)

    async def poll() -> None:
        async with shared_client() as client:
            api = PersonasApi(client, server.url, "key-123456", RetryPolicy(attempts=1), "/p")
            with contextlib.suppress(ManaError):
                _check_due(await api.due())
            with contextlib.suppress(ManaError):
                await api.post_batch("p-1", "actions", b'{"actions": []}')
            with contextlib.suppress(ManaError):
                await api.ping()

    asyncio.run(poll())


login_bodies = st.fixed_dictionaries(
    {},
    optional={
        "accessToken": st.text(max_size=40) | json_scalars,
        "user": st.fixed_dictionaries({}, optional={"id": json_scalars}) | json_values,
        "token": st.text(max_size=20),
    },
).map(lambda v: json.dumps(v).encode())
space_bodies = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_scalars,
            "metadata": st.sampled_from(['{"type":"personal"}', "{", "null"])
            | st.fixed_dictionaries({"type": st.sampled_from(["personal", "team"]) | json_scalars})
            | json_values,
        },
    )
    | json_values,
    max_size=4,
).map(lambda v: json.dumps(v).encode())


@settings(max_examples=HTTP_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=statuses, body=bodies | login_bodies | space_bodies, after=retry_after, encoding=encodings)
def test_mana_auth_answers_are_a_result_or_a_mana_error(
    server: Canned, status: int, body: bytes, after: str | None, encoding: str | None
) -> None:
    _serve(server, status, body, after, encoding)

    async def login() -> None:
        async with shared_client() as client:
            auth = AuthClient(client, server.url, RetryPolicy(attempts=1))
            with contextlib.suppress(ManaError):
                assert isinstance(await auth.login("a@b.c", "password-123456"), Login)
            with contextlib.suppress(ManaError):
                listed = await auth.spaces_by_bearer(Login("u", "token"))
                assert listed is None or isinstance(personal_space_of(spaces_of(listed)), str)
            with contextlib.suppress(ManaError):
                assert isinstance(
                    personal_space_of(spaces_of(await auth.spaces_by_cookie("mana.session_token=x"))), str
                )
            with contextlib.suppress(ManaError):
                assert isinstance(await auth.session_cookie("a@b.c", "password-123456"), str)
            with contextlib.suppress(ManaError):
                assert isinstance(await auth.vault_exists(Login("u", "token")), bool)
            with contextlib.suppress(ManaError):
                await auth.init_vault(Login("u", "token"))

    asyncio.run(login())


SETTING_NAMES = [
    "MANA_API_URL",
    "MANA_AUTH_URL",
    "MANA_MCP_URL",
    "ANTHROPIC_BASE_URL",
    "MANA_SERVICE_KEY",
    "ANTHROPIC_API_KEY",
    "PERSONA_SEED_SECRET",
    "TICK_INTERVAL_MS",
    "PORT",
    "PERSONA_CONCURRENCY",
    "PERSONA_TICK_TIMEOUT_S",
    "MANA_RETRY_BASE_S",
    "RUNNER_RETENTION_DAYS",
    "RUNNER_ENV",
    "NODE_ENV",
    "LLM_PROVIDER",
    "LOG_FORMAT",
    "RUNNER_PAUSED",
    "RUNNER_DIAG",
    "HTTP_HOST",
    "DUE_MAX_BYTES",
    "OUTBOX_PARKED_RETRY_S",
]
# What an environment can hold: no NUL, no lone surrogates.
env_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
env_values = env_text | st.sampled_from(
    ["1e20", "1e309", "-1", "nan", "inf", "0x10", "http://[::1", "http://h:99999", "https://x", "true", "production"]
)


@settings(max_examples=SETTINGS_EXAMPLES, deadline=None)
@given(st.dictionaries(st.sampled_from(SETTING_NAMES), env_values, min_size=1, max_size=4))
def test_any_environment_is_settings_or_one_settings_error(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        try:
            loaded = load_settings()
        except SettingsError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 400
            # A secret's value is never echoed (12+ characters: shorter ones could be words of the message).
            secrets = ("MANA_SERVICE_KEY", "ANTHROPIC_API_KEY", "PERSONA_SEED_SECRET")
            assert not any(len(v) >= 12 and v in message for k, v in env.items() if k in secrets)
            return
    assert isinstance(loaded, Settings)
    assert 100 <= loaded.tick_interval_ms <= 86_400_000 and 0 <= loaded.port <= 65535
    assert loaded.persona_seed_secret.get_secret_value()


# --- model replies: the rating the model gives back -------------------------------------------

RATING_EXAMPLES = 400
rating_items = st.fixed_dictionaries(
    {},
    optional={
        "module": st.sampled_from(["todo", "mood", "notes", "calendar", "__parse", ""]) | json_scalars,
        "rating": st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=6) | json_scalars,
        "notes": st.text(max_size=600) | json_scalars,
    },
)
rating_payloads = st.one_of(
    json_values,
    st.fixed_dictionaries({"ratings": st.lists(rating_items | json_values, max_size=6) | json_values}),
    st.lists(rating_items, max_size=6),
)


@settings(max_examples=RATING_EXAMPLES, deadline=None)
@given(payload=rating_payloads, as_text=st.booleans())
def test_any_rating_reply_is_rows_for_used_modules_or_a_parse_row(payload: Any, as_text: bool) -> None:
    """Whatever the model answers (structured, or as JSON text), the feedback rows keep the API's rules."""
    used = ["mood", "todo"]
    reply = json.dumps(payload) if as_text else payload
    rows = parse_ratings(reply, used)
    if rows is None:  # not a rating at all: the reference runner's `__parse` row, shown to an operator
        rows = [parse_failure_row(json.dumps(payload, ensure_ascii=False))]
        assert rows[0].module == PARSE_MODULE and rows[0].rating == 3
    else:
        assert {r.module for r in rows} <= set(used)
        assert len({r.module for r in rows}) == len(rows)  # one rating per module and tick
    for row in rows:
        assert isinstance(row.rating, int) and 1 <= row.rating <= 5
        assert row.notes is None or len(row.notes) <= MAX_NOTES_CHARS
