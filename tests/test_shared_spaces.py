"""Ticks in shared spaces (issue 15), proven on what the sandbox received and what the journal kept:
over many windows about PERSONA_SHARED_SPACE_SHARE of the ticks play in the family space, exactly
those the tick id draws, each in a new MCP session carrying that space, offered only the modules
the space type allows, with a day prompt that says where and with whom."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from conftest import WEEKDAY, Mana, open_runner
from family import ANNA

from runner.agent.loop import Entry, RatingReply, ToolDef, Turn
from runner.agent.providers.scripted import ScriptedProvider
from runner.dispatch import run_once
from runner.persona import DuePersona, module_of
from runner.spaces import draw

FAMILY_MODULES = {"notes", "wardrobe", "comic"}  # of the served modules, the ones `family` allows


class Recording:
    """The scripted player, remembering each tick's system prompt and offered tools."""

    def __init__(self, inner: ScriptedProvider, seen: list[tuple[str, list[str]]]) -> None:
        self.inner, self.seen = inner, seen

    async def next_turn(self, system: str, tools: list[ToolDef], transcript: list[Entry]) -> Turn:
        if not transcript:
            self.seen.append((system, sorted(t.name for t in tools)))
        return await self.inner.next_turn(system, tools, transcript)

    async def rate(
        self, system: str, tools: list[ToolDef], transcript: list[Entry], prompt: str, modules: list[str]
    ) -> RatingReply:
        return await self.inner.rate(system, tools, transcript, prompt, modules)


async def test_about_the_share_of_windows_play_in_the_shared_space(plan: Mana, tmp_path: Path) -> None:
    share, windows = 0.5, 12
    seen: dict[str, list[tuple[str, list[str]]]] = {}

    def make(persona: DuePersona, tick_id: str) -> Recording:
        return Recording(ScriptedProvider(f"s:{tick_id}", persona.module_mix), seen.setdefault(tick_id, []))

    settings = plan.settings(tmp_path, persona_shared_space_share=share)
    cast = {p["email"]: p for p in await plan.get("personas")}
    family = next(s for s in cast[ANNA]["spaces"] if s["type"] == "family")["id"]
    personal = {email: next(s["id"] for s in p["spaces"] if s["type"] == "personal") for email, p in cast.items()}
    ticks: list[tuple[str, str]] = []
    async with open_runner(settings, make) as runtime:
        for day in range(windows):
            now = datetime.fromisoformat(WEEKDAY) + timedelta(days=day)
            await plan.post("clock", {"now": now.isoformat()})
            report = await run_once(runtime)
            assert len(report.ticks) == 2 and report.backlog == 0
            ticks += [(p.email, tick_id) for p, tick_id in report.ticks]
        kept = {t: (await runtime.journal.tick_space(t), await runtime.journal.tick_space_type(t)) for _, t in ticks}

    shared = [t for _, t in ticks if kept[t][1] == "family"]
    # Exactly the windows the tick id draws, so a retried tick plays where it played before …
    assert {t for _, t in ticks if draw(t, "shared") < share} == set(shared)
    assert 4 <= len(shared) <= 20  # … and about the share of them (24 ticks, expected 12)
    for email, tick_id in ticks:
        (space_id, via), space_type = kept[tick_id]  # type: ignore[misc]
        in_family = tick_id in shared
        assert (space_id, via, space_type) == ((family, "list", "family") if in_family else
                                               (personal[email], via, "personal")), tick_id  # fmt: skip
        [(system, offered)] = seen[tick_id]
        if in_family:
            assert {module_of(name) for name in offered} == FAMILY_MODULES, offered
            other = "ben" if email == ANNA else "anna"  # the sandbox names its users by their persona name
            assert "„Familie Schmidt“ (ein family-Space)" in system and f"zusammen mit {other}." in system
        else:
            assert {"todo", "mood", "habits"} <= {module_of(name) for name in offered}
            assert "Familie Schmidt" not in system

    # What mana-mcp received: every call of a family tick in the family space, and only allowed modules there.
    calls = await plan.get("mcp-calls")
    in_family = [c for c in calls if c["spaceId"] == family]
    assert in_family and {module_of(c["tool"]) for c in in_family} <= FAMILY_MODULES
    assert {c["spaceId"] for c in calls} <= {family, *personal.values()}
