"""Claude through the official SDK's Messages API, with requests shaped for the prompt cache.

The SDK already retries 429/5xx/529 with the server's retry-after (`max_retries` on the
client, set from settings); nothing here loops on errors a second time.

Caching (order tools → system → messages; a change invalidates everything after it):
- the tool list is the prefix every persona shares: sorted by API name, schemas serialized with
  sorted keys, the rating tool always last with the same schema, one breakpoint after it;
- the persona's system prompt carries the second breakpoint;
- the conversation carries the third on its newest message and the fourth on the message that
  was newest in the previous request, so the previous write is read exactly;
- the rating request is the day's request plus the instruction, same tools, system and
  tool_choice, so it reads the conversation the last turn wrote and writes nothing itself.
A burst of ticks on a cold cache sends one first request and lets the others wait for it
(`Warmup`): the shared prefix is written once, not once per tick.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from anthropic import APIConnectionError, AsyncAnthropic, InternalServerError, RateLimitError
from anthropic.types import CacheControlEphemeralParam, Message, MessageParam, TextBlockParam, ToolParam
from anthropic.types import Usage as ApiUsage

from runner.agent.loop import Entry, ModelUnavailable, RatingReply, Results, ToolCall, ToolDef, Turn, Usage
from runner.agent.prompts import Language, start_message
from runner.agent.rating import RATING_TOOL, rating_schema
from runner.cost import Price, cost_usd
from runner.persona import module_of

_LEGAL = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ILLEGAL_CHAR = re.compile(r"[^a-zA-Z0-9_-]")
_CACHE: CacheControlEphemeralParam = {"type": "ephemeral"}
# The default cache lifetime, refreshed by every request that reads the entry.
CACHE_TTL_S = 300.0


def api_names(mcp_names: list[str], reserved: frozenset[str] = frozenset({RATING_TOOL})) -> dict[str, str]:
    """MCP name -> a name the API accepts (`^[a-zA-Z0-9_-]{1,64}$`), unique, stable for the same list.

    Collision-free for any input, crafted names included (issue 7): names already legal keep
    themselves; `todo.create` becomes `todo_create`; a name whose plain form is taken (by a
    legal name, an earlier mapping or a `reserved` one such as the rating tool) gets a short
    hash of the original, re-hashed until it is free. Sorting first makes the result
    independent of the order the server lists its tools in.
    """
    names = sorted(set(mcp_names))
    mapping = {name: name for name in names if _LEGAL.fullmatch(name) and name not in reserved}
    taken = set(mapping) | reserved
    for name in names:
        if name in mapping:
            continue
        stem = _ILLEGAL_CHAR.sub("_", name)
        candidate = stem[:64] or "tool"
        salt = 0
        while candidate in taken:
            digest = hashlib.sha256(f"{salt}:{name}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
            candidate = f"{stem[:55]}_{digest}"
            salt += 1
        mapping[name] = candidate
        taken.add(candidate)
    return mapping


def _system(text: str) -> list[TextBlockParam]:
    return [{"type": "text", "text": text, "cache_control": _CACHE}]


def _usage(usage: ApiUsage, model: str, price: Price) -> Usage:
    return Usage(
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
        cache_creation_1h_tokens=(usage.cache_creation.ephemeral_1h_input_tokens or 0) if usage.cache_creation else 0,
        cache_read_input_tokens=usage.cache_read_input_tokens or 0,
        cost_usd=cost_usd(usage, price),
        model=model,
    )


def tool_params(tools: list[ToolDef], to_api: dict[str, str]) -> list[ToolParam]:
    """The tool list as the API gets it, byte-identical for the same tools in any served order.

    Sorted by API name and with every schema's keys sorted, so neither the server's listing
    order nor its key order can change the shared prefix. The rating tool comes last in every
    request, day and rating alike, so the rating request reuses the day's cached prefix; its
    enum lists every module offered (the same for every persona) and the rating prompt names
    the ones used today.
    """
    specs: list[ToolParam] = [
        {
            "name": to_api[t.name],
            "description": t.description[:1024],
            "input_schema": json.loads(json.dumps(t.input_schema, sort_keys=True)),
        }
        for t in sorted(tools, key=lambda t: to_api[t.name])
    ]
    modules = sorted({module_of(t.name) for t in tools})
    specs.append(
        {
            "name": RATING_TOOL,
            "description": "Only when you are asked to rate your day: submit your ratings of the modules you used.",
            "input_schema": rating_schema(modules),
            "cache_control": _CACHE,
        }
    )
    return specs


class Warmup:
    """Which shared prefixes are in the cache now, so a burst of ticks writes each one once.

    An entry exists only once the response that wrote it has started: N ticks that start
    together on a cold cache would each pay the write. So while a prefix is cold, one request
    carrying it goes alone (under the lock) and the others wait for its answer, then read.
    Every answered request refreshes the entry's lifetime, as a hit does on the server; the
    time is taken when the request leaves, so the estimate errs on the cold side. One per
    process, shared by every tick's provider.
    """

    def __init__(self, ttl_s: float = CACHE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._warm_until: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def send(self, prefix: str, request: Callable[[], Awaitable[Message]]) -> Message:
        """Send `request`, whose cacheable prefix hashes to `prefix`, alone while that prefix is cold."""
        if not self._warm(prefix):
            async with self._lock:
                if not self._warm(prefix):
                    return await self._sent(prefix, request)
        return await self._sent(prefix, request)

    def _warm(self, prefix: str) -> bool:
        return self._warm_until.get(prefix, 0.0) > self._clock()

    async def _sent(self, prefix: str, request: Callable[[], Awaitable[Message]]) -> Message:
        sent_at = self._clock()
        message = await request()
        self._warm_until[prefix] = sent_at + self._ttl_s
        return message


class AnthropicProvider:
    def __init__(
        self, client: AsyncAnthropic, model: str, max_tokens: int, language: Language, price: Price, warmup: Warmup
    ) -> None:
        self._client = client
        self._model = model
        self._max_tokens = max_tokens
        self._language = language
        self._price = price
        self._warmup = warmup
        self._to_api: dict[str, str] = {}
        self._from_api: dict[str, str] = {}
        self._tools: list[ToolParam] = []
        self._tools_key = ""

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        response = await self._create(system, tools, self._messages(transcript))
        text = " ".join(b.text for b in response.content if b.type == "text").strip()
        # The rating tool is declared all day to keep the shared prefix one; a rating handed in
        # before it was asked for is no call to Mana, and the rating turn asks again.
        calls = [
            ToolCall(id=b.id, name=self._from_api.get(b.name, b.name), input=b.input)
            for b in response.content
            if b.type == "tool_use" and b.name != RATING_TOOL
        ]
        return Turn(text=text, calls=calls, usage=_usage(response.usage, self._model, self._price))

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        response = await self._create(system, tools, self._messages(transcript, ask=prompt))
        usage = _usage(response.usage, self._model, self._price)
        for block in response.content:
            if block.type == "tool_use" and block.name == RATING_TOOL:
                return RatingReply(payload=block.input, raw=json.dumps(block.input, ensure_ascii=False), usage=usage)
        raw = " ".join(b.text for b in response.content if b.type == "text")
        return RatingReply(payload=None, raw=raw, usage=usage)

    async def _create(self, system: str, tools: list[ToolDef], messages: list[MessageParam]) -> Message:
        if not self._tools:
            self._to_api = api_names([t.name for t in tools])
            self._from_api = {v: k for k, v in self._to_api.items()}
            self._tools = tool_params(tools, self._to_api)
            self._tools_key = hashlib.sha256(json.dumps([self._model, self._tools]).encode()).hexdigest()

        async def request() -> Message:
            return await self._client.messages.create(
                model=self._model,
                max_tokens=self._max_tokens,
                system=_system(system),
                tools=self._tools,
                messages=messages,
            )

        try:
            return await self._warmup.send(self._tools_key, request)
        except (APIConnectionError, RateLimitError, InternalServerError) as exc:
            # The SDK has already retried these; what is left is an outage, not a bad request.
            raise ModelUnavailable(f"model unavailable: {type(exc).__name__}") from exc

    def _messages(self, transcript: list[Entry], ask: str | None = None) -> list[MessageParam]:
        """The conversation; with `ask`, the rating instruction after it (and no write of its own)."""
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "text", "text": start_message(self._language)}]}
        ]
        for entry in transcript:
            if isinstance(entry, Results):
                messages.append(
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": r.call_id, "content": r.text, "is_error": r.is_error}
                            for r in entry.results
                        ],
                    }
                )
                continue
            content: list[dict[str, Any]] = [{"type": "text", "text": entry.text}] if entry.text else []
            content += [
                {"type": "tool_use", "id": c.id, "name": self._to_api.get(c.name, c.name), "input": c.input}
                for c in entry.calls
            ]
            messages.append({"role": "assistant", "content": content or [{"type": "text", "text": "…"}]})
        if ask is not None:
            text = {"type": "text", "text": ask}
            if messages[-1]["role"] == "user":
                messages[-1]["content"].append(text)  # after the tool_results: roles must alternate
            else:
                messages.append({"role": "user", "content": [text]})
        else:
            # The growing conversation is the prefix the next turn reads (the rating's never is).
            messages[-1]["content"][-1]["cache_control"] = _CACHE
        # Each request adds the model's turn and the user's answer to the one before: the message
        # that was newest then is third from the end now, and its entry is read exactly.
        if len(messages) >= 3:
            messages[-3]["content"][-1]["cache_control"] = _CACHE
        # Plain dicts in the Messages API's shape; the SDK's TypedDicts are too narrow to build in place.
        return cast("list[MessageParam]", messages)
