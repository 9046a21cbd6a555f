"""Delivery: rows leave only from the journal, as the batches it froze, until the API takes them."""

from __future__ import annotations

import asyncio
import time

from runner import metrics
from runner.journal import Journal
from runner.log import get_logger
from runner.mana.errors import ApiError, ManaError
from runner.mana.personas_api import PersonasApi

log = get_logger("runner.outbox")


class Outbox:
    def __init__(self, journal: Journal, api: PersonasApi) -> None:
        self._journal = journal
        self._api = api
        # One sender at a time: two sweeps would post the same batch twice (harmless, but noise).
        self._lock = asyncio.Lock()
        self._wanted = False
        self._sender: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Ask for a sweep without waiting for it; requests made during a sweep fold into one more."""
        self._wanted = True
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_while_wanted(), name="outbox")

    async def flush(self) -> int:
        """Let the background sender finish, then one last sweep; returns the backlog left."""
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)
        return await self.deliver()

    async def _send_while_wanted(self) -> None:
        while self._wanted:
            self._wanted = False
            try:
                await self.deliver()
            except Exception as exc:  # noqa: BLE001 - the next wake or poll sweeps again; the journal keeps all
                metrics.ERRORS.labels(stage="deliver").inc()
                log.exception("delivery sweep crashed", error=str(exc))

    async def deliver(self) -> int:
        """One sweep over the backlog; returns what is still pending afterwards.

        A batch the API refuses for good (400: a row it will never take; 404: the persona is
        gone) is parked as dead, logged and counted, never dropped silently. Anything else
        (outage, 5xx after retries, a wrong service key) stops the sweep and leaves the
        batch pending for the next one.
        """
        async with self._lock:
            for batch in await self._journal.pending_batches():
                try:
                    await self._api.post_batch(batch.persona_id, batch.kind, batch.body)
                except ApiError as exc:
                    if exc.status in (400, 404, 413, 422):
                        await self._journal.mark_batch(batch.id, "dead", str(exc), time.time())
                        metrics.BATCHES_DEAD.labels(kind=batch.kind).inc()
                        log.error("batch refused for good", batch=batch.id, kind=batch.kind, error=str(exc))
                        continue
                    await self._stalled(batch.id, exc)
                    break
                except ManaError as exc:
                    await self._stalled(batch.id, exc)
                    break
                await self._journal.mark_batch(batch.id, "delivered", None, time.time())
                metrics.ROWS_DELIVERED.labels(kind=batch.kind).inc(batch.rows)
                log.info("batch delivered", batch=batch.id, kind=batch.kind, rows=batch.rows, tick_id=batch.tick_id)
            backlog = await self._journal.backlog()
            metrics.OUTBOX_BACKLOG.set(backlog)
            return backlog

    async def _stalled(self, batch_id: int, exc: Exception) -> None:
        metrics.ERRORS.labels(stage="deliver").inc()
        await self._journal.mark_batch(batch_id, "pending", str(exc), time.time())
        log.warning("delivery stalled, will retry", batch=batch_id, error=str(exc))
