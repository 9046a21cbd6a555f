"""The provider-agnostic role-play loop: model turn, tool calls, results, until done.

It is handed the tool list and a `call_tool` function by the tick and knows nothing of
MCP, HTTP or the journal; a provider turns the neutral transcript into its own API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Tool output goes back into every later request: bound it so one big list cannot
# blow the context window (and the bill) for the rest of the tick.
MAX_RESULT_CHARS = 4_000
# Far below the API's 500-row batch: a tick's actions always fit one batch (see journal).
MAX_CALLS_PER_TICK = 60


@dataclass(frozen=True, slots=True)
class ToolDef:
    name: str  # MCP name; providers map it to what their API accepts
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    text: str
    is_error: bool


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0  # every cache write, 5-minute and 1-hour
    cache_creation_1h_tokens: int = 0  # of which written for an hour (billed at the 1-hour rate)
    cache_read_input_tokens: int = 0
    # Priced by the provider, which knows its model and that model's row of the price table.
    cost_usd: float = 0.0
    model: str = ""

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_creation_1h_tokens += other.cache_creation_1h_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cost_usd += other.cost_usd
        self.model = other.model or self.model

    def by_kind(self) -> dict[str, int]:
        return {
            "input": self.input_tokens,
            "output": self.output_tokens,
            "cache_creation": self.cache_creation_input_tokens,
            "cache_read": self.cache_read_input_tokens,
        }


@dataclass(frozen=True, slots=True)
class Turn:
    text: str
    calls: list[ToolCall]
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class Results:
    results: list[ToolResult]


Entry = Turn | Results


class ModelUnavailable(Exception):
    """The model cannot answer for now (overloaded, unreachable) after its client's own retries.

    Providers raise it so the tick can tell a passing outage, worth another attempt when
    nothing happened in Mana yet, from a request that will never succeed.
    """


@dataclass(frozen=True, slots=True)
class RatingReply:
    payload: Any  # the structured ratings as the model gave them, or None
    raw: str  # what to show an operator when the payload cannot be used
    usage: Usage = field(default_factory=Usage)


class Provider(Protocol):
    """One tick's model: made per tick, so it may keep per-tick state (name maps, RNG)."""

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn: ...

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply: ...


CallTool = Callable[[ToolCall], Awaitable[ToolResult]]
# Told each model turn's usage as soon as it is known; False ends the day after this turn's calls.
OnUsage = Callable[[Usage], Awaitable[bool]]


@dataclass(slots=True)
class Play:
    transcript: list[Entry] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    calls: int = 0
    summary: str = ""
    stopped: bool = False  # the day was ended by `on_usage` (a budget), not by the model or the turn limit


async def play(
    provider: Provider,
    system: str,
    tools: list[ToolDef],
    call_tool: CallTool,
    *,
    max_turns: int,
    state: Play,
    on_usage: OnUsage | None = None,
) -> Play:
    """Run turns until the model stops calling tools, the turn budget is spent, or `on_usage` says stop.

    `state` is filled in place, so a caller that times out still holds what happened.
    Every tool_use gets its tool_result in the next entry, several per turn included:
    the API refuses a transcript with an unanswered call. So a stop asked for by `on_usage`
    comes after the turn's calls: the money of that turn is spent already, its calls are the day.
    """
    for _ in range(max_turns):
        turn = await provider.next_turn(system, tools, state.transcript)
        state.transcript.append(turn)
        state.usage.add(turn.usage)
        go_on = await on_usage(turn.usage) if on_usage is not None else True
        if turn.text:
            state.summary = turn.text
        if not turn.calls:
            break
        results: list[ToolResult] = []
        for call in turn.calls:
            if state.calls >= MAX_CALLS_PER_TICK:
                results.append(ToolResult(call.id, "Not run: the tool budget for today is used up.", True))
                continue
            state.calls += 1
            result = await call_tool(call)
            results.append(ToolResult(result.call_id, bound(result.text), result.is_error))
        state.transcript.append(Results(results))
        if not go_on:
            state.stopped = True
            break
        if state.calls >= MAX_CALLS_PER_TICK:
            break
    return state


def bound(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… [{len(text) - limit} more characters cut]"
