"""An offline persona: no model, deterministic given its seed.

It picks tools weighted by the persona's moduleMix, fills in arguments that satisfy each
tool's JSON schema, and rates what it used by how it went. The demo and most tests run on
it, and it smoke-tests the whole MCP surface at zero cost.
"""

from __future__ import annotations

import random
from typing import Any

from runner.agent.loop import Entry, RatingReply, Results, ToolCall, ToolDef, Turn
from runner.persona import module_of

_WORDS = [
    "Einkaufen",
    "Wäsche",
    "Steuererklärung",
    "Joggen",
    "Mama anrufen",
    "Projekt",
    "Lernen",
    "Arzttermin",
    "Meditation",
    "Rechnung",
    "Geburtstag",
    "Präsentation",
    "Garten",
    "Lesen",
]


class ScriptedProvider:
    def __init__(self, seed: str, module_mix: dict[str, float]) -> None:
        self._rng = random.Random(seed)
        self._mix = module_mix
        self._budget = self._rng.randint(3, 8)
        self._ids = 0

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        done = sum(len(e.calls) for e in transcript if isinstance(e, Turn))
        left = self._budget - done
        if left <= 0 or not tools:
            return Turn(text=self._summary(transcript), calls=[])
        calls = [self._call(tools) for _ in range(min(left, self._rng.randint(1, 2)))]
        return Turn(text="", calls=calls)

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
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

    def _call(self, tools: list[ToolDef]) -> ToolCall:
        weights = [self._mix.get(module_of(t.name), 0.0) for t in tools]
        if not any(w > 0 for w in weights):
            weights = [1.0] * len(tools)  # the persona likes nothing on offer: wander around
        tool = self._rng.choices(tools, weights=weights)[0]
        self._ids += 1
        return ToolCall(id=f"call_{self._ids}", name=tool.name, input=self._value(tool.input_schema, tool.input_schema))

    def _summary(self, transcript: list[Entry]) -> str:
        used = sorted({module_of(c.name) for e in transcript if isinstance(e, Turn) for c in e.calls})
        return f"Ich habe heute {', '.join(used) or 'nichts'} benutzt." if used else "Heute hatte ich keine Zeit."

    def _value(self, schema: dict[str, Any], root: dict[str, Any]) -> Any:
        """A value valid for `schema`: enough JSON Schema for what MCP servers publish."""
        rng = self._rng
        if "$ref" in schema:
            target: Any = root
            for part in schema["$ref"].lstrip("#/").split("/"):
                target = target.get(part, {})
            return self._value(target, root)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
                return self._value(options[0], root)
        if "allOf" in schema and schema["allOf"]:
            return self._value(schema["allOf"][0], root)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return rng.choice(schema["enum"])
        kind = schema.get("type", "object")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props: dict[str, Any] = schema.get("properties", {})
            required = set(schema.get("required", []))
            return {
                name: self._value(sub, root) for name, sub in props.items() if name in required or rng.random() < 0.5
            }
        if kind == "array":
            low = schema.get("minItems", 1)
            count = rng.randint(low, max(low, min(schema.get("maxItems", 3), 3)))
            return [self._value(schema.get("items", {"type": "string"}), root) for _ in range(count)]
        if kind in ("integer", "number"):
            low = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else 1)
            high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else low + 9)
            value = rng.randint(int(low), int(max(low, high)))
            return value if kind == "integer" else float(value)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt == "date":
            return f"2026-{self._rng.randint(1, 12):02d}-{self._rng.randint(1, 28):02d}"
        if fmt == "date-time":
            return f"2026-{self._rng.randint(1, 12):02d}-{self._rng.randint(1, 28):02d}T09:00:00Z"
        text = " ".join(self._rng.sample(_WORDS, 2))
        low, high = int(schema.get("minLength", 1)), int(schema.get("maxLength", 200))
        return (text * (low // len(text) + 1))[: max(low, min(len(text), high))]
