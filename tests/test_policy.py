"""The tool policy, the error-row text and the model-facing names: pure rules, checked at their edges."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import metrics
from runner.agent.policy import DESTRUCTIVE_VERBS, Decision, ToolPolicy, destructive_verb, parse_patterns, summary
from runner.agent.providers.anthropic import api_names
from runner.agent.rating import RATING_TOOL
from runner.mana.mcp import ERROR_MESSAGE_LIMIT, error_message
from runner.settings import SettingsError, load_settings

TOOLS_JSON = Path(__file__).resolve().parents[1] / "runner" / "sandbox" / "mana-tools.json"  # the real answer, copied
REAL_NAMES = [
    "habits.create", "habits.list", "habits.update", "habits.archive", "journal.add", "me.listReferenceImages",
    "me.generateWithReference", "mood.log", "mood.today", "mood.recent", "notes.create", "notes.search",
    "spaces.list", "todo.create", "todo.list", "todo.complete", "wardrobe.listGarments", "wardrobe.listOutfits",
    "wardrobe.createOutfit", "wardrobe.tryOn", "comic.listStories", "comic.createStory", "comic.generatePanel",
    "comic.reorderPanels", "comic.listCharacters", "comic.createCharacter", "comic.generateVariant",
    "comic.pinVariant", "augur.captureSign", "augur.resolveSign", "augur.listOpenSigns", "augur.consultOracle",
    "augur.yearRecap",
]  # fmt: skip


@dataclass(frozen=True)
class Served:
    name: str
    read_only_hint: bool | None = None
    destructive_hint: bool | None = None


def _decide(policy: ToolPolicy, *tools: Served | str) -> dict[str, Decision]:
    served = [t if isinstance(t, Served) else Served(t) for t in tools]
    return {d.name: d for d in policy.decide(served)}


def test_the_real_surface_is_offered_whole_by_default() -> None:
    # The real gateway sends no annotations (contract §5): the default must not read that as "destructive".
    real = json.loads(TOOLS_JSON.read_text())
    assert [t["name"] for t in real["tools"]] == REAL_NAMES and not any("annotations" in t for t in real["tools"])
    decisions = ToolPolicy().decide([Served(n) for n in REAL_NAMES])
    assert [d.name for d in decisions if d.offered] == REAL_NAMES
    assert {d.rule for d in decisions} == {"default"}
    # The registry's own hints agree: none of the served tools is destructive today.
    assert {e["policyHint"] for e in real["registry"].values()} <= {"read", "write"}


@pytest.mark.parametrize(
    ("name", "verb"),
    [
        ("todo.delete", "delete"),
        ("todo.deleteAll", "delete"),
        ("todo.deleteall", "delete"),
        ("notes.REMOVE_tag", "remove"),
        ("space.PurgeTrash", "purge"),
        ("habits.reset", "reset"),
        ("db.drop", "drop"),
        ("keys.revoke", "revoke"),
        ("files.wipe", "wipe"),
        ("files.erase", "erase"),
        ("files.destroy", "destroy"),
        ("todo.clearCompleted", "clear"),
        ("comic.panels.delete", "delete"),  # any dotted part after the module
        ("delete", "delete"),  # no module: the whole name is the verb
        ("todo.create", None),
        ("delete.create", None),  # the module is not a verb
        ("augur.resolveSign", None),
        ("comic.reorderPanels", None),
        ("habits.archive", None),  # reversible; the registry calls it `write`
    ],
)
def test_destructive_verbs_match_the_verb_after_the_module_as_a_prefix(name: str, verb: str | None) -> None:
    assert destructive_verb(name) == verb
    decision = _decide(ToolPolicy(), name)[name]
    assert decision.offered is (verb is None)
    if verb is not None:
        assert decision.rule == "destructive-verb" and repr(verb) in decision.reason


def test_the_verb_list_covers_the_issue_and_is_lowercase() -> None:
    assert {"delete", "remove", "purge", "destroy", "wipe", "erase", "reset", "drop", "revoke"} <= set(
        DESTRUCTIVE_VERBS
    )
    assert all(v == v.lower() for v in DESTRUCTIVE_VERBS)


def test_allow_globs_narrow_and_deny_globs_win() -> None:
    policy = ToolPolicy.from_settings("todo.*, comic.generate*", "todo.complete")
    decisions = _decide(policy, "todo.create", "todo.complete", "comic.generatePanel", "comic.listStories", "Todo.list")
    assert {n for n, d in decisions.items() if d.offered} == {"todo.create", "comic.generatePanel"}
    assert decisions["todo.create"].rule == "allow-setting" and "'todo.*'" in decisions["todo.create"].reason
    assert decisions["todo.complete"].rule == "deny-setting"  # deny wins over a matching allow
    assert decisions["comic.listStories"].rule == "not-in-allow"
    assert decisions["Todo.list"].rule == "not-in-allow"  # globs are case-sensitive, like MCP names


def test_no_setting_offers_a_tool_a_deny_rule_caught() -> None:
    policy = ToolPolicy.from_settings("*", "")
    decisions = _decide(
        policy,
        "todo.deleteAll",
        Served("todo.list", read_only_hint=True, destructive_hint=True),
        Served("todo.wipeOut", read_only_hint=True),
    )
    assert not any(d.offered for d in decisions.values())
    assert decisions["todo.list"].rule == "destructive-hint" and "destructive wins" in decisions["todo.list"].reason
    assert decisions["todo.wipeOut"].rule == "destructive-verb"


def test_hints_decide_when_the_server_sends_them() -> None:
    decisions = _decide(
        ToolPolicy(),
        Served("a.list", read_only_hint=True),
        Served("a.create", read_only_hint=False, destructive_hint=False),
        Served("a.archive", read_only_hint=False, destructive_hint=True),
        Served("a.bulkImport"),
    )
    assert [(n, d.offered, d.rule) for n, d in decisions.items()] == [
        ("a.list", True, "read-only-hint"),
        ("a.create", True, "non-destructive-hint"),
        ("a.archive", False, "destructive-hint"),
        ("a.bulkImport", True, "default"),
    ]
    # An operator's narrowing applies to annotated tools too.
    narrowed = _decide(ToolPolicy.from_settings("", "a.*"), Served("a.list", read_only_hint=True))
    assert narrowed["a.list"].rule == "deny-setting"


def test_a_name_served_twice_is_withheld_in_every_copy() -> None:
    decisions = ToolPolicy().decide(
        [Served("todo.list", read_only_hint=True), Served("todo.list", destructive_hint=True), Served("todo.create")]
    )
    assert [(d.name, d.offered, d.rule) for d in decisions] == [
        ("todo.list", False, "duplicate-name"),
        ("todo.list", False, "duplicate-name"),
        ("todo.create", True, "default"),
    ]
    assert summary(decisions) == {"duplicate-name": 2}


@pytest.mark.parametrize("name", ["", "x" * 129, "todo.create\n", "todo create", "tödo.create", "a/b"])
def test_names_outside_the_mcp_alphabet_are_withheld(name: str) -> None:
    decision = ToolPolicy().decide([Served(name)])[0]
    assert (decision.offered, decision.rule) == (False, "illegal-name")


@pytest.mark.parametrize("value", ["todo create", "todo.[abc", "todo.]", "todo.[[a]]", "über.*", "todo/*"])
def test_bad_patterns_are_a_one_line_error(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_patterns(value)
    assert "\n" not in str(caught.value)


def test_patterns_parse_with_spaces_and_empty_items() -> None:
    assert parse_patterns(" todo.* ,, comic.generate*,") == ("todo.*", "comic.generate*")
    assert parse_patterns("") == ()
    assert parse_patterns("todo.[!d]*") == ("todo.[!d]*",)


@pytest.mark.parametrize("variable", ["persona_tools_allow", "persona_tools_deny"])
def test_a_bad_pattern_setting_names_its_variable(variable: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{variable.upper()}: 'todo create' is not a tool-name pattern"):
        load_settings(**{variable: "todo.*,todo create"})
    assert load_settings(**{variable: "todo.*"}).tool_policy == ToolPolicy(
        **{variable.removeprefix("persona_tools_"): ("todo.*",)}
    )


# --- errorMessage ---------------------------------------------------------------------------

VALIDATION = """MCP error -32602: Input validation error: Invalid arguments for tool habits.create: [
  {
    "validation": "regex",
    "code": "invalid_string",
    "message": "Invalid",
    "path": [
      "color"
    ]
  },
  {
    "code": "too_small",
    "minimum": 1,
    "type": "string",
    "inclusive": true,
    "exact": false,
    "message": "String must contain at least 1 character(s)",
    "path": [
      "title"
    ]
  }
]"""


def test_a_validation_error_keeps_each_field_and_message() -> None:
    assert error_message(VALIDATION) == (
        "Invalid arguments for tool habits.create: color: Invalid (regex); "
        "title: String must contain at least 1 character(s)"
    )


def test_zod4_issues_and_nested_paths_are_kept() -> None:
    text = (
        "MCP error -32602: Input validation error: Invalid arguments for tool todo.create: "
        '[{"origin":"string","code":"invalid_format","format":"date-time","path":["due","at"],'
        '"message":"Invalid ISO datetime"}, {"code":"invalid_type","path":[],"message":"Required"}]'
    )
    assert error_message(text) == (
        "Invalid arguments for tool todo.create: due.at: Invalid ISO datetime (date-time); (input): Required"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Tool todo.list failed: mana-sync pull failed: 401 Unauthorized\n  token is expired",
            "Tool todo.list failed: mana-sync pull failed: 401 Unauthorized token is expired",
        ),
        (
            "Tool todo.create not allowed: rate-limit: 30 calls in 60s",
            "Tool todo.create not allowed: rate-limit: 30 calls in 60s",
        ),
        ("Invalid input for todo.create: title: Required; due: Invalid", None),
        ("MCP error -32603: Internal error", "Internal error"),
        ("   \n\t ", "error"),
        # A validation head whose list is not JSON stays as it was, whitespace collapsed.
        ("Invalid arguments for tool x.y: [\n  not json", "Invalid arguments for tool x.y: [ not json"),
    ],
)
def test_error_texts_keep_their_informative_part(text: str, expected: str | None) -> None:
    assert error_message(text) == (expected if expected is not None else text)


@given(st.text(max_size=3000))
def test_error_message_is_one_bounded_line_for_any_text(text: str) -> None:
    out = error_message(text)
    assert 1 <= len(out) <= ERROR_MESSAGE_LIMIT
    assert not re.search(r"\s{2}|[\n\r\t]", out)


# --- model-facing names ---------------------------------------------------------------------

_LEGAL = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_names = st.lists(
    st.one_of(
        st.text(max_size=80),
        st.from_regex(r"[a-z]{1,3}[._][a-z]{1,3}", fullmatch=True),
        st.sampled_from(["todo.create", "todo_create", "tool", RATING_TOOL, "submit.ratings", "", "x" * 70]),
    ),
    max_size=40,
)


@settings(max_examples=400)
@given(_names)
def test_api_names_are_legal_collision_free_and_stable_for_any_list(names: list[str]) -> None:
    mapping = api_names(names)
    assert set(mapping) == set(names)
    assert all(_LEGAL.fullmatch(v) for v in mapping.values())
    assert len(set(mapping.values())) == len(mapping)  # no two tools share a model-facing name
    assert RATING_TOOL not in mapping.values()  # the rating tool's name stays free
    assert api_names(list(reversed(names))) == mapping


def test_api_names_keep_the_plain_mapping_when_it_is_free() -> None:
    assert api_names(REAL_NAMES) == {n: n.replace(".", "_") for n in REAL_NAMES}


def test_tool_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_tool_labels", set())  # the process's own labels stay as they were
    labels = {metrics.tool_label(f"crafted.tool{i}") for i in range(metrics.MAX_TOOL_LABELS + 50)}
    assert len(metrics._tool_labels) == metrics.MAX_TOOL_LABELS
    assert metrics.tool_label("crafted.tool0") == "crafted.tool0"  # a known name keeps its label
    assert metrics.OTHER_TOOL in labels and len(labels) <= metrics.MAX_TOOL_LABELS + 1
    assert metrics.tool_label("x" * 500) == metrics.OTHER_TOOL


def test_api_names_survive_names_crafted_to_hit_the_hashed_form() -> None:
    # A server that knows the rule can serve the hashed form of another tool's name as a name of its own.
    crafted = [f"a_b_{hashlib.sha256(f'{salt}:a~b'.encode()).hexdigest()[:8]}" for salt in range(3)]
    names = ["a~b", "a_b", *crafted, "submit_ratings", "submit.ratings"]
    mapping = api_names(names)
    assert len(set(mapping.values())) == len(names) and RATING_TOOL not in mapping.values()
    assert all(mapping[c] == c for c in crafted)  # legal names keep themselves; the illegal one moves on
