"""A world for shared-space tests: Anna and Ben alone in the sandbox, each with a personal space, and
Anna's family space with Ben in it, made through Better Auth's routes as each of them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import WEEKDAY, Mana

from runner.mana.http import shared_client
from runner.persona import derive_password
from runner.sandbox import Sandbox, SandboxConfig

ORG = "/api/auth/organization"
ANNA, BEN = "persona.anna@mana.test", "persona.ben@mana.test"


def plan_cast() -> list[dict[str, Any]]:
    mix = {"notes": 0.4, "todo": 0.3, "mood": 0.2, "wardrobe": 0.1}
    return [
        {"name": name, "archetype": "t", "systemPrompt": f"Du bist {name.title()}.", "moduleMix": mix,
         "tickCadence": "daily", "extraSpace": "none"}
        for name in ("anna", "ben")
    ]  # fmt: skip


@pytest.fixture
async def plan(tmp_path: Path) -> AsyncIterator[Mana]:
    async with family_world(tmp_path) as world:
        yield world


@pytest.fixture
async def isolated_plan(tmp_path: Path) -> AsyncIterator[Mana]:
    """The same world on a sandbox whose reads filter by the active space (Mana as designed)."""
    async with family_world(tmp_path, isolation=True) as world:
        yield world


@asynccontextmanager
async def family_world(tmp_path: Path, isolation: bool = False) -> AsyncIterator[Mana]:
    people = tmp_path / "people.json"
    people.write_text(json.dumps(plan_cast()), encoding="utf-8")
    config = SandboxConfig(db_path=str(tmp_path / "sandbox.db"), personas_file=people, space_isolation=isolation)
    async with Sandbox(config) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=30) as control:
        world = Mana(sandbox, config, control)
        await world.post("clock", {"now": WEEKDAY})
        await make_family(sandbox, config.seed_secret)
        yield world


async def cookie(http: httpx.AsyncClient, sb: Sandbox, seed: str, email: str) -> dict[str, str]:
    body = {"email": email, "password": derive_password(seed, email)}
    signed = await http.post(f"{sb.auth_url}/api/auth/sign-in/email", json=body)
    return {"Cookie": signed.headers["set-cookie"].split(";", 1)[0], "Origin": sb.auth_url}


async def make_family(sb: Sandbox, seed: str) -> str:
    async with shared_client() as http:  # keeps no cookie: each request carries the one it is given
        anna, ben = await cookie(http, sb, seed, ANNA), await cookie(http, sb, seed, BEN)
        body = {"name": "Familie Schmidt", "slug": "familie-schmidt", "metadata": {"type": "family"}}
        org = (await http.post(f"{sb.auth_url}{ORG}/create", json=body, headers=anna)).json()
        invite = {"email": BEN, "role": "member", "organizationId": org["id"]}
        invitation = (await http.post(f"{sb.auth_url}{ORG}/invite-member", json=invite, headers=anna)).json()
        accepted = await http.post(f"{sb.auth_url}{ORG}/accept-invitation", json={"invitationId": invitation["id"]},
                                   headers=ben)  # fmt: skip
        assert accepted.status_code == 200, accepted.text
        return str(org["id"])
