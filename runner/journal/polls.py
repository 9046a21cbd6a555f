"""Each replica's last poll, kept in the journal so that `python -m runner status` sees the whole fleet."""

from __future__ import annotations

from runner.journal.store import Store
from runner.persona import clean_text
from runner.schema import polls


class Polls(Store):
    async def record_poll(self, result: str, due: int | None, started: int | None, error: str | None) -> None:
        """One row per replica, overwritten at every poll (ok, error or paused)."""
        async with self._write() as conn:
            now = await self._now(conn)
            values = {
                "replica": self.replica,
                "at": now,
                "result": result,
                "due": due,
                "started": started,
                "error": None if error is None else clean_text(error, 500),
            }
            await self._upsert(conn, polls, values)
