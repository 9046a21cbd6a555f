"""The one tool policy: which served tools a persona is offered, and why each other one is not.

The real Mana gateway sends no MCP annotations (contract §5): the MCP default for a tool
without annotations ("destructive") would withhold every tool and every persona would play
a silent empty day. So hints decide when the server sends them, settings decide otherwise:

  1. a name served more than once      -> withheld (which copy would be called is unknowable)
  2. a name that is not a legal MCP name -> withheld (it would end in rows and metric labels)
  3. an input schema over MAX_SCHEMA_CHARS -> withheld (it would go to the model on every turn)
  4. destructiveHint true               -> withheld, also next to readOnlyHint true (destructive wins)
  5. PERSONA_TOOLS_DENY matches         -> withheld
  6. a destructive verb (built-in list) -> withheld
  7. PERSONA_TOOLS_ALLOW set, no match  -> withheld
  otherwise offered (readOnlyHint true, destructiveHint false, an allow pattern, or the default).

Any withholding rule wins over any offering one: no setting and no hint offers a tool a deny
rule caught. The tick asks `decide` once per tick and hands the model only what it offers;
`_JournaledCalls` refuses every other name, so a withheld tool never reaches Mana even when
the model asks for it.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from runner.persona import module_of

# Matched on each dotted part after the module, case-insensitively, as a prefix: `todo.deleteAll`,
# `notes.remove_tag` and `space.PurgeTrash` are caught. A prefix also catches a harmless
# `ui.dropdownItems`; that is the price of never letting `todo.deleteall` through.
DESTRUCTIVE_VERBS: tuple[str, ...] = (
    "clear",
    "delete",
    "destroy",
    "discard",
    "drop",
    "erase",
    "expunge",
    "nuke",
    "obliterate",
    "overwrite",
    "purge",
    "remove",
    "reset",
    "revoke",
    "trash",
    "truncate",
    "unlink",
    "wipe",
)

# The real gateway's largest input schema is under 2 000 characters (mana-tools.json); a schema
# far beyond that is a server bug or an attack, and the model would be sent it on every turn.
MAX_SCHEMA_CHARS = 32_000

# The MCP spec's tool-name alphabet and length (sdk-notes.md).
LEGAL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
# A pattern may use that alphabet plus fnmatch's wildcards.
_PATTERN = re.compile(r"[A-Za-z0-9._\-*?\[\]!]{1,128}")

Rule = Literal[
    "duplicate-name",
    "illegal-name",
    "schema-too-large",
    "destructive-hint",
    "deny-setting",
    "destructive-verb",
    "space-type",
    "not-in-allow",
    "read-only-hint",
    "non-destructive-hint",
    "allow-setting",
    "default",
]


class Hinted(Protocol):
    """What the policy needs to know of a served tool (the MCP client's ToolSpec has it)."""

    @property
    def name(self) -> str: ...

    @property
    def read_only_hint(self) -> bool | None: ...

    @property
    def destructive_hint(self) -> bool | None: ...

    @property
    def input_schema(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    name: str
    offered: bool
    rule: Rule
    reason: str  # one line an operator reads in logs and in `python -m runner tools`


def parse_patterns(value: str) -> tuple[str, ...]:
    """`todo.*, comic.generate*` -> ("todo.*", "comic.generate*"); a bad pattern is a one-line ValueError."""
    patterns: list[str] = []
    for raw in value.split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        if not _PATTERN.fullmatch(pattern):
            raise ValueError(
                f"{pattern[:60]!r} is not a tool-name pattern "
                "(letters, digits, '.', '_', '-' and the wildcards * ? [...])"
            )
        if not _brackets_balanced(pattern):
            raise ValueError(f"{pattern[:60]!r} has an unclosed or stray bracket")
        patterns.append(pattern)
    return tuple(patterns)


def _brackets_balanced(pattern: str) -> bool:
    depth = 0
    for char in pattern:
        if char == "[":
            if depth:
                return False
            depth = 1
        elif char == "]":
            if not depth:
                return False
            depth = 0
    return depth == 0


def destructive_verb(name: str) -> str | None:
    """The built-in destructive verb a tool name carries after its module, if any."""
    parts = name.split(".")
    verbs = parts[1:] if len(parts) > 1 else parts
    for part in verbs:
        lowered = part.casefold()
        for verb in DESTRUCTIVE_VERBS:
            if lowered.startswith(verb):
                return verb
    return None


@dataclass(frozen=True, slots=True)
class SpaceScope:
    """The shared space a tick plays in: a person there could use only the modules its type allows
    (Mana's SPACE_MODULE_ALLOWLIST, enforced by the web app alone), so the persona is offered only those."""

    type: str
    modules: frozenset[str] | None  # None: every module (the personal space)


@dataclass(frozen=True, slots=True)
class ToolPolicy:
    allow: tuple[str, ...] = ()  # empty: every tool no deny rule catches
    deny: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, allow: str, deny: str) -> ToolPolicy:
        """PERSONA_TOOLS_ALLOW / PERSONA_TOOLS_DENY as settings.py read (and checked) them."""
        return cls(parse_patterns(allow), parse_patterns(deny))

    def decide(self, served: Sequence[Hinted], scope: SpaceScope | None = None) -> list[Decision]:
        """One decision per served tool, in the server's order; `scope` for a tick in a shared space."""
        counts = Counter(t.name for t in served)
        return [self._one(tool, counts[tool.name], scope) for tool in served]

    def _one(self, tool: Hinted, copies: int, scope: SpaceScope | None) -> Decision:
        name = tool.name

        def withheld(rule: Rule, reason: str) -> Decision:
            return Decision(name, False, rule, f"withheld: {reason}")

        def offered(rule: Rule, reason: str) -> Decision:
            return Decision(name, True, rule, f"offered: {reason}")

        if copies > 1:
            return withheld("duplicate-name", f"the server lists this name {copies} times")
        if not LEGAL_NAME.fullmatch(name):
            return withheld("illegal-name", "not a legal MCP tool name ([A-Za-z0-9._-], 1-128 characters)")
        if (size := len(json.dumps(tool.input_schema, ensure_ascii=False, default=str))) > MAX_SCHEMA_CHARS:
            return withheld("schema-too-large", f"its input schema has {size} characters (limit {MAX_SCHEMA_CHARS})")
        if tool.destructive_hint is True:
            both = " (readOnlyHint true too: contradictory hints, destructive wins)" if tool.read_only_hint else ""
            return withheld("destructive-hint", f"the server marks it destructiveHint true{both}")
        if (pattern := _first_match(name, self.deny)) is not None:
            return withheld("deny-setting", f"PERSONA_TOOLS_DENY pattern {pattern!r}")
        if (verb := destructive_verb(name)) is not None:
            return withheld("destructive-verb", f"verb {verb!r} is on the built-in destructive list")
        if scope is not None and scope.modules is not None and (module := module_of(name)) not in scope.modules:
            return withheld("space-type", f"module {module!r} is not offered in a {scope.type} space")
        allowed_by = _first_match(name, self.allow)
        if self.allow and allowed_by is None:
            return withheld("not-in-allow", "matches no PERSONA_TOOLS_ALLOW pattern")
        if tool.read_only_hint is True:
            return offered("read-only-hint", "the server marks it readOnlyHint true")
        if tool.destructive_hint is False:
            return offered("non-destructive-hint", "the server marks it destructiveHint false")
        if allowed_by is not None:
            return offered("allow-setting", f"PERSONA_TOOLS_ALLOW pattern {allowed_by!r}")
        return offered("default", "no hints; no deny rule matches")


def _first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    # Case-sensitive like MCP names themselves: `Todo.*` does not select `todo.create`.
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def summary(decisions: Sequence[Decision]) -> dict[str, int]:
    """Withheld tools counted by rule, e.g. {"destructive-verb": 2}: what a log line and an error row say."""
    return dict(sorted(Counter(d.rule for d in decisions if not d.offered).items()))
