"""Shared spaces: the declared ones (config/spaces.toml), Mana's allowlist per space type, and provisioning.

`python -m runner spaces` compares the file with what mana-auth holds; `--apply` makes it so through
Better Auth's organization routes (contract §8), each call made by the persona it belongs to, with its
own cookie: the owner creates the space and invites, each member lists its invitations and accepts.
Provisioning only ever adds: it never deletes a space, never removes or demotes a member, and never
touches a personal space. Everything it can judge without mana-auth (the file, the types, the
emails, duplicate slugs) is judged before the first call, and every member signs in before the first
change, so bad input changes nothing. A refusal halfway leaves what was done, and the next
`spaces` shows what remains.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.mana.auth import Member, SpaceInfo

if TYPE_CHECKING:  # the settings read this module's files; only provisioning needs sessions
    from runner.session import PersonaSession

CONFIG = Path(__file__).resolve().parents[1] / "config"
DEFAULT_SPACES_FILE = CONFIG / "spaces.toml"
DEFAULT_SPACE_MODULES_FILE = CONFIG / "space-modules.json"
PERSONA_EMAIL = re.compile(r"persona\.[a-z0-9][a-z0-9._-]*@mana\.test")  # contract §1
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
PERSONAL = "personal"


class SpacesFileError(Exception):
    """The spaces file or the allowlist cannot be used; one line naming the file and the problem."""


@dataclass(frozen=True, slots=True)
class DeclaredSpace:
    name: str
    slug: str
    type: str
    members: tuple[str, ...]  # persona emails, the owner first

    @property
    def owner(self) -> str:
        return self.members[0]


@dataclass(frozen=True, slots=True)
class SpaceModules:
    """Which modules each space type allows (Mana's SPACE_MODULE_ALLOWLIST); None = all of them."""

    allowlist: dict[str, frozenset[str] | None]

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self.allowlist)

    def allows(self, space_type: str, module: str) -> bool:
        allowed = self.allowlist.get(space_type, frozenset())
        return allowed is None or module in allowed


def draw(tick_id: str, purpose: str) -> float:
    """A number in [0, 1) fixed by the tick id (a pure function of persona and window) and the purpose."""
    digest = hashlib.sha256(f"{purpose}:{tick_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def shared_spaces(spaces: list[SpaceInfo], modules: SpaceModules) -> list[SpaceInfo]:
    """The persona's shared spaces of a type Mana knows, in a stable order (a personal one is never shared)."""
    return sorted((s for s in spaces if s.type in modules.types and s.type != PERSONAL), key=lambda s: s.id)


def load_space_modules(path: Path) -> SpaceModules:
    where = f"space modules file {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpacesFileError(f"{where}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SpacesFileError(f"{where}: not JSON ({exc})") from None
    table = data.get("allowlist") if isinstance(data, dict) else None
    if not isinstance(table, dict) or table.get(PERSONAL) != "*":
        raise SpacesFileError(f'{where}: needs an "allowlist" object whose "personal" is "*"')
    allowlist: dict[str, frozenset[str] | None] = {}
    for space_type, modules in table.items():
        if modules == "*":
            allowlist[space_type] = None
        elif isinstance(modules, list) and all(isinstance(m, str) for m in modules):
            allowlist[space_type] = frozenset(modules)
        else:
            raise SpacesFileError(f'{where}: {space_type}: a list of module names or "*"')
    return SpaceModules(allowlist)


def load_spaces(path: Path, modules: SpaceModules) -> list[DeclaredSpace]:
    """The declared spaces, checked; SpacesFileError (one line) for anything the runner cannot provision."""
    where = f"spaces file {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpacesFileError(f"{where}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpacesFileError(f"{where}: not TOML ({exc})") from None
    unknown = set(data) - {"space"}
    if unknown:
        raise SpacesFileError(f"{where}: unknown key {sorted(unknown)[0]!r} (only [[space]] tables)")
    entries = data.get("space", [])
    if not isinstance(entries, list):
        raise SpacesFileError(f"{where}: space must be an array of tables ([[space]])")
    shared = sorted(modules.types - {PERSONAL})
    spaces: list[DeclaredSpace] = []
    for index, entry in enumerate(entries, start=1):
        spaces.append(_declared(entry, f"{where}: space {index}", shared))
    slugs = [s.slug for s in spaces]
    if duplicate := next((slug for slug in slugs if slugs.count(slug) > 1), None):
        raise SpacesFileError(f"{where}: slug {duplicate!r} is declared twice")
    return spaces


def _declared(entry: Any, where: str, shared: list[str]) -> DeclaredSpace:
    if not isinstance(entry, dict):
        raise SpacesFileError(f"{where}: not a table")
    if unknown := set(entry) - {"name", "slug", "type", "members"}:
        raise SpacesFileError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, slug, kind, members = (entry.get(k) for k in ("name", "slug", "type", "members"))
    if not isinstance(name, str) or not name.strip():
        raise SpacesFileError(f"{where}: name must be a non-empty string")
    if not isinstance(slug, str) or not SLUG.fullmatch(slug):
        raise SpacesFileError(f"{where}: slug must be lower-case letters, digits and dashes")
    if kind not in shared:
        raise SpacesFileError(f"{where} ({slug}): type {kind!r} is not a shared space type ({', '.join(shared)})")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise SpacesFileError(f"{where} ({slug}): members must be a list of persona emails, owner first")
    emails = [m.strip().lower() for m in members]
    for position, email in enumerate(emails):
        if not PERSONA_EMAIL.fullmatch(email):
            role = "owner" if position == 0 else "member"
            raise SpacesFileError(f"{where} ({slug}): {role} {email!r} is not a persona (persona.<name>@mana.test)")
    if len(set(emails)) != len(emails):
        raise SpacesFileError(f"{where} ({slug}): a member is listed twice")
    return DeclaredSpace(name.strip(), slug, str(kind), tuple(emails))


# --- what mana-auth holds, and what is missing ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One thing that remains to be done for a declared space."""

    space: DeclaredSpace
    kind: str  # create | join
    email: str  # who does it: the owner creates, a member joins

    def __str__(self) -> str:
        if self.kind == "create":
            return f"{self.space.slug}: create {self.space.type} space {self.space.name!r} as {self.email}"
        return f"{self.space.slug}: add {self.email} as member (invite, accept)"


@dataclass(frozen=True, slots=True)
class Found:
    """A declared space as mana-auth holds it, as its owner sees it."""

    space: DeclaredSpace
    held: SpaceInfo | None
    members: list[Member]
    notes: list[str]


Sessions = Callable[[str], Awaitable["PersonaSession"]]


async def survey(space: DeclaredSpace, session_of: Sessions) -> Found:
    """What mana-auth holds of one declared space, read as its owner (reads only)."""
    owner = await session_of(space.owner)
    held = next((s for s in await owner.spaces() if s.slug == space.slug), None)
    if held is None:
        return Found(space, None, [], [])
    members = await owner.members(held.id)
    notes = []
    if held.type != space.type:
        notes.append(
            f"{space.slug}: mana-auth holds it as type {held.type!r}, the file says {space.type!r} (left as is)"
        )
    roles = {m.email.lower(): m.role for m in members}
    if roles.get(space.owner) != "owner":
        notes.append(f"{space.slug}: {space.owner} has role {roles.get(space.owner)!r}, not owner (left as is)")
    for extra in sorted(set(roles) - set(space.members)):
        notes.append(f"{space.slug}: {extra} is a member the file does not name (left as is)")
    return Found(space, held, members, notes)


def remaining(found: Found) -> list[Step]:
    if found.held is None:
        return [Step(found.space, "create", found.space.owner)] + [
            Step(found.space, "join", email) for email in found.space.members[1:]
        ]
    present = {m.email.lower() for m in found.members}
    return [Step(found.space, "join", email) for email in found.space.members if email not in present]


async def apply(found: Found, session_of: Sessions, done: Callable[[str], None]) -> None:
    """Make one declared space so, step by step; a refusal raises and leaves the earlier steps in place."""
    space = found.space
    held = found.held
    owner = await session_of(space.owner)
    for step in remaining(found):
        if step.kind == "create":
            held = await owner.create_space(space.name, space.slug, space.type)
            done(f"{space.slug}: created as {space.owner}")
            continue
        assert held is not None
        member = await session_of(step.email)
        # An invitation left pending by an earlier, interrupted run is accepted, not sent again.
        waiting = [invitation for invitation, space_id in await member.invitations() if space_id == held.id]
        invitation = waiting[0] if waiting else await owner.invite(held.id, step.email)
        await member.accept(invitation)
        done(f"{space.slug}: {step.email} joined")
