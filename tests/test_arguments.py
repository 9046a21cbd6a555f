"""The scripted player's arguments are what the real gateway's schemas accept, and its ids are real.

Every tool of tests/mana-tools.json (a copy of the real gateway's tools/list answer) is filled
over many seeds and checked with a draft-07 validator whose format checker really checks uuid
and date-time; ids come only from earlier successful results of the same tick.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SEED_SECRET, SERVICE_KEY, Mana, open_runner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, FormatChecker

from runner.agent.arguments import IdPool, generate, is_id_field, parse_json
from runner.agent.loop import Entry, Results, ToolCall, ToolDef, ToolResult, Turn, bound
from runner.agent.providers.scripted import ScriptedProvider
from runner.dispatch import run_once
from runner.persona import module_of
from runner.sandbox import Sandbox, SandboxConfig

TOOLS: list[dict[str, Any]] = json.loads((Path(__file__).parent / "mana-tools.json").read_text("utf-8"))["tools"]
SCHEMAS = {t["name"]: t["inputSchema"] for t in TOOLS}
DEFS = [ToolDef(t["name"], t["description"], t["inputSchema"]) for t in TOOLS]
FORMATS = FormatChecker()  # uuid is built in; date-time and time come with rfc3339-validator
VALIDATORS = {name: Draft7Validator(schema, format_checker=FORMATS) for name, schema in SCHEMAS.items()}
# zod's .datetime(), which the real gateway validates with, takes UTC with Z only (no offsets).
ZOD_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
NEEDS_AN_ID = {
    "habits.update",
    "habits.archive",
    "me.generateWithReference",
    "todo.complete",
    "wardrobe.createOutfit",
    "wardrobe.tryOn",
    "comic.createStory",
    "comic.generatePanel",
    "comic.reorderPanels",
    "comic.createCharacter",
    "comic.generateVariant",
    "comic.pinVariant",
    "augur.resolveSign",
}


def check(tool: str, arguments: Any) -> None:
    """Refuse what the real gateway's schema would refuse, with the reason."""
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in VALIDATORS[tool].iter_errors(arguments)]
    assert not errors, f"{tool} {arguments}: {errors}"
    for value, schema in _strings(arguments, SCHEMAS[tool]):
        if schema.get("format") == "date-time" or any(s.get("format") == "date-time" for s in schema.get("anyOf", [])):
            assert ZOD_DATETIME.match(value), value


def id_values(tool: str, arguments: dict[str, Any]) -> list[str]:
    """The values of every id field of a call."""
    out: list[str] = []
    for name, value in arguments.items():
        schema = SCHEMAS[tool]["properties"][name]
        if is_id_field(name, schema) and value is not None:
            out += value if isinstance(value, list) else [value]
    return out


def _strings(value: Any, schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _strings(v, schema.get("properties", {}).get(k, {}))]
    if isinstance(value, list):
        return [x for v in value for x in _strings(v, schema.get("items", {}))]
    return [(value, schema)] if isinstance(value, str) else []


# ------------------------------------------------------------------ results as the real tools shape them


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def result_for(tool: str, arguments: dict[str, Any], rng: random.Random) -> Any:
    """A result shaped like the real handler's output schema (packages/mana-tool-registry)."""
    uid = _uid(rng)
    media = [f"media-{rng.randrange(10**6)}" for _ in range(2)]
    shapes: dict[str, Any] = {
        "todo.create": {"task": {"id": uid, "title": "x", "subtasks": [{"id": _uid(rng), "title": "y"}]}},
        "todo.list": {"tasks": [{"id": uid, "title": "x", "priority": "low", "subtasks": None}]},
        "habits.create": {"habit": {"id": uid, "title": "x"}},
        "habits.list": {"habits": [{"id": uid, "title": "x"}, {"id": _uid(rng), "title": "y"}]},
        "journal.add": {"entry": {"id": uid, "content": "x"}},
        "mood.log": {"entry": {"id": uid, "level": 3}},
        "notes.create": {"note": {"id": uid, "title": "x"}},
        "spaces.list": {"spaces": [{"id": f"space-{uid}", "name": "Privat"}], "activeSpaceId": f"space-{uid}"},
        "me.listReferenceImages": {"images": [{"id": f"img-{uid}", "mediaId": media[0], "kind": "face"}]},
        "me.generateWithReference": {"images": [{"mediaId": media[1], "imageUrl": "https://m/1"}], "mode": "edit"},
        "wardrobe.listGarments": {"garments": [{"id": f"g-{uid}", "name": "Jacke", "mediaIds": media}]},
        "wardrobe.listOutfits": {"outfits": [{"id": f"o-{uid}", "garmentIds": [f"g-{uid}"]}]},
        "wardrobe.createOutfit": {"outfit": {"id": f"o-{uid}", "garmentIds": arguments.get("garmentIds", [])}},
        "comic.listStories": {"stories": [{"id": f"s-{uid}", "characterMediaIds": media, "panelImageIds": [uid]}]},
        "comic.createStory": {"story": {"id": f"s-{uid}", "characterMediaIds": media, "panelImageIds": []}},
        "comic.generatePanel": {"mediaId": media[0], "panelIndex": 0, "referenceMediaIds": []},
        "comic.listCharacters": {
            "characters": [{"id": f"c-{uid}", "sourceFaceMediaId": media[0], "variantMediaIds": media}]
        },
        "comic.createCharacter": {"character": {"id": f"c-{uid}", "variantMediaIds": [], "pinnedVariantId": None}},
        "comic.generateVariant": {"characterId": arguments.get("characterId"), "newVariantMediaIds": media},
        "augur.captureSign": {"entryId": f"a-{uid}", "kind": "omen", "source": "x"},
        "augur.listOpenSigns": {"entries": [{"id": f"a-{uid}", "kind": "omen"}]},
    }
    return shapes.get(tool, {"ok": True})


async def play(seed: str, tools: list[ToolDef], *, fail_every: int = 0) -> list[tuple[str, Any, set[str]]]:
    """One scripted tick against tools answering like the real ones: (tool, arguments, ids seen before)."""
    provider = ScriptedProvider(seed, {module_of(t.name): 1.0 for t in tools})
    rng = random.Random(f"results:{seed}")
    transcript: list[Entry] = []
    seen: set[str] = set()
    calls: list[tuple[str, Any, set[str]]] = []
    for _ in range(10):
        turn = await provider.next_turn("", tools, transcript)
        transcript.append(turn)
        if not turn.calls:
            break
        results = []
        for call in turn.calls:
            calls.append((call.name, call.input, set(seen)))
            failed = bool(fail_every) and len(calls) % fail_every == 0
            answer = result_for(call.name, call.input, rng)
            text = f"Tool {call.name} failed: nope {_uid(rng)}" if failed else json.dumps(answer, indent=2)
            results.append(ToolResult(call.id, text, failed))
        for r in results:
            if not r.is_error:
                seen |= _all_strings(json.loads(r.text))
        transcript.append(Results(results))
    return calls


def _all_strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {s for v in value.values() for s in _all_strings(v)}
    if isinstance(value, list):
        return {s for v in value for s in _all_strings(v)}
    return {value} if isinstance(value, str) else set()


def full_pool(rng: random.Random) -> IdPool:
    """Ids of every kind, as a tick that listed everything first would have seen."""
    pool = IdPool()
    for tool in TOOLS:
        pool.learn(tool["name"], json.dumps(result_for(tool["name"], {"characterId": "c-x"}, rng), indent=2))
    return pool


# ------------------------------------------------------------------ the checker is real


def test_the_format_checker_really_checks_uuid_and_date_time() -> None:
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}, "at": {"type": "string", "format": "date-time"}},
    }
    validator = Draft7Validator(schema, format_checker=FORMATS)
    assert validator.is_valid({"id": "3f2b8c1e-9a4d-4e2f-8b7a-1c2d3e4f5a6b", "at": "2026-11-22T10:00:00Z"})
    for bad in ({"id": "3f2b8c1e9a4d4e2f8b7a1c2d3e4f5a6b"}, {"id": "todo-1"}, {"at": "2026-13-01T10:00:00Z"}):
        assert not validator.is_valid(bad), bad
    assert not validator.is_valid({"at": "22.11.2026 10:00"})
    # and the real schemas' patterns bite too
    assert not VALIDATORS["habits.create"].is_valid({"title": "x", "color": "blue"})
    assert not VALIDATORS["mood.log"].is_valid({"level": 3, "emotion": "calm", "time": "9:30"})
    assert not VALIDATORS["habits.create"].is_valid({"title": "x", "colour": "#112233"})  # no unknown keys


# ------------------------------------------------------------------ every tool, many seeds


@pytest.mark.parametrize("tool", sorted(SCHEMAS))
def test_every_real_tool_gets_arguments_its_schema_accepts_over_many_seeds(tool: str) -> None:
    pool = full_pool(random.Random(tool))
    known = pool.known()
    schema = SCHEMAS[tool]
    included: dict[str, int] = dict.fromkeys(schema["properties"], 0)
    for seed in range(300):
        arguments = generate(schema, random.Random(f"{tool}:{seed}"), tool=tool, ids=pool)
        assert arguments is not None, f"{tool} skipped though every kind of id is known"
        check(tool, arguments)
        assert set(id_values(tool, arguments)) <= known
        for name in arguments:
            included[name] += 1
    required = set(schema.get("required", []))
    for name, count in included.items():
        # Required fields always; optional ones sometimes, not always.
        assert count == 300 if name in required else 0 < count < 300, (name, count)


@pytest.mark.parametrize("tool", sorted(SCHEMAS))
def test_a_tool_needing_an_id_nobody_returned_is_skipped_and_the_others_need_none(tool: str) -> None:
    outcomes = [generate(SCHEMAS[tool], random.Random(seed), tool=tool, ids=IdPool()) for seed in range(50)]
    if tool in NEEDS_AN_ID:
        assert outcomes == [None] * 50
    else:
        for arguments in outcomes:
            assert arguments is not None
            check(tool, arguments)
            assert id_values(tool, arguments) == []  # optional ids left out, never invented


def test_ids_of_the_right_kind_fill_each_field() -> None:
    pool = IdPool()
    pool.learn("todo.create", json.dumps({"task": {"id": "T", "subtasks": [{"id": "SUB"}]}}, indent=2))
    pool.learn("habits.list", json.dumps({"habits": [{"id": "H"}]}, indent=2))
    pool.learn("me.listReferenceImages", json.dumps({"images": [{"id": "IMG", "mediaId": "M"}]}, indent=2))
    pool.learn("comic.listStories", json.dumps({"stories": [{"id": "S", "panelImageIds": ["P"]}]}, indent=2))
    pool.learn("comic.listCharacters", json.dumps({"characters": [{"id": "C", "variantMediaIds": ["V"]}]}))
    pool.learn("comic.generateVariant", json.dumps({"characterId": "C", "newVariantMediaIds": ["V2"]}))
    pool.learn("augur.captureSign", json.dumps({"entryId": "E", "kind": "omen"}))
    pool.learn("wardrobe.listOutfits", json.dumps({"outfits": [{"id": "O", "garmentIds": ["G"]}]}))
    picked: dict[str, set[str]] = {}
    for seed in range(100):
        for tool in NEEDS_AN_ID - {"comic.createStory"}:
            arguments = generate(SCHEMAS[tool], random.Random(seed), tool=tool, ids=pool)
            if arguments is not None:
                for name, value in arguments.items():
                    if is_id_field(name, SCHEMAS[tool]["properties"][name]) and value is not None:
                        picked.setdefault(f"{tool}.{name}", set()).update(value if isinstance(value, list) else [value])
    assert picked == {
        "todo.complete.id": {"T"},  # not the subtask's id
        "habits.update.id": {"H"},
        "habits.archive.id": {"H"},
        "me.generateWithReference.referenceMediaIds": {"M"},  # the image's media id, not its row id
        "comic.generatePanel.storyId": {"S"},
        "comic.reorderPanels.storyId": {"S"},
        "comic.reorderPanels.panelImageIds": {"P"},
        "comic.createCharacter.sourceFaceMediaId": {"M"},
        "comic.createCharacter.sourceBodyMediaId": {"M"},
        "comic.generateVariant.characterId": {"C"},
        "comic.pinVariant.characterId": {"C"},
        "comic.pinVariant.variantMediaId": {"V", "V2"},
        "augur.resolveSign.entryId": {"E"},
        "wardrobe.tryOn.outfitId": {"O"},
        "wardrobe.createOutfit.garmentIds": {"G"},
    }


def test_a_result_cut_short_still_gives_the_ids_it_shows_whole() -> None:
    tasks = [{"id": str(uuid.UUID(int=i, version=4)), "title": f"Aufgabe {i}" * 5} for i in range(200)]
    text = bound(json.dumps({"tasks": tasks}, indent=2))
    assert "more characters cut" in text
    pool = IdPool()
    pool.learn("todo.list", text)
    ids = pool.for_field("todo.complete", "id")
    assert 10 < len(ids) < 200 and ids == [t["id"] for t in tasks[: len(ids)]]
    assert parse_json("Tool todo.list failed: boom") is None and parse_json('{"a": [1, 2') is None


def test_any_other_pattern_is_filled_by_the_regex_generator_deterministically() -> None:
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
            "plz": {"type": "string", "pattern": "^\\d{5}$", "minLength": 5, "maxLength": 5},
            "level": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "step": {"type": "integer", "minimum": 3, "maximum": 40, "multipleOf": 5},
            "kinds": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "uniqueItems": True},
            "nested": {"$ref": "#/definitions/Nested"},
            "pick": {"type": ["integer", "null"], "minimum": 2, "maximum": 2},
        },
        "required": ["code", "plz", "level", "step", "kinds", "nested", "pick"],
        "additionalProperties": False,
        "definitions": {
            "Nested": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                    {"properties": {"b": {"type": "string", "minLength": 30, "maxLength": 31}}, "required": ["b"]},
                ]
            }
        },
    }
    validator = Draft7Validator(schema, format_checker=FORMATS)
    values = [generate(schema, random.Random(seed)) for seed in range(200)]
    for value in values:
        assert validator.is_valid(value), (value, [e.message for e in validator.iter_errors(value)])
    assert values == [generate(schema, random.Random(seed)) for seed in range(200)]
    assert len({v["code"] for v in values}) > 100  # really drawn from the pattern, not one canned value


# ------------------------------------------------------------------ the player


async def test_200_scripted_ticks_over_the_real_tools_send_only_valid_arguments_and_seen_ids() -> None:
    called: set[str] = set()
    for seed in range(200):
        for tool, arguments, seen in await play(f"persona-{seed}", DEFS, fail_every=5):
            check(tool, arguments)
            assert set(id_values(tool, arguments)) <= seen, (tool, arguments)
            called.add(tool)
    assert called >= NEEDS_AN_ID  # ids from earlier results really feed the tools that need them


async def test_the_same_seed_and_results_give_the_same_calls() -> None:
    first = [await play(f"p{seed}", DEFS) for seed in range(20)]
    assert first == [await play(f"p{seed}", DEFS) for seed in range(20)]
    assert len({json.dumps([c[:2] for c in calls]) for calls in first}) == 20
    assert all(3 <= len(calls) <= 8 for calls in first)


async def test_the_player_skips_a_tool_whose_id_it_has_not_seen() -> None:
    complete = ToolDef("todo.complete", "", SCHEMAS["todo.complete"])
    create = ToolDef("todo.create", "", SCHEMAS["todo.create"])
    provider = ScriptedProvider("s", {"todo": 1.0})
    turn = await provider.next_turn("", [complete], [])
    assert turn.calls == [] and turn.text  # nothing it can do: the day ends, nothing invented
    for seed in range(30):
        calls = await play(f"s{seed}", [complete, create])
        first_id = next((i for i, (name, _, _) in enumerate(calls) if name == "todo.complete"), None)
        assert first_id is None or first_id > 0 and calls[0][0] == "todo.create"


async def test_failed_results_give_no_ids() -> None:
    complete = ToolDef("todo.complete", "", SCHEMAS["todo.complete"])
    failed = Results([ToolResult("call_1", json.dumps({"task": {"id": str(uuid.uuid4())}}), True)])
    create = Turn("", [ToolCall("call_1", "todo.create", {"title": "x"})])
    turn = await ScriptedProvider("s", {"todo": 1.0}).next_turn("", [complete], [create, failed])
    assert turn.calls == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.text(max_size=8),
    results=st.lists(
        st.tuples(
            st.sampled_from(sorted(SCHEMAS)),
            st.recursive(
                st.tuples(st.sampled_from(["id", "x", "entryId"]), st.uuids()).map(lambda kv: {kv[0]: str(kv[1])})
                | st.fixed_dictionaries({"storyId": st.uuids().map(str), "garmentIds": st.lists(st.uuids().map(str))}),
                lambda inner: st.dictionaries(
                    st.sampled_from(["task", "tasks", "habits", "stories", "entries", "items", "data"]),
                    inner | st.lists(inner, max_size=3),
                    max_size=3,
                ),
                max_leaves=8,
            ),
            st.booleans(),
        ),
        max_size=4,
    ),
)
def test_whatever_the_results_the_player_sends_only_ids_from_successful_ones(
    seed: str, results: list[tuple[str, Any, bool]]
) -> None:
    transcript: list[Entry] = []
    seen: set[str] = set()
    for n, (tool, body, failed) in enumerate(results):
        text = json.dumps(body, indent=2)
        transcript += [Turn("", [ToolCall(f"r{n}", tool, {})]), Results([ToolResult(f"r{n}", text, failed)])]
        if not failed:
            seen |= _all_strings(body)
    turn = asyncio.run(ScriptedProvider(seed, {}).next_turn("", DEFS, transcript))
    for call in turn.calls:
        check(call.name, call.input)
        assert set(id_values(call.name, call.input)) <= seen


# ------------------------------------------------------------------ on the sandbox's real surface


async def test_over_200_scripted_ticks_on_the_sandboxs_default_surface_no_argument_is_refused(tmp_path: Path) -> None:
    config = SandboxConfig(db_path=str(tmp_path / "sb.db"), seed_secret=SEED_SECRET, service_key=SERVICE_KEY)
    assert config.mcp_surface == "real"  # the default: the real gateway's tools, schemas and validation
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=30) as control:
        world = Mana(sandbox, config, control)
        modules = sorted({module_of(name) for name in SCHEMAS})
        for n in range(8):
            spec = {"name": f"spieler{n}", "archetype": "t", "systemPrompt": "", "tickCadence": "hourly"}
            await world.post("personas", {**spec, "moduleMix": dict.fromkeys(modules, 1.0), "options": {}})
        ticks, hour = 0, 9
        async with open_runner(world.settings(tmp_path, persona_concurrency=10)) as runtime:
            while ticks < 200:
                await world.post("clock", {"now": f"2026-11-{25 + hour // 24}T{hour % 24:02d}:30:00+00:00"})
                ticks += len((await run_once(runtime)).ticks)
                hour += 1
        calls, actions = await world.get("mcp-calls"), await world.get("actions")
    refused = [c for c in calls if "Invalid arguments for tool" in (c["errorText"] or "")]
    assert refused == [] and len(calls) > 3 * 200
    assert not [a for a in actions if "Invalid arguments" in (a.get("errorMessage") or "")]
    for c in calls:
        check(c["tool"], c["arguments"])
    # Ids read from earlier results really reach the tools that need them, and Mana knows them.
    worked = {c["tool"] for c in calls if not c["isError"]}
    assert {"todo.complete", "habits.update", "augur.resolveSign"} <= worked
