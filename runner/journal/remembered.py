"""What the journal remembers per persona across ticks: refused logins, personal spaces, vaults."""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa

from runner.journal.store import Store
from runner.persona import clean_text
from runner.schema import login_blocks, persona_vaults, personal_spaces


class Remembered(Store):
    """Facts about a persona that outlive its ticks."""

    async def block_login(
        self, persona_id: str, secret_fingerprint: str, reason: str, email: str | None = None
    ) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                self._insert(login_blocks)
                .values(
                    persona_id=persona_id,
                    secret_fingerprint=secret_fingerprint,
                    reason=clean_text(reason, 500),
                    created_at=now,
                    email=email,
                )
                .on_conflict_do_nothing()
            )

    async def login_block(self, persona_id: str | None, secret_fingerprint: str, email: str) -> str | None:
        """The reason this persona's login is not to be tried with this secret, if any.

        Looked up by email as well as by user id: the `login`/`tools` commands and /diag/login
        know a persona by its email only (a refused login reveals no user id).
        """
        who = sa.or_(login_blocks.c.email == email, login_blocks.c.persona_id == email)
        if persona_id is not None:
            who = sa.or_(who, login_blocks.c.persona_id == persona_id)
        async with self._engine.connect() as conn:
            reason = await conn.scalar(
                sa.select(login_blocks.c.reason)
                .where(who, login_blocks.c.secret_fingerprint == secret_fingerprint)
                .limit(1)
            )
            return str(reason) if reason is not None else None

    async def known_space(self, persona_id: str, max_age_s: float) -> str | None:
        """The persona's remembered personal space, if it was looked up within `max_age_s`."""
        async with self._engine.connect() as conn:
            space = await conn.scalar(
                sa.select(personal_spaces.c.space_id).where(
                    personal_spaces.c.persona_id == persona_id, personal_spaces.c.resolved_at > self._clock - max_age_s
                )
            )
            return str(space) if space is not None else None

    async def remember_space(self, persona_id: str, space_id: str) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await self._upsert(
                conn, personal_spaces, {"persona_id": persona_id, "space_id": space_id, "resolved_at": now}
            )

    async def forget_space(self, persona_id: str) -> None:
        """Mana refused the remembered space: the next tick looks it up again."""
        async with self._write() as conn:
            await conn.execute(personal_spaces.delete().where(personal_spaces.c.persona_id == persona_id))

    async def vault_known(self, persona_id: str) -> bool:
        async with self._engine.connect() as conn:
            found = await conn.scalar(sa.select(persona_vaults.c.how).where(persona_vaults.c.persona_id == persona_id))
            return found is not None

    async def remember_vault(self, persona_id: str, how: Literal["found", "created"]) -> None:
        async with self._write() as conn:
            now = await self._now(conn)
            await self._upsert(conn, persona_vaults, {"persona_id": persona_id, "how": how, "at": now})
