"""Scope probes: does a shared space show a persona's personal data? Model-free and deterministic.

Mana's mana-sync returns a user's rows from every space they belong to, and several read tools do
not filter by the active space (contract §8), so an agent acting for Anna in the family space can
read Anna's personal todos. A probe checks that on every window it runs:

1. the persona writes a canary into its personal space with each text-carrying write tool;
2. in each of its shared spaces it reads with every read tool of those modules (and `me`);
3. a canary that comes back is a leak: which tool, which space, what came back;
4. the positive direction: a canary written into the shared space must be visible there to
   another member (on Mana today it is not: one member's encrypted row breaks the others' reads).

Every call is an ordinary, journaled tool call (the caller's `Call`); the verdict is one more
action row, tool `__probe`, whose error message starts with `scope leak:` when a canary leaked
(the report's cause class) or `shared space unreadable:` when only the positive check failed.
Canaries are short, marked `persona-probe`, derived from the tick id, and completed, archived or
resolved afterwards where a tool allows it; notes, mood entries, outfits and stories stay (no
tool removes them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from runner import metrics
from runner.agent.policy import ToolPolicy
from runner.log import get_logger
from runner.mana.auth import SpaceInfo
from runner.mana.mcp import McpGateway, ToolOutcome
from runner.persona import LEAK_PREFIX, module_of
from runner.session import PersonaSession
from runner.spaces import SpaceModules

log = get_logger("runner.probe")

UNREADABLE_PREFIX = "shared space unreadable:"
MARK = "persona-probe"  # every canary carries it: probe data, findable and recognisable
NIL_UUID = "00000000-0000-4000-8000-000000000000"  # a reference the schema needs; nothing it names exists
EVIDENCE_CHARS = 120

Args = Callable[[str], dict[str, Any]]
# One journaled tool call on a given MCP session: the tick's own rows.
Call = Callable[[McpGateway, str, dict[str, Any]], Awaitable[ToolOutcome]]
OpenGateway = Callable[[PersonaSession, str], AbstractAsyncContextManager[McpGateway]]
MemberSession = Callable[[str], Awaitable[PersonaSession]]


@dataclass(frozen=True, slots=True)
class Writer:
    """A write tool that carries text: how to put a canary into it, and how to take it back if a tool can."""

    tool: str
    args: Args
    id_at: tuple[str, ...] = ()  # where the answer names the new row, e.g. ("task", "id")
    undo: tuple[str, Args] | None = None  # the tool that completes, archives or resolves it, given its id


# From the registry (contract §5, mana-tools.json): the policy hints are not sent over MCP, so the
# probe's tools are named here. Reads take their largest page, so a long history cannot hide a canary.
WRITERS: tuple[Writer, ...] = (
    Writer("notes.create", lambda c: {"title": c, "content": c}),
    Writer("todo.create", lambda c: {"title": c}, ("task", "id"), ("todo.complete", lambda i: {"id": i})),
    Writer(
        "habits.create",
        lambda c: {"title": c},
        ("habit", "id"),
        ("habits.archive", lambda i: {"id": i, "archived": True}),
    ),
    Writer("mood.log", lambda c: {"level": 5, "emotion": "neutral", "notes": c}),
    Writer("wardrobe.createOutfit", lambda c: {"name": c, "garmentIds": [NIL_UUID]}),
    Writer("comic.createStory", lambda c: {"title": c, "style": "comic", "characterMediaIds": [NIL_UUID]}),
    Writer(
        "augur.captureSign",
        lambda c: {"kind": "hunch", "source": c, "claim": c},
        ("entryId",),
        ("augur.resolveSign", lambda i: {"entryId": i, "outcome": "not-fulfilled", "note": MARK}),
    ),
)
READERS: dict[str, dict[str, Any]] = {
    "notes.search": {"query": MARK, "includeArchived": True, "limit": 100},
    "todo.list": {"includeCompleted": True, "limit": 500},
    "habits.list": {"includeArchived": True},
    "mood.today": {},
    "mood.recent": {"days": 1, "limit": 200},
    "me.listReferenceImages": {},
    "wardrobe.listGarments": {"limit": 200},
    "wardrobe.listOutfits": {"limit": 200},
    "comic.listStories": {"limit": 200},
    "comic.listCharacters": {"limit": 200},
    "augur.listOpenSigns": {"limit": 100},
    "augur.consultOracle": {"kind": "hunch", "sourceCategory": "other", "vibe": "mysterious"},
    "augur.yearRecap": {},
}


@dataclass(frozen=True, slots=True)
class Leak:
    tool: str
    space: SpaceInfo
    evidence: str

    def __str__(self) -> str:
        return f"{self.tool} in {self.space.type} space {self.space.slug or self.space.id} returned {self.evidence}"


@dataclass(slots=True)
class Verdict:
    leaks: list[Leak] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # positive checks that failed, with why
    calls: int = 0

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.unreadable

    @property
    def message(self) -> str | None:
        """The `__probe` row's error message; the leak first, so its prefix classifies the row."""
        parts = []
        if self.leaks:
            parts.append(f"{LEAK_PREFIX} " + "; ".join(str(leak) for leak in self.leaks))
        if self.unreadable:
            parts.append(f"{UNREADABLE_PREFIX} " + "; ".join(self.unreadable))
        return " | ".join(parts) or None


def canary(tick_id: str, key: str) -> str:
    """Short, marked as probe data, and the same for the same tick: a rerun writes the same text."""
    return f"{MARK} {hashlib.sha256(f'{tick_id}:{key}'.encode()).hexdigest()[:12]}"


def _excerpt(text: str, found: str) -> str:
    at = text.find(found)
    start = max(0, at - EVIDENCE_CHARS // 2)
    return " ".join(text[start : at + len(found) + EVIDENCE_CHARS // 2].split())


def _row_id(outcome: ToolOutcome, path: tuple[str, ...]) -> str | None:
    try:
        value: Any = json.loads(outcome.text)
    except ValueError:
        return None
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


@dataclass(slots=True)
class _Written:
    writer: Writer
    text: str
    row_id: str | None


class Probe:
    """One probe for one persona in one tick; it uses only tools the tool policy offers (PERSONA_TOOLS_*)."""

    def __init__(
        self,
        session: PersonaSession,
        tick_id: str,
        call: Call,
        open_gateway: OpenGateway,
        member_session: MemberSession,
        policy: ToolPolicy,
    ) -> None:
        self._session, self._tick_id, self._call = session, tick_id, call
        self._open, self._member, self._policy = open_gateway, member_session, policy
        self._offered: set[str] = set()
        self.verdict = Verdict()

    async def _do(self, gateway: McpGateway, tool: str, args: dict[str, Any]) -> ToolOutcome:
        self.verdict.calls += 1
        return await self._call(gateway, tool, args)

    async def _write(self, gateway: McpGateway, writer: Writer, key: str) -> _Written | None:
        text = canary(self._tick_id, key)
        outcome = await self._do(gateway, writer.tool, writer.args(text))
        return _Written(writer, text, _row_id(outcome, writer.id_at) if writer.id_at else None) if outcome.ok else None

    async def _undo(self, gateway: McpGateway, written: list[_Written]) -> None:
        for item in written:
            if item.writer.undo is not None and item.row_id is not None:
                tool, args = item.writer.undo
                if tool in self._offered:
                    await self._do(gateway, tool, args(item.row_id))

    async def run(self, shared: list[SpaceInfo], modules: SpaceModules) -> Verdict:
        async with self._open(self._session, self._session.space.id) as personal:
            self._offered = {d.name for d in self._policy.decide(await personal.tools()) if d.offered}
            writers = [w for w in WRITERS if w.tool in self._offered]
            planted = [w for w in [await self._write(personal, w, w.tool) for w in writers] if w is not None]
            for space in shared:
                await self._in_space(space, planted, writers, modules)
            await self._undo(personal, planted)
        self._report()
        return self.verdict

    async def _in_space(
        self, space: SpaceInfo, planted: list[_Written], writers: list[Writer], modules: SpaceModules
    ) -> None:
        async with self._open(self._session, space.id) as gateway:
            for tool, args in READERS.items():
                if tool not in self._offered:
                    continue
                outcome = await self._do(gateway, tool, args)
                for item in planted if outcome.ok else []:
                    if item.text in outcome.text:
                        evidence = f"the {item.writer.tool} canary: …{_excerpt(outcome.text, item.text)}…"
                        self.verdict.leaks.append(Leak(tool, space, evidence))
                        break
            # The positive direction, with a module a person in this space could use.
            writer = next((w for w in writers if space.type and modules.allows(space.type, module_of(w.tool))), None)
            written = await self._write(gateway, writer, f"{space.id}:{writer.tool}") if writer is not None else None
            if written is not None:
                await self._seen_by_another(space, written)
                await self._undo(gateway, [written])

    async def _seen_by_another(self, space: SpaceInfo, written: _Written) -> None:
        me = self._session.email.lower()
        others = sorted(m.email.lower() for m in await self._session.members(space.id) if m.email.lower() != me)
        if not others:
            return  # nobody else to see it: nothing to check
        reads = [t for t in READERS if module_of(t) == module_of(written.writer.tool) and t in self._offered]
        member = await self._member(others[0])
        why = "not in any answer"
        async with self._open(member, space.id) as gateway:
            for tool in reads:
                outcome = await self._do(gateway, tool, READERS[tool])
                if outcome.ok and written.text in outcome.text:
                    return
                if not outcome.ok:
                    why = outcome.text
        where = space.slug or space.id
        self.verdict.unreadable.append(
            f"{written.writer.tool} canary in {where} not visible to {others[0]} ({', '.join(reads)}: {why})"
        )

    def _report(self) -> None:
        verdict = self.verdict
        metrics.SCOPE_PROBES.labels(verdict="ok" if verdict.ok else "leak" if verdict.leaks else "unreadable").inc()
        for leak in verdict.leaks:
            metrics.SCOPE_LEAKS.labels(tool=metrics.tool_label(leak.tool)).inc()
        if verdict.leaks:
            log.error("scope leak: a shared space shows personal data", leaks=[str(leak) for leak in verdict.leaks])
        elif verdict.unreadable:
            log.warning("shared space unreadable to another member", failures=verdict.unreadable)
        else:
            log.info("scope probe ok", calls=verdict.calls)
