"""Tool arguments from a tool's JSON Schema: the project's one generator of schema values.

The scripted player and the tests' fake model both fill tool inputs here. What comes out is
valid for the draft-07 schema the gateway serves (required fields, enums, formats, patterns,
length/number/array bounds, nested objects, anyOf with null, no unknown keys) and plausible
for a German-speaking persona. Values a player cannot know, the ids of things in Mana, are
never made up: they come from the JSON of earlier successful results of the same tick
(`IdPool`), and a tool whose required id is not known yet cannot be called (`generate` gives
None). Pure and deterministic: every choice comes from the `random.Random` passed in.

`pattern` values a person would type (dates, times, colours) are tried first; any other
pattern is filled by rstr's regex-driven generator, seeded by the same RNG.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import rstr

from runner.persona import module_of

Schema = dict[str, Any]

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
    "Kaffee",
    "Fahrrad",
    "Urlaub",
    "Kochen",
]
_SENTENCES = [
    "Heute war ein ruhiger Tag, ich habe viel geschafft.",
    "Morgen früh will ich zuerst den Garten machen.",
    "Ich war etwas müde, aber der Spaziergang hat gutgetan.",
    "Nach der Arbeit habe ich mit Mama telefoniert.",
    "Ein Bild im Stil eines alten Comics, mit warmen Farben.",
    "Der Kaffee im neuen Café war wirklich gut.",
]
_PEOPLE = ["Mama", "Jonas", "Lena", "den Kollegen", "meiner Schwester", "allein"]
_TAGS = ["arbeit", "familie", "sport", "gesundheit", "haushalt", "freizeit", "idee"]
_COLOURS = ["#6366f1", "#22c55e", "#ef4444", "#f59e0b", "#0ea5e9", "#a855f7", "#14b8a6"]
# Fields whose text is prose rather than a short label.
_PROSE = re.compile(r"content|notes?$|description|prompt|claim|context|meaning|outcome|dialogue|caption|text", re.I)

# An id field: format uuid, or named `id` / `…Id` / `…Ids` (the real registry types most of its
# ids as plain strings: storyId, garmentIds, sourceFaceMediaId, …).
_ID_NAME = re.compile(r"id|[a-z][A-Za-z0-9]*Ids?")
# Leading words that qualify an id without changing its kind (newVariantMediaIds ~ variantMediaIds).
_ID_QUALIFIERS = ("new", "pinned", "active", "current")
# Where an argument's ids come from when its name alone does not tell: (module or None for the
# tool's own module, kind). Kinds are nouns read off the results (see `_kind_of`); facts from
# the registry's output schemas (packages/mana-tool-registry/src/modules/*.ts).
_ID_SOURCES: dict[str, tuple[tuple[str | None, str], ...]] = {
    "todo.id": ((None, "task"),),
    "habits.id": ((None, "habit"),),
    "me.referenceMediaIds": (("me", "media"),),
    "comic.sourceFaceMediaId": (("me", "media"),),
    "comic.sourceBodyMediaId": (("me", "media"),),
    "comic.characterMediaIds": ((None, "variantMedia"), (None, "characterMedia")),
}

_MISSING = object()  # a required id that no earlier result gave: the call cannot be made


class IdPool:
    """The ids this tick's successful results carried, by (module, kind), in first-seen order."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], list[str]] = {}

    def learn(self, tool: str, text: str) -> None:
        """Take the ids out of one successful result of `tool` (pretty-printed JSON, maybe cut short)."""
        value = parse_json(text)
        if value is not None:
            for kind, found in _ids_in(value, None):
                bucket = self._ids.setdefault((module_of(tool), kind), [])
                if found not in bucket:
                    bucket.append(found)

    def known(self) -> set[str]:
        return {found for bucket in self._ids.values() for found in bucket}

    def for_field(self, tool: str, field: str) -> list[str]:
        """The known ids an argument `field` of `tool` may take, best kind first, no repeats."""
        module = module_of(tool)
        kind = _kind_of(field)
        sources = _ID_SOURCES.get(f"{module}.{field}") or (((None, kind),) if kind else ())
        if sources:
            pools = [self._ids.get((source or module, wanted), []) for source, wanted in sources]
        else:  # a bare `id` the table does not place: any id this module returned
            pools = [ids for (owner, _), ids in self._ids.items() if owner == module]
        out: list[str] = []
        for ids in pools:
            out += [i for i in ids if i not in out]
        return out


def generate(schema: Schema, rng: random.Random, *, tool: str = "", ids: IdPool | None = None) -> Any:
    """A value valid for `schema`, or None when a required id is not known (skip the tool)."""
    value = _Walk(schema, rng, tool, ids or IdPool()).value(schema, "", required=True)
    return None if value is _MISSING else value


def is_id_field(name: str, schema: Schema) -> bool:
    return schema.get("format") == "uuid" or bool(_ID_NAME.fullmatch(name))


def parse_json(text: str) -> Any:
    """The JSON in a tool result; a result cut short (see loop.bound) keeps its complete part."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    # Cut after the last bracket that closed, then close what is still open.
    stack: list[str] = []
    cut: tuple[int, str] | None = None
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                return None
            cut = (i + 1, "".join(reversed(stack)))
    if cut is None:
        return None
    try:
        return json.loads(text[: cut[0]] + cut[1])
    except ValueError:
        return None


def _kind_of(key: str | None) -> str:
    """The kind of id a key names: `storyId` → story, `newVariantMediaIds` → variantMedia, `tasks` → task."""
    if not key:
        return ""
    if key.endswith("Ids") or key.endswith("Id"):
        stem = key[: -3 if key.endswith("Ids") else -2]
        for qualifier in _ID_QUALIFIERS:
            if stem.startswith(qualifier) and stem[len(qualifier) : len(qualifier) + 1].isupper():
                stem = stem[len(qualifier) :]
        return stem[:1].lower() + stem[1:]
    if key == "id":
        return ""
    if key.endswith("ies"):
        return key[:-3] + "y"
    return key[:-1] if key.endswith("s") else key


def _ids_in(value: Any, parent: str | None) -> Iterator[tuple[str, str]]:
    """(kind, id) pairs: `id` takes its kind from the key holding its object, `…Id(s)` from its own name."""
    if isinstance(value, list):
        for item in value:
            yield from _ids_in(item, parent)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "id" and isinstance(item, str) and item:
                yield _kind_of(parent), item
            elif key != "id" and _ID_NAME.fullmatch(key):
                for found in item if isinstance(item, list) else [item]:
                    if isinstance(found, str) and found:
                        yield _kind_of(key), found
            else:
                yield from _ids_in(item, key)


class _Walk:
    def __init__(self, root: Schema, rng: random.Random, tool: str, ids: IdPool) -> None:
        self.root, self.rng, self.tool, self.ids = root, rng, tool, ids
        self.xeger = rstr.Rstr(rng)

    def value(self, schema: Schema, name: str, *, required: bool) -> Any:
        rng = self.rng
        schema = self._resolve(schema)
        if "default" in schema and not required and rng.random() < 0.25:
            return copy.deepcopy(schema["default"])  # what a person who leaves it as it is would send
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [self._resolve(s) for s in schema[key]]
                real = [s for s in options if s.get("type") != "null"]
                if not real or (len(real) < len(options) and rng.random() < 0.2):
                    return None
                return self.value(rng.choice(real), name, required=required)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema:
            return copy.deepcopy(rng.choice(schema["enum"]))
        kind = schema.get("type")
        if isinstance(kind, list):
            real_kinds = [k for k in kind if k != "null"]
            kind = rng.choice(real_kinds) if real_kinds and rng.random() < 0.85 else "null"
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if is_id_field(name, schema) and _holds_ids(kind, schema):
            return self._ids(kind, schema, name)
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return self._array(schema, name)
        if kind in ("integer", "number"):
            return self._number(schema, kind == "integer")
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema, name)

    def _resolve(self, schema: Schema) -> Schema:
        while "$ref" in schema:
            target: Any = self.root
            for part in schema["$ref"].lstrip("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")] if part else target
            schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
        if "allOf" in schema:  # merge the parts: enough for the object shapes servers publish
            merged: Schema = {k: v for k, v in schema.items() if k != "allOf"}
            for part in (self._resolve(s) for s in schema["allOf"]):
                for key, val in part.items():
                    if key == "properties":
                        merged["properties"] = {**merged.get("properties", {}), **val}
                    elif key == "required":
                        merged["required"] = [*merged.get("required", []), *val]
                    else:
                        merged.setdefault(key, val)
            schema = merged
        return schema

    def _object(self, schema: Schema) -> Any:
        required = set(schema.get("required", []))
        out: dict[str, Any] = {}
        # additionalProperties is never used: only declared keys go out.
        for name, sub in (schema.get("properties") or {}).items():
            needed = name in required
            if not needed and self.rng.random() < 0.5:
                continue
            value = self.value(sub, name, required=needed)
            if value is _MISSING:
                if needed:
                    return _MISSING
                continue
            out[name] = value
        return out

    def _array(self, schema: Schema, name: str) -> Any:
        low = int(schema.get("minItems", 0))
        high = max(low, min(int(schema.get("maxItems", low + 3)), low + 3))
        items = self._resolve(schema.get("items") or {})
        unique = bool(schema.get("uniqueItems"))
        if "enum" in items and unique:
            pool = list(items["enum"])
            return self.rng.sample(pool, min(len(pool), self.rng.randint(low, high)))
        out: list[Any] = []
        for _ in range(self.rng.randint(low, high) * 3):  # room for retries when items must differ
            if len(out) >= high or (len(out) >= low and self.rng.random() < 0.3):
                break
            item = self.value(items, _singular(name), required=True)
            if item is _MISSING:
                return _MISSING
            if item not in out:  # a person lists a tag once, even where the schema would allow twice
                out.append(item)
        while not unique and out and len(out) < low:
            out.append(out[-1])
        return out if len(out) >= low else _MISSING

    def _ids(self, kind: str, schema: Schema, name: str) -> Any:
        known = self.ids.for_field(self.tool, name)
        if kind == "array":
            low = max(1, int(schema.get("minItems", 0)))
            high = min(int(schema.get("maxItems", 3)), len(known))
            if high < low:
                return _MISSING
            return self.rng.sample(known, self.rng.randint(low, high))
        return self.rng.choice(known) if known else _MISSING

    def _number(self, schema: Schema, integer: bool) -> int | float:
        low, high = schema.get("minimum"), schema.get("maximum")
        xlow, xhigh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        step = 1 if integer else 0.01
        if isinstance(xlow, int | float) and not isinstance(xlow, bool):
            low = xlow + step if low is None else max(low, xlow + step)
        if isinstance(xhigh, int | float) and not isinstance(xhigh, bool):
            high = xhigh - step if high is None else min(high, xhigh - step)
        if low is None:
            low = 1 if high is None or high >= 1 else high - 10
        if high is None or high - low > 50:
            high = low + 20  # an everyday size: a limit of 5, 7 days, level 3
        high = max(low, high)
        if integer:
            value: int | float = self.rng.randint(int(-(-low // 1)), int(high // 1))
        else:
            value = round(self.rng.uniform(low, high), 2)
            value = min(max(value, low), high)
        multiple = schema.get("multipleOf")
        if multiple:  # a multiple inside the bounds
            value = self.rng.randint(int(-(-low // multiple)), int(high // multiple)) * multiple
        return value

    def _string(self, schema: Schema, name: str) -> str:
        rng = self.rng
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        day = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        clock = f"{rng.randint(6, 22):02d}:{rng.choice(['00', '15', '30', '45'])}"
        by_format = {
            "date": day,
            "date-time": f"{day}T{clock}:00Z",  # UTC with Z: zod's .datetime() refuses offsets
            "time": f"{clock}:00Z",
            "email": f"{rng.choice(['anna', 'jonas', 'lena'])}@example.org",
            "uri": f"https://example.org/{rng.choice(_TAGS)}",
        }
        if fmt in by_format:
            return by_format[fmt]
        if pattern:
            # A value a person would type, if one fits; else whatever the pattern allows.
            for candidate in (day, clock, f"{clock}:00", rng.choice(_COLOURS), self._text(name, low, high)):
                if re.search(pattern, candidate) and _fits(candidate, low, high):
                    return candidate
            for _ in range(20):
                candidate = self.xeger.xeger(pattern)
                if _fits(candidate, low, high):
                    return candidate
            return candidate
        return self._text(name, low, high)

    def _text(self, name: str, low: int, high: int | None) -> str:
        rng = self.rng
        if _PROSE.search(name):
            text = rng.choice(_SENTENCES)
        elif re.search(r"who|person", name, re.I):
            text = rng.choice(_PEOPLE)
        elif name in ("tags", "tag"):
            text = rng.choice(_TAGS)
        else:
            text = " ".join(rng.sample(_WORDS, rng.randint(1, 2)))
        while len(text) < low:
            text += " " + rng.choice(_WORDS)
        if high is not None and len(text) > high:
            text = text[:high].rstrip() if len(text[:high].rstrip()) >= low else text[:high]
        return text


def _fits(text: str, low: int, high: int | None) -> bool:
    return len(text) >= low and (high is None or len(text) <= high)


def _holds_ids(kind: str, schema: Schema) -> bool:
    """Strings (or a list of strings) that are free to be anything: where an id goes."""
    if kind == "array":
        items = schema.get("items") or {}
        return items.get("type", "string") == "string" and "enum" not in items and "pattern" not in items
    return kind == "string"


def _singular(name: str) -> str:
    # An item of `tags` is a tag: so item text looks like one.
    return name[:-1] if name.endswith("s") and not name.endswith("Ids") else name
