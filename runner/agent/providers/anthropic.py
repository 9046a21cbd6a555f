"""Claude through the official SDK's Messages API.

The SDK already retries 429/5xx/529 with the server's retry-after (`max_retries` on the
client, set from settings); nothing here loops on errors a second time.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, cast

from anthropic import APIConnectionError, AsyncAnthropic, InternalServerError, Omit, RateLimitError, omit
from anthropic.types import (
    CacheControlEphemeralParam,
    Message,
    MessageParam,
    TextBlockParam,
    ToolChoiceParam,
    ToolParam,
)

from runner.agent.loop import Entry, ModelUnavailable, RatingReply, Results, ToolCall, ToolDef, Turn, Usage
from runner.agent.prompts import Language, start_message
from runner.agent.rating import RATING_TOOL, rating_schema

_LEGAL = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ILLEGAL_CHAR = re.compile(r"[^a-zA-Z0-9_-]")
_CACHE: CacheControlEphemeralParam = {"type": "ephemeral"}


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


def _usage(usage: Any) -> Usage:
    return Usage(
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        cache_creation_input_tokens=getattr(usage, "cache_creation_input_tokens", None) or 0,
        cache_read_input_tokens=getattr(usage, "cache_read_input_tokens", None) or 0,
    )


class AnthropicProvider:
    def __init__(self, client: AsyncAnthropic, model: str, max_tokens: int, language: Language) -> None:
        self._client = client
        self._model = model
        self._max_tokens = max_tokens
        self._language = language
        self._to_api: dict[str, str] = {}
        self._from_api: dict[str, str] = {}

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        response = await self._create(
            system=_system(system), tools=self._tools(tools), messages=self._messages(transcript)
        )
        text = " ".join(b.text for b in response.content if b.type == "text").strip()
        calls = [
            ToolCall(id=b.id, name=self._from_api.get(b.name, b.name), input=b.input)
            for b in response.content
            if b.type == "tool_use"
        ]
        return Turn(text=text, calls=calls, usage=_usage(response.usage))

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        messages = self._messages(transcript, cache_last=False)
        ask: TextBlockParam = {"type": "text", "text": prompt}
        last = messages[-1]
        if last["role"] == "user" and isinstance(last["content"], list):
            last["content"].append(ask)  # after the tool_results: roles must alternate
        else:
            messages.append({"role": "user", "content": [ask]})
        rating_tool: ToolParam = {
            "name": RATING_TOOL,
            "description": "Submit your ratings of the modules you used today.",
            "input_schema": rating_schema(modules),
        }
        response = await self._create(
            system=_system(system),
            # The history holds tool_use blocks, so the tools stay declared next to the rating tool.
            tools=[*self._tools(tools), rating_tool],
            tool_choice={"type": "tool", "name": RATING_TOOL},
            messages=messages,
        )
        for block in response.content:
            if block.type == "tool_use" and block.name == RATING_TOOL:
                return RatingReply(
                    payload=block.input, raw=json.dumps(block.input, ensure_ascii=False), usage=_usage(response.usage)
                )
        raw = " ".join(b.text for b in response.content if b.type == "text")
        return RatingReply(payload=None, raw=raw, usage=_usage(response.usage))

    async def _create(
        self,
        *,
        system: list[TextBlockParam],
        tools: list[ToolParam],
        messages: list[MessageParam],
        tool_choice: ToolChoiceParam | Omit = omit,
    ) -> Message:
        try:
            return await self._client.messages.create(
                model=self._model,
                max_tokens=self._max_tokens,
                system=system,
                tools=tools,
                messages=messages,
                tool_choice=tool_choice,
            )
        except (APIConnectionError, RateLimitError, InternalServerError) as exc:
            # The SDK has already retried these; what is left is an outage, not a bad request.
            raise ModelUnavailable(f"model unavailable: {type(exc).__name__}") from exc

    def _tools(self, tools: list[ToolDef]) -> list[ToolParam]:
        if not self._to_api:
            self._to_api = api_names([t.name for t in tools])
            self._from_api = {v: k for k, v in self._to_api.items()}
        specs: list[ToolParam] = [
            {"name": self._to_api[t.name], "description": t.description[:1024], "input_schema": t.input_schema}
            for t in tools
        ]
        if specs:
            specs[-1]["cache_control"] = _CACHE
        return specs

    def _messages(self, transcript: list[Entry], cache_last: bool = True) -> list[MessageParam]:
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
        if cache_last:
            # The growing conversation is a cacheable prefix for the next turn.
            messages[-1]["content"][-1]["cache_control"] = _CACHE
        # Plain dicts in the Messages API's shape; the SDK's TypedDicts are too narrow to build in place.
        return cast("list[MessageParam]", messages)
