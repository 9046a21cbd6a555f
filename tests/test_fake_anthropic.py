"""The fake Messages API, exercised through the real anthropic SDK.

If these pass, other tests can trust that what the fake accepts the real API accepts
(for the rules the project cares about) and that the SDK's retry path really runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from fake_anthropic import FakeAnthropic, default_brain

MODEL = "claude-haiku-4-5"  # not in the SDK's DEPRECATED_MODELS, so no warning

# Typed Any: plain dicts, as the runner builds them, not the SDK's TypedDicts.
TOOLS: Any = [
    {
        "name": "todo_create",
        "description": "Create a todo",
        "input_schema": {
            "type": "object",
            "properties": {"title": {"type": "string", "maxLength": 80}, "due": {"type": "string", "format": "date"}},
            "required": ["title"],
        },
    },
    {"name": "todo_list", "input_schema": {"type": "object", "properties": {}}},
    {
        "name": "note_add",
        "input_schema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "pinned": {"type": "boolean"}},
            "required": ["text", "pinned"],
        },
    },
]

RATINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ratings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "module": {"type": "string", "enum": ["todo", "notes", "calendar"]},
                    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                    "notes": {"type": "string"},
                },
                "required": ["module", "rating"],
                "additionalProperties": False,
            },
        },
        "summary": {"type": "string"},
    },
    "required": ["ratings", "summary"],
}


@pytest.fixture
async def client(fake_anthropic: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # Closed explicitly: an SDK client left to the GC closes itself on a dead event loop.
    async with anthropic.AsyncAnthropic(api_key="test-key", base_url=fake_anthropic.base_url, max_retries=2) as c:
        yield c


def _user(text: str) -> Any:
    return {"role": "user", "content": text}


def _tool_use(tid: str, name: str = "todo_list") -> Any:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": tid, "name": name, "input": {}}]}


async def test_tool_use_conversation_round_trips(
    fake_anthropic: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    messages: list[Any] = [_user("Du bist Anna. Probier die App aus.")]
    replies = []
    for _ in range(5):
        resp = await client.messages.create(model=MODEL, max_tokens=1024, tools=TOOLS, messages=messages)
        replies.append(resp)
        if resp.stop_reason != "tool_use":
            break
        # Hand the SDK's own pydantic blocks back, as the runner will.
        messages.append({"role": "assistant", "content": resp.content})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": b.id, "content": "ok"}
                    for b in resp.content
                    if b.type == "tool_use"
                ],
            }
        )

    assert [r.stop_reason for r in replies] == ["tool_use", "tool_use", "end_turn"]
    names = [[b.name for b in r.content if b.type == "tool_use"] for r in replies[:2]]
    assert names == [["todo_create", "todo_list"], ["note_add", "todo_create"]]  # round-robin
    first_create = replies[0].content[1]
    assert isinstance(first_create, anthropic.types.ToolUseBlock)
    assert first_create.id.startswith("toolu_") and "title" in first_create.input
    final = replies[-1]
    assert final.content[0].type == "text" and final.content[0].text
    assert final.id.startswith("msg_") and final.model == MODEL and final._request_id
    assert final.usage.input_tokens > replies[0].usage.input_tokens > 0 and final.usage.output_tokens > 0
    assert len(fake_anthropic.requests) == 3 and fake_anthropic.requests[0]["tools"][0]["name"] == "todo_create"


async def test_dotted_tool_name_is_refused(client: anthropic.AsyncAnthropic) -> None:
    tool: Any = {"name": "todo.create", "input_schema": {"type": "object"}}
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(model=MODEL, max_tokens=64, tools=[tool], messages=[_user("hi")])
    assert err.value.status_code == 400 and err.value.type == "invalid_request_error"
    assert err.value.api_message == "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"
    assert err.value.request_id and err.value.request_id.startswith("req_")


async def test_unanswered_tool_use_is_refused(client: anthropic.AsyncAnthropic) -> None:
    messages = [_user("hi"), _tool_use("toolu_abc"), _user("weiter")]
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(model=MODEL, max_tokens=64, tools=TOOLS, messages=messages)
    assert err.value.api_message is not None
    assert err.value.api_message.startswith(
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_abc."
    )


async def test_broken_alternation_is_refused(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match='multiple "user" roles in a row'):
        await client.messages.create(model=MODEL, max_tokens=64, messages=[_user("a"), _user("b")])


async def test_forced_tool_choice_fills_schema(client: anthropic.AsyncAnthropic) -> None:
    tool: Any = {"name": "submit_ratings", "input_schema": RATINGS_SCHEMA}
    resp = await client.messages.create(
        model=MODEL,
        max_tokens=512,
        tools=[*TOOLS, tool],
        tool_choice={"type": "tool", "name": "submit_ratings"},
        messages=[_user("Bewerte die Module.")],
    )
    assert resp.stop_reason == "tool_use" and len(resp.content) == 1
    block = resp.content[0]
    assert block.type == "tool_use" and block.name == "submit_ratings"
    jsonschema.validate(block.input, RATINGS_SCHEMA)
    ratings: Any = block.input["ratings"]
    assert [r["module"] for r in ratings] == ["todo", "notes", "calendar"]
    assert all(r["notes"] for r in ratings)  # a model rating its day fills every field, notes too


async def test_rate_limit_is_retried_then_succeeds(
    fake_anthropic: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    # retry-after must be > 0: the SDK ignores 0 and backs off ~0.5 s + ~1 s by itself.
    fake_anthropic.fail_next(status=429, count=2, retry_after=0.01)
    started = time.monotonic()
    resp = await client.messages.create(model=MODEL, max_tokens=64, messages=[_user("hi")])  # max_retries=2
    assert resp.stop_reason == "end_turn"
    assert time.monotonic() - started < 1.0  # the retry-after was honoured, not the backoff
    assert [e.status for e in fake_anthropic.exchanges] == [429, 429, 200]
    assert [e.headers["x-stainless-retry-count"] for e in fake_anthropic.exchanges] == ["0", "1", "2"]
    assert fake_anthropic.exchanges[0].response["error"]["type"] == "rate_limit_error"


async def test_overloaded_exhausts_retries(fake_anthropic: FakeAnthropic, client: anthropic.AsyncAnthropic) -> None:
    fake_anthropic.fail_next(status=529, count=3, retry_after=0.01)
    with pytest.raises(anthropic.OverloadedError) as err:  # subclass of InternalServerError
        await client.messages.create(model=MODEL, max_tokens=64, messages=[_user("hi")])
    assert isinstance(err.value, anthropic.InternalServerError)
    assert err.value.status_code == 529 and err.value.type == "overloaded_error"
    assert len(fake_anthropic.requests) == 3


async def test_more_than_four_cache_breakpoints_are_refused(client: anthropic.AsyncAnthropic) -> None:
    eph: Any = {"type": "ephemeral"}
    system: Any = [{"type": "text", "text": f"Teil {i}", "cache_control": eph} for i in range(3)]
    tools: Any = [{**TOOLS[0], "cache_control": eph}]
    content: Any = [{"type": "text", "text": "hi", "cache_control": eph}]
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(
            model=MODEL, max_tokens=64, system=system, tools=tools, messages=[{"role": "user", "content": content}]
        )
    assert err.value.api_message == "A maximum of 4 blocks with cache_control may be provided. Found 5."


EPH: Any = {"type": "ephemeral"}
# About 4,200 tokens at 4 characters each: above Haiku 4.5's minimum cacheable prefix (4,096).
LONG = "Du bist Anna und planst deinen Tag. " * 470


def _long_system(text: str = LONG, **cache: Any) -> Any:
    return [{"type": "text", "text": text, "cache_control": {**EPH, **cache}}]


class Clock:
    """The fake's cache clock, moved by the test: lifetimes without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clocked() -> AsyncIterator[tuple[FakeAnthropic, Clock, anthropic.AsyncAnthropic]]:
    clock = Clock()
    async with (
        FakeAnthropic(clock=clock) as fake,
        anthropic.AsyncAnthropic(api_key="k", base_url=fake.base_url, max_retries=0) as client,
    ):
        yield fake, clock, client


async def test_prompt_cache_is_written_then_read(client: anthropic.AsyncAnthropic) -> None:
    first = await client.messages.create(model=MODEL, max_tokens=64, system=_long_system(), messages=[_user("a")])
    second = await client.messages.create(model=MODEL, max_tokens=64, system=_long_system(), messages=[_user("b")])
    assert first.usage.cache_creation_input_tokens and not first.usage.cache_read_input_tokens
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    # input_tokens is the uncached part only: the message after the breakpoint.
    assert 0 < second.usage.input_tokens == first.usage.input_tokens < 20


async def test_below_the_models_minimum_nothing_is_cached_silently(client: anthropic.AsyncAnthropic) -> None:
    # About 1,200 tokens: too short for Haiku 4.5 (4,096), long enough for Sonnet 4.5 (1,024).
    system = _long_system(LONG[: 4 * 1200])
    for _ in range(2):
        haiku = await client.messages.create(model=MODEL, max_tokens=64, system=system, messages=[_user("a")])
        assert haiku.usage.cache_creation_input_tokens == haiku.usage.cache_read_input_tokens == 0
        assert haiku.usage.input_tokens > 1100
    with pytest.warns(DeprecationWarning, match="claude-sonnet-4-5"):  # the SDK knows it retires on 2026-11-30
        sonnet = [
            await client.messages.create(model="claude-sonnet-4-5", max_tokens=64, system=system, messages=[_user("a")])
            for _ in range(2)
        ]
    assert sonnet[0].usage.cache_creation_input_tokens > 1100 and sonnet[1].usage.cache_read_input_tokens > 1100


async def test_an_unknown_model_is_refused(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await client.messages.create(model="claude-nonesuch-9", max_tokens=64, messages=[_user("a")])
    assert err.value.api_message == "model: claude-nonesuch-9"


async def test_entries_live_five_minutes_refreshed_by_each_hit_and_an_hour_when_asked(
    clocked: tuple[FakeAnthropic, Clock, anthropic.AsyncAnthropic],
) -> None:
    fake, clock, client = clocked

    async def usage(system: Any) -> anthropic.types.Usage:
        return (await client.messages.create(model=MODEL, max_tokens=64, system=system, messages=[_user("a")])).usage

    assert (await usage(_long_system())).cache_creation_input_tokens
    clock.now += 299
    assert (await usage(_long_system())).cache_read_input_tokens  # the hit refreshes the lifetime...
    clock.now += 299
    assert (await usage(_long_system())).cache_read_input_tokens  # ...so it is still there 598 s after the write
    clock.now += 301
    expired = await usage(_long_system())
    assert expired.cache_read_input_tokens == 0 and expired.cache_creation_input_tokens
    assert [w.read for w in fake.cache.writes] == [True, False]

    other = _long_system(LONG + "Ein Tag mit einer Stunde Cache.", ttl="1h")
    hour = await usage(other)
    assert hour.cache_creation is not None and hour.cache_creation.ephemeral_1h_input_tokens > 4096
    assert hour.cache_creation.ephemeral_5m_input_tokens == 0
    clock.now += 3000
    assert (await usage(other)).cache_read_input_tokens == hour.cache_creation_input_tokens


async def test_an_entry_is_usable_only_once_the_response_that_wrote_it_has_started(
    fake_anthropic: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    # The first request's model does not answer until the second request has arrived: both find no entry.
    arrived = asyncio.Event()

    async def brain(body: dict[str, Any]) -> list[dict[str, Any]]:
        if len(fake_anthropic.requests) < 2:
            await arrived.wait()
        arrived.set()
        return [{"type": "text", "text": "Guten Morgen."}]

    fake_anthropic.brain = brain

    def ask() -> Any:
        return client.messages.create(model=MODEL, max_tokens=64, system=_long_system(), messages=[_user("a")])

    together = await asyncio.gather(ask(), ask())
    assert [r.usage.cache_creation_input_tokens > 4096 for r in together] == [True, True]
    assert [r.usage.cache_read_input_tokens for r in together] == [0, 0]
    after = await ask()
    assert after.usage.cache_read_input_tokens > 4096 and after.usage.cache_creation_input_tokens == 0
    # Both paid the same write; one of the two entries was replaced before anyone read it.
    assert sorted(w.read for w in fake_anthropic.cache.writes) == [False, True]


async def test_the_prefix_is_the_bytes_sent_in_order_tools_then_system_then_messages(
    client: anthropic.AsyncAnthropic,
) -> None:
    # The tool list alone is long enough to cache; its breakpoint sits on the last tool.
    schema = {"type": "object", "properties": {"text": {"type": "string", "description": LONG}}}
    tools: Any = [{**TOOLS[1]}, {"name": "note_add", "description": "Notiz", "input_schema": schema}]
    tools[-1]["cache_control"] = EPH

    async def usage(tools: Any, system: str) -> anthropic.types.Usage:
        response = await client.messages.create(
            model=MODEL, max_tokens=64, tools=tools, system=system, messages=[_user("a")]
        )
        return response.usage

    written = (await usage(tools, "Anna")).cache_creation_input_tokens
    assert written > 4096
    assert (await usage(tools, "Bert")).cache_read_input_tokens == written  # the system comes after: shared
    reordered_keys = {"properties": schema["properties"], "type": "object"}
    reordered: Any = [tools[0], {**tools[1], "input_schema": reordered_keys}]
    assert (await usage(reordered, "Anna")).cache_read_input_tokens == 0  # same schema, keys in another order
    swapped: Any = [{**tools[1], "cache_control": None}, {**tools[0], "cache_control": EPH}]
    assert (await usage(swapped, "Anna")).cache_read_input_tokens == 0  # same tools, another order


async def test_a_breakpoint_finds_an_entry_up_to_twenty_blocks_back_and_tool_choice_counts_for_messages(
    client: anthropic.AsyncAnthropic,
) -> None:
    def conversation(turns: int) -> Any:
        messages: Any = [{"role": "user", "content": [{"type": "text", "text": LONG}]}]
        for k in range(turns):
            messages += [
                {"role": "assistant", "content": [{"type": "text", "text": f"Antwort {k}"}]},
                {"role": "user", "content": [{"type": "text", "text": f"Frage {k}"}]},
            ]
        messages[-1]["content"][-1]["cache_control"] = EPH
        return messages

    async def usage(messages: Any, **extra: Any) -> anthropic.types.Usage:
        response = await client.messages.create(model=MODEL, max_tokens=64, tools=TOOLS, messages=messages, **extra)
        return response.usage

    first = await usage(conversation(0))
    assert first.cache_creation_input_tokens > 4096
    # The entry sits on block 3 (after 3 tools): a breakpoint 20 blocks later (block 23) misses it,
    # one 18 blocks later (block 21) finds it.
    assert (await usage(conversation(10))).cache_read_input_tokens == 0
    assert (await usage(conversation(9))).cache_read_input_tokens == first.cache_creation_input_tokens
    # A forced tool choice is another message prefix.
    assert (await usage(conversation(0), tool_choice={"type": "any"})).cache_read_input_tokens == 0


async def test_brain_can_be_replaced(fake_anthropic: FakeAnthropic, client: anthropic.AsyncAnthropic) -> None:
    # A brain may return anything, including a tool the request never offered.
    async def brain(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        return [{"type": "tool_use", "name": "no_such_tool", "input": {"x": 1}}], "tool_use"

    fake_anthropic.brain = brain
    resp = await client.messages.create(model=MODEL, max_tokens=64, tools=TOOLS, messages=[_user("hi")])
    assert resp.content[0].type == "tool_use" and resp.content[0].name == "no_such_tool"
    fake_anthropic.brain = lambda body: [{"type": "text", "text": "{rating: kaputt"}]
    resp = await client.messages.create(model=MODEL, max_tokens=64, messages=[_user("hi")])
    assert resp.stop_reason == "end_turn" and resp.content[0].type == "text"


BASE: dict[str, Any] = {"model": MODEL, "max_tokens": 64}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"max_tokens": 5, "messages": [_user("x")]}, "model: Field required"),
        ({**BASE, "max_tokens": 0, "messages": [_user("x")]}, "max_tokens: Input should be greater than or equal to 1"),
        ({**BASE, "messages": []}, "messages: at least one message is required"),
        ({**BASE, "messages": [{"role": "assistant", "content": "x"}]}, 'first message must use the "user" role'),
        ({**BASE, "system": [{"type": "image"}], "messages": [_user("x")]}, "system.0.type: Input should be 'text'"),
        ({**BASE, "tools": [TOOLS[1], TOOLS[1]], "messages": [_user("x")]}, "Tool names must be unique"),
        (
            {**BASE, "tools": [{"name": "t", "input_schema": {"type": "array"}}], "messages": [_user("x")]},
            "tools.0.custom.input_schema.type: Input should be 'object'",
        ),
        (
            {**BASE, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}, "messages": [_user("x")]},
            "tool 'nope' is not among the provided tools",
        ),
        ({**BASE, "tools": TOOLS, "tool_choice": {"type": "sometimes"}, "messages": [_user("x")]}, "tool_choice.type"),
        ({**BASE, "messages": [_user("x"), _tool_use("toolu_1")]}, "toolu_1"),  # prefill with tool_use
        ({**BASE, "messages": [_user("x"), {"role": "assistant", "content": "Na gut "}]}, "trailing whitespace"),
        (
            {
                **BASE,
                "messages": [
                    _user("x"),
                    _tool_use("toolu_1"),
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hier"},
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"},
                        ],
                    },
                ],
            },
            "messages.2.content.1: `tool_result` blocks must come before any other content",
        ),
        (
            {
                **BASE,
                "messages": [
                    _user("x"),
                    _tool_use("toolu_1"),
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1"},
                            {"type": "tool_result", "tool_use_id": "toolu_2"},
                        ],
                    },
                ],
            },
            "unexpected `tool_use_id` found in `tool_result` blocks: toolu_2",
        ),
        (
            {
                **BASE,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "x", "cache_control": {"type": "persistent"}}],
                    }
                ],
            },
            "messages.0.content.0.cache_control.type: Input should be 'ephemeral'",
        ),
        ({**BASE, "temperature": 0.5, "messages": [_user("x")]}, "temperature: Extra inputs are not permitted"),
        ({**BASE, "messages": [_user("x"), {"role": "system", "content": "y"}]}, "'system' messages"),
    ],
)
async def test_validation_reasons(fake_anthropic: FakeAnthropic, body: dict[str, Any], reason: str) -> None:
    async with httpx.AsyncClient(base_url=fake_anthropic.base_url) as http:
        r = await http.post("/v1/messages", json=body, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert reason in r.json()["error"]["message"]


async def test_headers_are_required(fake_anthropic: FakeAnthropic) -> None:
    body = {**BASE, "messages": [_user("x")]}
    async with httpx.AsyncClient(base_url=fake_anthropic.base_url) as http:
        no_key = await http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
        no_version = await http.post("/v1/messages", json=body, headers={"authorization": "Bearer k"})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert no_version.status_code == 400 and "anthropic-version" in no_version.json()["error"]["message"]


def test_the_default_brain_fills_inputs_its_schemas_accept() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "number", "minimum": 0, "maximum": 1},
            "k": {"type": "integer", "minimum": 7},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "kind": {"type": ["string", "null"], "enum": ["a", "b"]},
            "short": {"type": "string", "maxLength": 3},
        },
        "required": ["n", "k", "tags", "kind", "short"],
    }
    rating = {
        "type": "object",
        "properties": {
            "ratings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"module": {"enum": ["todo", "notes"]}, "rating": {"type": "integer"}},
                    "required": ["module", "rating"],
                },
            }
        },
        "required": ["ratings"],
    }
    tools = [{"name": "t_x", "input_schema": schema}, {"name": "rate", "input_schema": rating}]
    body = {"messages": [_user("x")], "tools": tools, "tool_choice": {"type": "tool", "name": "t_x"}}
    blocks, _ = default_brain(body)
    jsonschema.validate(blocks[0]["input"], schema)
    assert blocks[0]["input"] == default_brain(body)[0][0]["input"]  # the same request, the same input
    blocks, _ = default_brain({**body, "tool_choice": {"type": "tool", "name": "rate"}})
    jsonschema.validate(blocks[0]["input"], rating)
    assert [r["module"] for r in blocks[0]["input"]["ratings"]] == ["todo", "notes"]  # one rating per module


async def test_wrong_key_is_an_authentication_error() -> None:
    async with (
        FakeAnthropic(api_key="right") as fake,
        anthropic.AsyncAnthropic(api_key="wrong", base_url=fake.base_url) as client,
    ):
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model=MODEL, max_tokens=8, messages=[_user("x")])
    assert len(fake.requests) == 1  # 401 is not retried


async def test_max_tokens_cuts_the_reply(client: anthropic.AsyncAnthropic) -> None:
    resp = await client.messages.create(model=MODEL, max_tokens=3, messages=[_user("Erzähl mal.")])
    assert resp.stop_reason == "max_tokens" and resp.usage.output_tokens == 3
    assert resp.content[0].type == "text" and len(resp.content[0].text) <= 12
