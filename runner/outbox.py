"""Delivery: rows leave only from the journal, as the batches it froze, until the API takes them.

No batch can hold up another. Each failing batch waits on its own backoff (next attempt time
and attempt count in the journal); after `park_after` failed attempts it is *parked*: logged,
counted, shown by `python -m runner outbox`, and retried on the slow schedule, never dropped.
Only the API's own refusal of a batch (contract §4: a 400 or 404 with its JSON error envelope)
stops the retries; such a batch is kept as *refused* and `python -m runner outbox --retry`
sends it again. An answer that is not the API's (an ingress's HTML 404 during a deploy, a
proxy's 413, a 400 without the envelope) is an outage and is retried like a 5xx.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from runner import metrics
from runner.journal import Batch, BatchState, Journal
from runner.log import get_logger
from runner.mana.errors import ApiError, ManaError
from runner.mana.personas_api import PersonasApi

log = get_logger("runner.outbox")

# The API's own texts for a batch it will never take (apps/api internal personas routes, and
# contract §4): invalid JSON, a missing or oversized array, a row failing validation; and the
# persona being gone. Matched as text on purpose: a refusal we fail to recognise is only
# retried (parked, visible, never lost); a proxy's page taken for a refusal would stop delivery.
_REFUSAL_400 = ("Invalid JSON", "array required", "batch size must be", "rows failed validation")
_REFUSAL_404 = "Persona not found"
# A sweep that meets this many failures in a row stops: the API is likely down as a whole,
# and each of those batches already waits on its own backoff, so the next sweep starts elsewhere.
_SWEEP_FAILURE_LIMIT = 3


def is_refusal(exc: ApiError) -> bool:
    """True only for the personas API's own, final no to this batch."""
    if not exc.envelope:
        return False
    if exc.status == 404:
        return exc.code == _REFUSAL_404
    return exc.status == 400 and any(text in exc.code for text in _REFUSAL_400)


@dataclass(frozen=True, slots=True)
class OutboxPolicy:
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    park_after: int = 12
    parked_retry_s: float = 1800.0

    def next_attempt(self, attempts: int) -> tuple[BatchState, float]:
        """(state, wait in s) after the `attempts`-th failure: backoff with jitter, then the slow schedule."""
        if attempts >= self.park_after:
            return "parked", self.parked_retry_s
        ceiling = min(self.retry_max_s, self.retry_base_s * 2 ** (attempts - 1))
        return "pending", random.uniform(ceiling / 2, ceiling)


class Outbox:
    def __init__(self, journal: Journal, api: PersonasApi, policy: OutboxPolicy | None = None) -> None:
        self._journal = journal
        self._api = api
        self._policy = policy or OutboxPolicy()
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
        """One sweep over the batches that are due; returns how many are still unsent afterwards.

        Batches are taken one at a time with a delivery lease, so replicas sharing a journal
        sweep side by side without sending the same batch twice.
        """
        async with self._lock:
            after, failures_in_a_row = 0, 0
            while failures_in_a_row < _SWEEP_FAILURE_LIMIT:
                batch = await self._journal.take_batch(after_id=after)
                if batch is None:
                    break
                after = batch.id
                if await self._send(batch):
                    failures_in_a_row = 0
                else:
                    failures_in_a_row += 1
            await self.publish()
            return await self._journal.backlog()

    async def publish(self) -> None:
        """Batches by state into the metrics (also called by /metrics)."""
        counts = await self._journal.batch_counts()
        metrics.OUTBOX_BACKLOG.set(counts["pending"] + counts["parked"])
        for state in ("pending", "parked", "refused"):
            metrics.OUTBOX_BATCHES.labels(state=state).set(counts[state])

    async def _send(self, batch: Batch) -> bool:
        """One attempt at one batch; True when the API answered for it (accepted or refused)."""
        try:
            await self._api.post_batch(batch.persona_id, batch.kind, batch.body)
        except ApiError as exc:
            if is_refusal(exc):
                await self._journal.mark_batch(batch.id, "refused", str(exc))
                metrics.BATCHES_REFUSED.labels(kind=batch.kind).inc()
                log.error(
                    "batch refused by the API; kept, re-send with `python -m runner outbox --retry`",
                    batch=batch.id,
                    kind=batch.kind,
                    error=str(exc),
                )
                return True
            await self._failed(batch, exc)
            return False
        except ManaError as exc:
            await self._failed(batch, exc)
            return False
        await self._journal.mark_batch(batch.id, "delivered", None)
        metrics.ROWS_DELIVERED.labels(kind=batch.kind).inc(batch.rows)
        log.info("batch delivered", batch=batch.id, kind=batch.kind, rows=batch.rows, tick_id=batch.tick_id)
        return True

    async def _failed(self, batch: Batch, exc: Exception) -> None:
        metrics.ERRORS.labels(stage="deliver").inc()
        counted = await self._journal.fail_batch(batch.id, str(exc), self._policy.next_attempt)
        if counted is None:
            return  # another replica delivered or refused it meanwhile
        attempts, state, wait_s, newly_parked = counted
        if state == "parked":
            if newly_parked:
                metrics.BATCHES_PARKED.labels(kind=batch.kind).inc()
            log.error(
                "batch parked: it keeps failing; retried every parked interval, never dropped",
                batch=batch.id,
                kind=batch.kind,
                attempts=attempts,
                retry_in_s=round(wait_s),
                error=str(exc),
            )
        else:
            log.warning(
                "batch not delivered, will retry",
                batch=batch.id,
                attempts=attempts,
                retry_in_s=round(wait_s),
                error=str(exc),
            )
