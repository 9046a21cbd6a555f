"""A local stand-in for the Anthropic Messages API, for tests that drive the real SDK.

Why: the runner must be tested without Anthropic's servers, but a mock at the SDK level
would hide exactly the mistakes that break in production (dotted MCP tool names, a
tool_use left unanswered, roles out of order, too many cache breakpoints, retries).
So this serves ``POST /v1/messages`` over real HTTP, point the real ``anthropic`` client
at it with ``base_url=fake.base_url``, and it refuses bad requests with the same status,
error type and (close to) the same message the real API uses.

Usage::

    async with FakeAnthropic() as fake:
        client = anthropic.AsyncAnthropic(api_key="k", base_url=fake.base_url, max_retries=2)
        fake.fail_next(status=429, count=2, retry_after=0.01)
        fake.brain = my_brain       # (body) -> blocks | (blocks, stop_reason), may be async
        fake.requests               # every received JSON body, in order (failed ones too)

Prompt caching follows the rules in /work/shared/llm-facts.md (see ``PromptCache``): a
prefix per breakpoint in the order tools → system → messages, identical byte for byte (key
order included), at most 4 breakpoints, each one looking back 20 blocks for an entry; the
model's minimum cacheable length (below it nothing is cached, silently); a 5-minute (or 1-hour)
lifetime refreshed by each hit; an entry usable only once the response that wrote it has
started (here: once the brain has answered, so requests that arrive meanwhile pay the write
too); the usage counters as the API reports them. Tokens are estimated at 4 characters each.
``fake.cache.writes`` lists every entry written, who paid, and whether anything read it.

Facts checked against anthropic 2.12.0 (see /work/shared/sdk-notes.md):
- the SDK sends ``Authorization: Bearer <key>`` and ``anthropic-version``;
- it retries 408/409/429/5xx (529 included); a ``retry-after`` > 0 is slept exactly,
  but ``retry-after: 0`` is ignored and falls back to exponential backoff with jitter
  (about 0.5 s, then 1 s), so fast tests should pass e.g. ``retry_after=0.01``;
- 529 surfaces as ``anthropic.OverloadedError`` (a subclass of ``InternalServerError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import math
import random
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from runner.agent.arguments import IdPool, generate

Block = dict[str, Any]
BrainReply = list[Block] | tuple[list[Block], str]
Brain = Callable[[dict[str, Any]], BrainReply | Awaitable[BrainReply]]

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_USE_ID_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
MAX_CACHE_BREAKPOINTS = 4
# Each breakpoint finds an entry at its own block or up to 19 blocks before it.
CACHE_LOOKBACK_BLOCKS = 20
CACHE_TTL_S = {"5m": 300.0, "1h": 3600.0}
CHARS_PER_TOKEN = 4
# The models the fake serves, with the shortest prefix each will cache (llm-facts.md); any
# other model is refused as the real API refuses a model it does not know.
MIN_CACHEABLE_TOKENS = {
    "claude-haiku-4-5": 4096,
    "claude-haiku-4-5-20251001": 4096,
    "claude-sonnet-4-5": 1024,
    "claude-sonnet-4-5-20250929": 1024,
    "claude-opus-4-5": 4096,
    "claude-opus-4-6": 4096,
}

# Body fields the Messages API accepts (mirrors the body anthropic 2.12.0's
# messages.create() builds). Anything else is refused, as the real API does.
ALLOWED_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "metadata",
        "output_config",
        "service_tier",
        "speed",
        "stop_sequences",
        "stream",
        "thinking",
    }
)
USER_BLOCKS = frozenset({"text", "image", "document", "search_result", "tool_result"})
ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

GERMAN_LINES = (
    "Ich habe heute meine Aufgaben sortiert.",
    "Das hat gut geklappt, ich schaue morgen noch einmal rein.",
    "Mir ist aufgefallen, dass die Übersicht etwas unübersichtlich ist.",
    "Alles erledigt, danke!",
)


class InvalidRequest(Exception):
    """A request the real API would refuse with 400 invalid_request_error."""


@dataclass
class Exchange:
    """One request as the fake saw it, and what it answered."""

    body: Any  # parsed JSON, or None if the body was not JSON
    headers: dict[str, str]
    status: int
    response: dict[str, Any]


@dataclass
class _Failure:
    status: int
    retry_after: float | None
    error_type: str
    message: str


# --------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_cache_control(cc: Any, where: str) -> None:
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise InvalidRequest(f"{where}.cache_control.type: Input should be 'ephemeral'")
    extra = set(cc) - {"type", "ttl"}
    if extra:
        raise InvalidRequest(f"{where}.cache_control.{sorted(extra)[0]}: Extra inputs are not permitted")
    if "ttl" in cc and cc["ttl"] not in ("5m", "1h"):
        raise InvalidRequest(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")


def _cache_controlled(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield (location, cache_control) for every block carrying one, in prompt order."""
    if body.get("cache_control") is not None:
        yield "cache_control", body["cache_control"]
    for k, tool in enumerate(body.get("tools") or []):
        if isinstance(tool, dict) and tool.get("cache_control") is not None:
            yield f"tools.{k}", tool["cache_control"]
    if isinstance(body.get("system"), list):
        for k, blk in enumerate(body["system"]):
            if isinstance(blk, dict) and blk.get("cache_control") is not None:
                yield f"system.{k}", blk["cache_control"]
    for i, msg in enumerate(body.get("messages") or []):
        content = msg.get("content") if isinstance(msg, dict) else None
        for j, blk in enumerate(content if isinstance(content, list) else []):
            if not isinstance(blk, dict):
                continue
            if blk.get("cache_control") is not None:
                yield f"messages.{i}.content.{j}", blk["cache_control"]
            inner = blk.get("content") if blk.get("type") == "tool_result" else None
            for n, sub in enumerate(inner if isinstance(inner, list) else []):
                if isinstance(sub, dict) and sub.get("cache_control") is not None:
                    yield f"messages.{i}.content.{j}.content.{n}", sub["cache_control"]


def _check_text_block(blk: Any, where: str) -> None:
    if not isinstance(blk, dict) or blk.get("type") != "text":
        raise InvalidRequest(f"{where}.type: Input should be 'text'")
    if not isinstance(blk.get("text"), str):
        raise InvalidRequest(f"{where}.text: Field required")
    if not blk["text"]:
        raise InvalidRequest(f"{where}: text content blocks must be non-empty")


def _blocks(msg: dict[str, Any]) -> list[Block]:
    content = msg["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def validate_request(body: Any) -> None:
    """Raise InvalidRequest with the reason the real API would give, or return None."""
    if not isinstance(body, dict):
        raise InvalidRequest("body: Input should be a valid dictionary")
    for key in body:
        if key not in ALLOWED_FIELDS:
            raise InvalidRequest(f"{key}: Extra inputs are not permitted")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            raise InvalidRequest(f"{key}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise InvalidRequest("model: Input should be a valid non-empty string")
    if not _is_int(body["max_tokens"]):
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    if body["max_tokens"] < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")
    if body.get("stream"):
        # Deliberately unsupported: say so loudly rather than answer in the wrong shape.
        raise InvalidRequest("stream: the fake Messages API does not implement streaming")

    system = body.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list):
            raise InvalidRequest("system: Input should be a valid string or a list of text blocks")
        for k, blk in enumerate(system):
            _check_text_block(blk, f"system.{k}")

    tool_names = _validate_tools(body.get("tools"))
    _validate_tool_choice(body.get("tool_choice"), tool_names)
    _validate_messages(body["messages"])

    found = 0
    for where, cc in _cache_controlled(body):
        _check_cache_control(cc, where)
        found += 1
    if found > MAX_CACHE_BREAKPOINTS:
        raise InvalidRequest(
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {found}."
        )


def _validate_tools(tools: Any) -> list[str]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    names: list[str] = []
    for k, tool in enumerate(tools):
        where = f"tools.{k}.custom"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools.{k}: Input should be a valid dictionary")
        if tool.get("type", "custom") != "custom":
            raise InvalidRequest(f"tools.{k}.type: the fake only supports custom (client) tools")
        name = tool.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"{where}.name: Field required")
        if not TOOL_NAME_RE.match(name):
            raise InvalidRequest(f"{where}.name: String should match pattern '{TOOL_NAME_RE.pattern}'")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{where}.input_schema: Field required")
        if schema.get("type") != "object":
            raise InvalidRequest(f"{where}.input_schema.type: Input should be 'object'")
        if "description" in tool and not isinstance(tool["description"], str):
            raise InvalidRequest(f"{where}.description: Input should be a valid string")
        names.append(name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequest(f"tools: Tool names must be unique. Duplicated: {', '.join(dupes)}")
    return names


def _validate_tool_choice(choice: Any, tool_names: list[str]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if choice["type"] in ("any", "tool") and not tool_names:
        raise InvalidRequest("tool_choice: tool_choice may only be specified while providing tools.")
    if choice["type"] == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice.tool.name: Field required")
        if name not in tool_names:
            raise InvalidRequest(f"tool_choice.tool.name: tool '{name}' is not among the provided tools")
    elif "name" in choice:
        raise InvalidRequest(f"tool_choice.{choice['type']}.name: Extra inputs are not permitted")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    seen_ids: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        role = msg.get("role")
        if role == "system":
            # anthropic 2.12 types a "system" role, but its rules are undocumented: refuse
            # loudly rather than guess; the runner uses the top-level `system` parameter.
            raise InvalidRequest(f"messages.{i}.role: the fake does not support 'system' messages")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i == 0 and role != "user":
            raise InvalidRequest('messages: first message must use the "user" role')
        if i > 0 and messages[i - 1].get("role") == role:
            # The real API now merges consecutive same-role turns; the project wants strict.
            raise InvalidRequest(
                f'messages.{i}: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        content = msg.get("content")
        is_last_assistant = i == len(messages) - 1 and role == "assistant"
        if isinstance(content, str):
            if not content and not is_last_assistant:
                raise InvalidRequest(
                    f"messages.{i}: all messages must have non-empty content except for the "
                    "optional final assistant message"
                )
        elif isinstance(content, list):
            if not content and not is_last_assistant:
                raise InvalidRequest(
                    f"messages.{i}: all messages must have non-empty content except for the "
                    "optional final assistant message"
                )
            _validate_blocks(i, role, content, seen_ids)
        else:
            raise InvalidRequest(f"messages.{i}.content: Input should be a valid string or list")
        if is_last_assistant:
            text = (
                content
                if isinstance(content, str)
                else "".join(b.get("text", "") for b in content if b.get("type") == "text")
            )
            if text != text.rstrip():
                raise InvalidRequest("messages: final assistant content cannot end with trailing whitespace")

    # tool_use <-> tool_result pairing, strictly between neighbouring messages.
    for i, msg in enumerate(messages):
        blocks = _blocks(msg)
        if msg["role"] == "assistant":
            use_ids = [b["id"] for b in blocks if b.get("type") == "tool_use"]
            nxt = _blocks(messages[i + 1]) if i + 1 < len(messages) else []
            answered = {b.get("tool_use_id") for b in nxt if b.get("type") == "tool_result"}
            missing = [u for u in use_ids if u not in answered]
            if missing:
                raise InvalidRequest(
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message."
                )
            continue
        prev = _blocks(messages[i - 1]) if i > 0 else []
        prev_ids = {b.get("id") for b in prev if b.get("type") == "tool_use"}
        results_done = False
        answered_here: set[str] = set()
        for j, blk in enumerate(blocks):
            if blk.get("type") != "tool_result":
                results_done = True
                continue
            tid: str = blk["tool_use_id"]
            if results_done:
                raise InvalidRequest(
                    f"messages.{i}.content.{j}: `tool_result` blocks must come before any other "
                    "content (e.g. text) in a user message"
                )
            if tid not in prev_ids:
                raise InvalidRequest(
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{tid}. Each `tool_result` block must have a corresponding `tool_use` block in the "
                    "previous message."
                )
            if tid in answered_here:
                raise InvalidRequest(f"messages.{i}.content.{j}: duplicate `tool_result` for tool_use_id {tid}")
            answered_here.add(tid)


def _validate_blocks(i: int, role: str, content: list[Any], seen_ids: set[str]) -> None:
    allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
    for j, blk in enumerate(content):
        where = f"messages.{i}.content.{j}"
        if not isinstance(blk, dict) or not isinstance(blk.get("type"), str):
            raise InvalidRequest(f"{where}: Input should be a valid content block object with a 'type'")
        kind = blk["type"]
        if kind not in allowed:
            raise InvalidRequest(f"{where}: `{kind}` blocks are not allowed in {role} messages")
        if kind == "text":
            _check_text_block(blk, where)
        elif kind == "tool_use":
            tid, name = blk.get("id"), blk.get("name")
            if not isinstance(tid, str) or not TOOL_USE_ID_RE.match(tid):
                raise InvalidRequest(f"{where}.tool_use.id: String should match pattern '{TOOL_USE_ID_RE.pattern}'")
            if tid in seen_ids:
                raise InvalidRequest(f"{where}: `tool_use` ids must be unique, {tid} is repeated")
            seen_ids.add(tid)
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"{where}.tool_use.name: Field required")
            if not isinstance(blk.get("input"), dict):
                raise InvalidRequest(f"{where}.tool_use.input: Input should be a valid dictionary")
        elif kind == "tool_result":
            if not isinstance(blk.get("tool_use_id"), str):
                raise InvalidRequest(f"{where}.tool_result.tool_use_id: Field required")
            inner = blk.get("content")
            if inner is not None and not isinstance(inner, (str, list)):
                raise InvalidRequest(f"{where}.tool_result.content: Input should be a valid string or list")
            if "is_error" in blk and not isinstance(blk["is_error"], bool):
                raise InvalidRequest(f"{where}.tool_result.is_error: Input should be a valid boolean")


# --------------------------------------------------------------------------- default brain


def default_brain(body: dict[str, Any]) -> tuple[list[Block], str]:
    """Deterministic stand-in for a model: forced tools, two rounds of tool use, then talk.

    Inputs come from the project's one schema-driven generator (runner.agent.arguments), fed
    with the ids of earlier tool results, so a tool needing an id nobody returned is passed over.
    """
    declared: list[dict[str, Any]] = body.get("tools") or []
    # Like a model reading the descriptions: a tool kept for when it is asked for waits until then.
    tools = [t for t in declared if not str(t.get("description", "")).startswith("Only when")]
    messages: list[dict[str, Any]] = body["messages"]
    asked = asked_tool(body)
    instruction = " ".join(b.get("text", "") for b in _blocks(messages[-1]) if b.get("type") == "text")
    choice: dict[str, Any] = body.get("tool_choice") or ({"type": "tool", "name": asked} if asked else {"type": "auto"})
    tool_turns = sum(
        1 for m in messages if m["role"] == "assistant" and any(b.get("type") == "tool_use" for b in _blocks(m))
    )
    ids = _seen_ids(messages)

    def use(tool: dict[str, Any]) -> Block | None:
        rng = random.Random(f"{tool_turns}:{tool['name']}")
        schema = tool["input_schema"]
        arguments = _one_per_enum(schema, rng, instruction) or generate(
            schema, rng, tool=_mcp_name(tool["name"]), ids=ids
        )
        if arguments is None:
            return None
        return {"type": "tool_use", "id": "toolu_" + secrets.token_hex(12), "name": tool["name"], "input": arguments}

    if choice["type"] in ("tool", "any"):
        forced = (
            [t for t in declared if t["name"] == choice["name"]]
            if choice["type"] == "tool"
            else tools[tool_turns % len(tools) :] + tools[: tool_turns % len(tools)]
        )
        block = next((b for b in map(use, forced) if b is not None), None)
        if block is not None:
            return [block], "tool_use"
    if tools and choice["type"] == "auto" and tool_turns < 2:
        # Round-robin by turn, so a 4-tool list gets tools 0+1, then 2+3 (passing over what cannot be called).
        order = [tools[(2 * tool_turns + k) % len(tools)] for k in range(len(tools))]
        picks = [b for b in map(use, order) if b is not None][: 1 if choice.get("disable_parallel_tool_use") else 2]
        if picks:
            text = {"type": "text", "text": "Ich probiere das gleich mal aus."}
            return [text, *picks], "tool_use"
    turn = sum(1 for m in messages if m["role"] == "assistant")
    lines = [GERMAN_LINES[turn % len(GERMAN_LINES)], GERMAN_LINES[(turn + 1) % len(GERMAN_LINES)]]
    return [{"type": "text", "text": " ".join(lines[: 1 + turn % 2])}], "end_turn"


def asked_tool(body: dict[str, Any]) -> str | None:
    """The declared tool the newest user message tells the model to answer with (the runner's
    rating request names its rating tool), as a model following the instruction would take it."""
    last = body["messages"][-1]
    if last["role"] != "user":
        return None
    text = " ".join(b.get("text", "") for b in _blocks(last) if b.get("type") == "text")
    return next((t["name"] for t in body.get("tools") or [] if t.get("name") and t["name"] in text), None)


def _mcp_name(api_name: str) -> str:
    # The runner's provider maps todo.create to todo_create for the API; enough to find the module.
    return api_name.replace("_", ".", 1)


def _seen_ids(messages: list[dict[str, Any]]) -> IdPool:
    """The ids in the successful tool results so far, as a model reading them would."""
    names = {b["id"]: b["name"] for m in messages for b in _blocks(m) if b.get("type") == "tool_use"}
    ids = IdPool()
    for m in messages:
        for b in _blocks(m):
            if b.get("type") == "tool_result" and not b.get("is_error") and b.get("tool_use_id") in names:
                content = b.get("content")
                text = (
                    content
                    if isinstance(content, str)
                    else "".join(c.get("text", "") for c in content or [] if isinstance(c, dict))
                )
                ids.learn(_mcp_name(names[b["tool_use_id"]]), text)
    return ids


def _one_per_enum(schema: dict[str, Any], rng: random.Random, asked: str = "") -> dict[str, Any] | None:
    """A model rating its day gives one item per module, every field filled: an array of objects
    keyed by an enum gets one item per enum value (each from the generator), e.g. submit_ratings;
    when the instruction (`asked`) names some of the values, one item for each of those only."""
    for name, prop in (schema.get("properties") or {}).items():
        items = prop.get("items") if isinstance(prop, dict) and prop.get("type") == "array" else None
        keys = (items or {}).get("properties") or {}
        key = next((k for k, sub in keys.items() if isinstance(sub, dict) and sub.get("enum")), None)
        if items is not None and key is not None:
            values = keys[key]["enum"]
            named = [v for v in values if isinstance(v, str) and v in asked]
            out = []
            for value in named or values:
                item = generate({**items, "required": list(keys)}, rng) or {}
                out.append({**item, key: value})
            rest = generate({**schema, "properties": {k: v for k, v in schema["properties"].items() if k != name}}, rng)
            return {**(rest or {}), name: out}
    return None


# --------------------------------------------------------------------------- usage


def _tokens(obj: Any) -> int:
    # Roughly 4 characters per token, as for English/German prose.
    return max(1, math.ceil(len(json.dumps(obj, ensure_ascii=False, sort_keys=True)) / CHARS_PER_TOKEN))


def _output_tokens(blocks: list[Block]) -> int:
    # What the model generates: the text and the tool names/inputs, not the JSON envelope.
    parts = [
        b.get("text", "") if b.get("type") == "text" else b.get("name", "") + json.dumps(b.get("input", {}))
        for b in blocks
    ]
    return max(1, math.ceil(len("".join(parts)) / 4))


def _strip_cc(blk: Any) -> Any:
    # Marking a block as a breakpoint must not change the prefix it caches.
    if not isinstance(blk, dict):
        return blk
    out = {k: v for k, v in blk.items() if k != "cache_control"}
    if isinstance(out.get("content"), list):  # tool_result content
        out["content"] = [_strip_cc(s) for s in out["content"]]
    return out


Level = Literal["tools", "system", "messages"]


@dataclass
class CacheWrite:
    """One cache entry as written: which request paid for it, for what, and whether it was read."""

    request: int  # the paying request's number, counting every request the cache planned
    model: str
    level: Level  # where its breakpoint sits
    tokens: int  # the prefix it holds
    paid: int  # the part of it this request was charged as a write
    ttl: str
    expires: float = 0.0
    read: bool = False  # a later request read this prefix (or a longer one that contains it)


@dataclass
class CachePlan:
    """What one request reads, decided when it arrives, and what it writes once its response starts."""

    usage: dict[str, Any]
    writes: list[tuple[str, CacheWrite]] = field(default_factory=list)


def _segments(body: dict[str, Any]) -> list[tuple[Level, Any, Any]]:
    """The prompt as cacheable blocks in the API's order, each with its level and cache_control."""
    segments: list[tuple[Level, Any, Any]] = [
        ("tools", _strip_cc(t), t.get("cache_control")) for t in body.get("tools") or []
    ]
    system = body.get("system")
    if isinstance(system, str):
        segments.append(("system", system, None))
    elif isinstance(system, list):
        segments += [("system", _strip_cc(b), b.get("cache_control")) for b in system]
    for m in body["messages"]:
        for b in _blocks(m):
            # A breakpoint inside a tool_result's content marks the enclosing block.
            inner = b.get("content") if b.get("type") == "tool_result" else None
            nested = [s.get("cache_control") for s in inner if isinstance(s, dict)] if isinstance(inner, list) else []
            cc = b.get("cache_control") or next((c for c in nested if c), None)
            segments.append(("messages", (m["role"], _strip_cc(b)), cc))
    if body.get("cache_control") and segments:
        level, content, _ = segments[-1]
        segments[-1] = (level, content, body["cache_control"])
    return segments


def _prefix_keys(body: dict[str, Any], segments: list[tuple[Level, Any, Any]]) -> list[str]:
    """The identity of the prefix ending at each block: the model and every byte before, in order.

    Serialized as sent (no key sorting): a tool schema whose keys come in another order is
    another prompt. tool_choice and thinking count toward the message blocks' identity only
    (Anthropic's caching guide: changing them invalidates the message cache, not tools or system).
    """
    digest = hashlib.sha256(body["model"].encode())
    keys: list[str] = []
    for k, (level, content, _) in enumerate(segments):
        if level == "messages" and (k == 0 or segments[k - 1][0] != "messages"):
            digest.update(json.dumps([body.get("tool_choice"), body.get("thinking")]).encode())
        digest.update(json.dumps(content, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\0")
        keys.append(digest.copy().hexdigest())
    return keys


class PromptCache:
    """The API's prompt cache, shared by every request to one fake (one organization)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, CacheWrite] = {}
        self._planned = 0
        self.writes: list[CacheWrite] = []  # every entry written, in the order the writes took effect

    def plan(self, body: dict[str, Any]) -> CachePlan:
        """Read what is cached now (refreshing what it hits) and price the request's input."""
        now = self._clock()
        self._planned += 1
        segments = _segments(body)
        sizes = [_tokens(content) for _, content, _ in segments]
        ends = [sum(sizes[: k + 1]) for k in range(len(segments))]
        keys = _prefix_keys(body, segments)
        minimum = MIN_CACHEABLE_TOKENS[body["model"]]
        # A breakpoint below the model's minimum caches nothing and reads nothing, silently.
        breakpoints = [k for k, (_, _, cc) in enumerate(segments) if cc and ends[k] >= minimum]
        hit = -1
        for b in breakpoints:
            for k in range(b, max(-1, b - CACHE_LOOKBACK_BLOCKS), -1):
                if self._live(keys[k], now):
                    hit = max(hit, k)
                    break
        read = ends[hit] if hit >= 0 else 0
        if hit >= 0:
            entry = self._entries[keys[hit]]
            entry.expires = now + CACHE_TTL_S[entry.ttl]  # a hit refreshes the lifetime, free
            for k in range(hit + 1):  # the prefix read contains every entry on its way, whoever wrote it
                if self._live(keys[k], now):
                    self._entries[keys[k]].read = True
        plan = CachePlan(usage={})
        covered = read
        by_ttl = {"5m": 0, "1h": 0}
        for b in breakpoints:
            if b <= hit:
                continue
            ttl = segments[b][2].get("ttl", "5m")
            paid = ends[b] - covered
            covered = ends[b]
            by_ttl[ttl] += paid
            level = segments[b][0]
            plan.writes.append((keys[b], CacheWrite(self._planned, body["model"], level, ends[b], paid, ttl)))
        total = ends[-1] if ends else 0
        plan.usage = {
            "input_tokens": total - covered,  # what comes after the last breakpoint (or all of it)
            "cache_creation_input_tokens": covered - read,
            "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": by_ttl["5m"], "ephemeral_1h_input_tokens": by_ttl["1h"]},
            "service_tier": "standard",
        }
        return plan

    def commit(self, plan: CachePlan) -> None:
        """The response that wrote these entries has started: from now on they can be read."""
        now = self._clock()
        for key, write in plan.writes:
            write.expires = now + CACHE_TTL_S[write.ttl]
            self._entries[key] = write  # a concurrent writer of the same prefix paid for nothing
            self.writes.append(write)

    def _live(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.expires > now


# --------------------------------------------------------------------------- server


class _QuietServer(uvicorn.Server):
    """uvicorn tuned for one fake per test: no signal handlers, fast stop.

    Stock uvicorn takes over SIGINT/SIGTERM for the whole test process, polls for
    should_exit every 0.1 s and sleeps another 0.1 s on shutdown: ~0.2 s per test.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        while not self.should_exit:
            await asyncio.sleep(0.005)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones after replying
        for server in self.servers:
            await server.wait_closed()


class FakeAnthropic:
    """The fake API. ``async with FakeAnthropic() as fake`` serves it on 127.0.0.1:<free port>.

    brain:   makes the reply; replace it per test (see ``Brain``). Defaults to ``default_brain``.
    api_key: if set, a request carrying any other key gets 401 (otherwise any key passes).
    """

    def __init__(
        self, *, brain: Brain | None = None, api_key: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.brain: Brain = brain or default_brain
        self.api_key = api_key
        self.cache = PromptCache(clock)
        self.requests: list[Any] = []  # every JSON body received on /v1/messages, in order
        self.exchanges: list[Exchange] = []  # the same, with headers, status and answer
        self.base_url = ""  # http://127.0.0.1:<port>, set once started
        self._failures: deque[_Failure] = deque()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/{path:path}", self._not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            ]
        )

    def fail_next(
        self,
        status: int = 429,
        count: int = 1,
        retry_after: float | None = None,
        message: str | None = None,
        error_type: str | None = None,
    ) -> None:
        """Answer the next ``count`` /v1/messages requests with this error (after the auth check).

        retry_after (seconds) is sent as ``retry-after``; note the SDK ignores 0 and then backs
        off 0.5 s/1 s itself, so pass a small positive value (0.01) for fast tests.
        """
        etype = error_type or ERROR_TYPES.get(status, "api_error")
        text = message or {
            "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
            "overloaded_error": "Overloaded",
            "api_error": "Internal server error",
        }.get(etype, etype)
        for _ in range(count):
            self._failures.append(_Failure(status, retry_after, etype, text))

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise the startup error
            await asyncio.sleep(0.005)
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None

    async def __aenter__(self) -> FakeAnthropic:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- handlers

    def _reply(
        self,
        body: Any,
        headers: dict[str, str],
        status: int,
        payload: dict[str, Any],
        extra_headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        request_id = "req_" + secrets.token_hex(12)
        if status != 200:
            payload = {**payload, "request_id": request_id}
        self.exchanges.append(Exchange(body, headers, status, payload))
        return JSONResponse(payload, status, headers={"request-id": request_id, **(extra_headers or {})})

    @staticmethod
    def _error(status: int, message: str, etype: str | None = None) -> dict[str, Any]:
        return {"type": "error", "error": {"type": etype or ERROR_TYPES.get(status, "api_error"), "message": message}}

    async def _not_found(self, request: Request) -> JSONResponse:
        return self._reply(None, dict(request.headers), 404, self._error(404, f"Not found: {request.url.path}"))

    async def _messages(self, request: Request) -> JSONResponse:
        headers = dict(request.headers)
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        if body is not None:
            self.requests.append(body)

        # Order as at the real edge: authentication, then rate limiting, then validation.
        key = headers.get("x-api-key") or ""
        auth = headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            return self._reply(body, headers, 401, self._error(401, "x-api-key header is required"))
        if self.api_key is not None and key != self.api_key:
            return self._reply(body, headers, 401, self._error(401, "invalid x-api-key"))
        if self._failures:
            f = self._failures.popleft()
            extra = {} if f.retry_after is None else {"retry-after": f"{f.retry_after:g}"}
            return self._reply(body, headers, f.status, self._error(f.status, f.message, f.error_type), extra)
        if "anthropic-version" not in headers:
            return self._reply(body, headers, 400, self._error(400, "anthropic-version: header is required"))
        if body is None:
            return self._reply(
                body, headers, 400, self._error(400, "There was an error parsing the body: invalid JSON")
            )
        try:
            validate_request(body)
        except InvalidRequest as e:
            return self._reply(body, headers, 400, self._error(400, str(e)))
        if body["model"] not in MIN_CACHEABLE_TOKENS:
            return self._reply(body, headers, 404, self._error(404, f"model: {body['model']}"))

        plan = self.cache.plan(body)  # the cache is read when the request arrives, before the model runs
        try:
            reply = self.brain(body)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as e:  # surface brain bugs, and stop the SDK from retrying them
            return self._reply(
                body, headers, 500, self._error(500, f"fake brain raised {e!r}"), {"x-should-retry": "false"}
            )
        self.cache.commit(plan)
        blocks, stop_reason = (
            reply
            if isinstance(reply, tuple)
            else (reply, "tool_use" if any(b.get("type") == "tool_use" for b in reply) else "end_turn")
        )
        blocks = [dict(b) for b in blocks]  # the brain may reuse its lists; don't write into them
        for blk in blocks:
            if blk.get("type") == "tool_use" and not blk.get("id"):
                blk["id"] = "toolu_" + secrets.token_hex(12)

        output_tokens = _output_tokens(blocks)
        if output_tokens > body["max_tokens"]:
            # Cut the reply off like a model running out of tokens: text only, truncated.
            text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")[: body["max_tokens"] * 4]
            blocks = [{"type": "text", "text": text}] if text else []
            stop_reason, output_tokens = "max_tokens", body["max_tokens"]

        message = {
            "id": "msg_" + secrets.token_hex(12),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**plan.usage, "output_tokens": output_tokens},
        }
        return self._reply(body, headers, 200, message)
