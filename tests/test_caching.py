"""Caching that hits: the runner's requests against the stand-in that caches as the Messages API does.

Real ticks (the sandbox's 33 real tools, the real anthropic SDK over loopback, no mocks): the
shared tool prefix is written once per burst and read by every other tick, nothing written
goes unread, the conversation reads its cache, and the cost the runner counts (per tick and in
`persona_llm_cost_usd_total`) is the usage the stand-in reported, priced.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import anthropic
from anthropic.types import Message, Usage
from conftest import Mana, open_runner
from fake_anthropic import FakeAnthropic, asked_tool, default_brain

from runner import metrics
from runner.agent.loop import Entry, Provider, RatingReply, ToolDef, Turn
from runner.agent.providers.anthropic import Warmup, api_names, tool_params
from runner.cost import DEFAULT_PRICES_FILE, cost_usd, load_prices
from runner.dispatch import run_once
from runner.persona import DuePersona
from runner.runtime import open_runtime, provider_factory

MODEL = "claude-haiku-4-5"


async def _thinking(body: dict[str, Any]) -> Any:
    # A model takes a moment to answer, the first turn longest (the whole prompt is new to it): the
    # ticks of a burst all reach the model while the first write is under way, as against the real API.
    await asyncio.sleep(0.3 if len(body["messages"]) == 1 else 0.02)
    return default_brain(body)


class _Counting:
    """The runner's own provider, with what each of its answers cost summed per tick (system prompt)."""

    def __init__(self, inner: Provider, per_tick: dict[str, float]) -> None:
        self._inner = inner
        self._per_tick = per_tick

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        turn = await self._inner.next_turn(system, tools, transcript)
        self._per_tick[system] += turn.usage.cost_usd
        return turn

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        reply = await self._inner.rate(system, tools, transcript, prompt, modules)
        self._per_tick[system] += reply.usage.cost_usd
        return reply


def _ok(fake: FakeAnthropic) -> list[Any]:
    return [x for x in fake.exchanges if x.status == 200]


def _cost_counted() -> float:
    return metrics.REGISTRY.get_sample_value("persona_llm_cost_usd_total", {"model": MODEL}) or 0.0


async def test_a_burst_writes_the_shared_prefix_once_and_every_write_is_read(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.brain = _thinking
    settings = mana.settings(
        tmp_path,
        llm_provider="anthropic",
        anthropic_model=MODEL,
        anthropic_base_url=fake_anthropic.base_url,
        anthropic_api_key="k-test",
        persona_concurrency=10,
    )
    counted_before = _cost_counted()
    per_tick: dict[str, float] = defaultdict(float)  # the runner's cost of each tick, by its system prompt
    async with provider_factory(settings) as chosen:

        def counting(persona: DuePersona, tick: str) -> Provider:
            return _Counting(chosen(persona, tick), per_tick)

        async with open_runtime(settings, counting) as runtime:
            report = await run_once(runtime)
    assert len(report.ticks) == 10 and report.backlog == 0
    ok = _ok(fake_anthropic)

    # One tool list, byte for byte, in every request of every tick and persona.
    assert len({json.dumps(x.body["tools"]) for x in ok}) == 1
    assert len({x.body["system"][0]["text"] for x in ok}) == 10  # ten personas, ten system prompts

    writes = fake_anthropic.cache.writes
    tools_writes = [w for w in writes if w.level == "tools"]
    assert len(tools_writes) == 1 and tools_writes[0].tokens > 4096  # the 33 tools alone are cacheable
    firsts = [x for x in ok if len(x.body["messages"]) == 1]
    assert len(firsts) == 10
    assert sorted(x.response["usage"]["cache_read_input_tokens"] >= tools_writes[0].tokens for x in firsts) == [
        False,
        *[True] * 9,
    ]
    assert [w for w in writes if not w.read] == []

    ratings = [x for x in ok if asked_tool(x.body)]
    assert len(ratings) == 10
    assert all(x.response["usage"]["cache_creation_input_tokens"] == 0 for x in ratings)
    assert all(x.response["usage"]["cache_read_input_tokens"] > tools_writes[0].tokens for x in ratings)

    later = [x.response["usage"] for x in ok if len(x.body["messages"]) > 1]
    read = sum(u["cache_read_input_tokens"] for u in later)
    total = sum(u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] for u in later)
    assert read / total >= 0.95, read / total

    # What the runner counted, per tick and in the metric, is what the stand-in reported, priced.
    price = load_prices(DEFAULT_PRICES_FILE).models[MODEL]
    reported: dict[str, float] = defaultdict(float)
    for x in ok:
        reported[x.body["system"][0]["text"]] += cost_usd(Usage.model_validate(x.response["usage"]), price)
    assert reported.keys() == per_tick.keys() and len(reported) == 10
    assert all(abs(per_tick[tick] - cost) < 1e-12 for tick, cost in reported.items())
    total = sum(reported.values())
    assert total > 0 and abs((_cost_counted() - counted_before) - total) < 1e-12


async def test_another_tool_order_or_schema_text_misses_the_shared_prefix(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """The identity asserted above is what the cache keys on: any change to it is a miss."""
    settings = mana.settings(
        tmp_path, llm_provider="anthropic", anthropic_base_url=fake_anthropic.base_url, anthropic_api_key="k-test"
    )
    async with open_runner(settings) as runtime:
        await run_once(runtime)
    tools = _ok(fake_anthropic)[0].body["tools"]
    shared = next(w.tokens for w in fake_anthropic.cache.writes if w.level == "tools")

    async with anthropic.AsyncAnthropic(api_key="k", base_url=fake_anthropic.base_url) as client:

        async def read(tools: Any) -> int:
            message: Message = await client.messages.create(
                model=MODEL, max_tokens=64, tools=tools, messages=[{"role": "user", "content": "Hallo"}]
            )
            return message.usage.cache_read_input_tokens or 0

        assert await read(tools) == shared
        assert await read([tools[1], tools[0], *tools[2:]]) == 0
        edited = json.loads(json.dumps(tools))
        edited[0]["input_schema"]["description"] = "changed"
        assert await read(edited) == 0


def test_the_tool_list_is_the_same_bytes_in_any_served_order_and_key_order() -> None:
    served = [
        ToolDef("todo.create", "Aufgabe anlegen", {"type": "object", "properties": {"title": {"type": "string"}}}),
        ToolDef("mood.log", "Stimmung", {"properties": {"level": {"maximum": 5, "type": "integer"}}, "type": "object"}),
        ToolDef("journal.add", "Tagebuch", {"type": "object", "required": ["text"], "properties": {}}),
    ]
    shuffled = [
        ToolDef(t.name, t.description, dict(reversed(list(t.input_schema.items()))))
        for t in random.Random(7).sample(served, len(served))
    ]
    one = tool_params(served, api_names([t.name for t in served]))
    other = tool_params(shuffled, api_names([t.name for t in shuffled]))
    assert json.dumps(one) == json.dumps(other)
    assert [t["name"] for t in one] == ["journal_add", "mood_log", "todo_create", "submit_ratings"]
    assert [bool(t.get("cache_control")) for t in one] == [False, False, False, True]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_cold_prefix_is_sent_alone_then_requests_go_together_until_it_expires() -> None:
    clock = _Clock()
    warmup = Warmup(ttl_s=300, clock=clock)
    running = 0
    most = 0
    release = asyncio.Event()

    async def request() -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return None

    async def burst() -> int:
        nonlocal most
        most = 0
        release.clear()
        tasks = [asyncio.create_task(warmup.send("tools", request)) for _ in range(4)]
        while not running:
            await asyncio.sleep(0)
        for _ in range(10):  # every task that may start does so now
            await asyncio.sleep(0)
        started_together = most
        release.set()
        await asyncio.gather(*tasks)
        return started_together

    assert await burst() == 1  # cold: one goes first, the others wait for its answer
    clock.now += 299
    assert await burst() == 4  # warm: all at once
    clock.now += 301
    assert await burst() == 1  # expired: alone again


async def test_a_rating_handed_in_during_the_day_is_no_tool_call_and_the_rating_turn_asks_again(
    mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    # The rating tool is declared all day (one shared prefix); a model may reach for it early.
    def eager(body: dict[str, Any]) -> Any:
        if len(body["messages"]) == 1:
            rating = {"type": "tool_use", "name": "submit_ratings", "input": {"ratings": []}}
            todo = {"type": "tool_use", "name": "todo_list", "input": {}}
            return [rating, todo], "tool_use"
        return default_brain(body)

    fake_anthropic.brain = eager
    persona = await mana.add_persona("eager")
    settings = mana.settings(
        tmp_path, llm_provider="anthropic", anthropic_base_url=fake_anthropic.base_url, anthropic_api_key="k-test"
    )
    async with open_runner(settings) as runtime:
        await run_once(runtime)
    rows = [a["toolName"] for a in await mana.get("actions") if a["personaId"] == persona["userId"]]
    assert rows and "submit_ratings" not in rows and rows[0] == "todo.list"
    feedback = [f["module"] for f in await mana.get("feedback") if f["personaId"] == persona["userId"]]
    assert "todo" in feedback and "__parse" not in feedback
