"""An offline persona: no model, deterministic given its seed and what it got back.

It picks tools weighted by the persona's moduleMix, fills in arguments that satisfy each
tool's JSON schema (runner.agent.arguments), and rates what it used by how it went. Ids it
cannot know (a todo to complete) come from this tick's earlier results; a tool that needs
one not seen yet is passed over for that turn. The demo and most tests run on it, and it
smoke-tests the whole MCP surface at zero cost.

`latency_ms` makes it think like a model: before each turn and each rating it waits a seeded,
heavy-tailed (log-normal) time with that median, so benchmarks and replica tests see ticks
that last seconds and vary as Claude's do, rather than a CPU race.
"""

from __future__ import annotations

import asyncio
import random

from runner.agent.arguments import IdPool, generate
from runner.agent.loop import Entry, RatingReply, Results, ToolCall, ToolDef, Turn
from runner.persona import module_of

LATENCY_SIGMA = 1.0


class ScriptedProvider:
    def __init__(self, seed: str, module_mix: dict[str, float], latency_ms: float = 0.0) -> None:
        self._rng = random.Random(seed)
        self._mix = module_mix
        self._budget = self._rng.randint(3, 8)
        self._ids = 0
        # Its own stream: the same seed plays the same day with or without latency.
        self._latency_rng = random.Random(f"{seed}:latency")
        self._latency_s = latency_ms / 1000

    async def _think(self) -> None:
        if self._latency_s > 0:
            # sigma 1: the slowest 1% of turns take about ten times the median, capped at twenty.
            factor = min(self._latency_rng.lognormvariate(0.0, LATENCY_SIGMA), 20.0)
            await asyncio.sleep(self._latency_s * factor)

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        await self._think()
        done = sum(len(e.calls) for e in transcript if isinstance(e, Turn))
        left = self._budget - done
        if left <= 0 or not tools:
            return Turn(text=self._summary(transcript), calls=[])
        ids = _seen_ids(transcript)
        calls: list[ToolCall] = []
        for _ in range(min(left, self._rng.randint(1, 2))):
            call = self._call(tools, ids)
            if call is not None:
                calls.append(call)
        return Turn(text="" if calls else self._summary(transcript), calls=calls)

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        await self._think()
        outcomes: dict[str, list[bool]] = {}
        names = {c.id: c.name for e in transcript if isinstance(e, Turn) for c in e.calls}
        for entry in transcript:
            if isinstance(entry, Results):
                for r in entry.results:
                    outcomes.setdefault(module_of(names.get(r.call_id, "")), []).append(not r.is_error)
        ratings = []
        for module in modules:
            results = outcomes.get(module, [])
            failed = results.count(False)
            rating = 5 - round(3 * failed / len(results)) - self._rng.randint(0, 1) if results else 3
            note = (
                f"{failed} von {len(results)} Versuchen sind schiefgegangen."
                if failed
                else "Hat gut funktioniert, genau was ich brauchte."
            )
            ratings.append({"module": module, "rating": max(1, rating), "notes": note})
        payload = {"ratings": ratings}
        return RatingReply(payload=payload, raw=str(payload))

    def _call(self, tools: list[ToolDef], ids: IdPool) -> ToolCall | None:
        """A call to a tool the persona likes, with arguments; None when no tool can be called."""
        left = list(tools)
        while left:
            weights = [self._mix.get(module_of(t.name), 0.0) for t in left]
            if not any(w > 0 for w in weights):
                weights = [1.0] * len(left)  # the persona likes nothing on offer: wander around
            tool = self._rng.choices(left, weights=weights)[0]
            arguments = generate(tool.input_schema, self._rng, tool=tool.name, ids=ids)
            if arguments is not None:
                self._ids += 1
                return ToolCall(id=f"call_{self._ids}", name=tool.name, input=arguments)
            left.remove(tool)  # it needs an id no result has shown yet: something else this turn
        return None

    def _summary(self, transcript: list[Entry]) -> str:
        used = sorted({module_of(c.name) for e in transcript if isinstance(e, Turn) for c in e.calls})
        return f"Ich habe heute {', '.join(used) or 'nichts'} benutzt." if used else "Heute hatte ich keine Zeit."


def _seen_ids(transcript: list[Entry]) -> IdPool:
    """The ids in this tick's successful results so far."""
    names = {c.id: c.name for e in transcript if isinstance(e, Turn) for c in e.calls}
    ids = IdPool()
    for entry in transcript:
        if isinstance(entry, Results):
            for result in entry.results:
                if not result.is_error and result.call_id in names:
                    ids.learn(names[result.call_id], result.text)
    return ids
