"""The journal's side of the outbox: a sealed tick's rows frozen into batches, and each batch's
delivery state, shared by every replica (SKIP LOCKED and a delivery lease).

The bytes of a batch never change once frozen: the outbox re-sends exactly those bytes until the
API takes them, so the API's row ids ("{tickId}-{index}-{tool}") come out the same on every retry
and nothing is doubled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from runner.journal.store import Store
from runner.persona import ActionRow, FeedbackRow, clean_text
from runner.schema import batches

ACTIONS_PER_BATCH = 500
FEEDBACK_PER_BATCH = 100
# Batch states. `pending` waits for its next attempt; `parked` kept failing and is retried on
# the slow schedule; `refused` is the API's own final no to this batch (kept, re-drivable with
# `python -m runner outbox --retry`); `delivered` is done. `dead` is the pre-0.2 name of refused.
BatchState = Literal["pending", "parked", "refused", "delivered"]
UNSENT: tuple[BatchState, ...] = ("pending", "parked")


@dataclass(frozen=True, slots=True)
class Batch:
    id: int
    tick_id: str
    persona_id: str
    kind: Literal["actions", "feedback"]
    body: bytes
    rows: int


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """One batch as an operator sees it (`python -m runner outbox`)."""

    id: int
    tick_id: str
    kind: str
    state: str
    rows: int
    attempts: int
    last_error: str | None


async def freeze(
    conn: AsyncConnection,
    tick_id: str,
    persona_id: str,
    action_rows: list[ActionRow],
    feedback_rows: list[FeedbackRow],
    now: float,
) -> None:
    """A sealed tick's rows as the batches the outbox will send, byte for byte, until the API takes them."""
    # The API ids a row by its index in the request, so a tick's actions must travel as
    # ONE batch forever: the loop caps calls per tick far below the 500-row limit.
    assert len(action_rows) <= ACTIONS_PER_BATCH, "a tick's actions must fit one batch"
    planned: list[tuple[str, list[dict[str, Any]]]] = []
    if action_rows:
        planned.append(("actions", [r.to_json(tick_id) for r in action_rows]))
    for start in range(0, len(feedback_rows), FEEDBACK_PER_BATCH):
        chunk = feedback_rows[start : start + FEEDBACK_PER_BATCH]
        planned.append(("feedback", [r.to_json(tick_id) for r in chunk]))
    for kind, rows in planned:
        body = json.dumps({kind: rows}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        await conn.execute(
            batches.insert().values(
                tick_id=tick_id,
                persona_id=persona_id,
                kind=kind,
                body=body,
                rows=len(rows),
                state="pending",
                attempts=0,
                created_at=now,
            )
        )


class Outbox(Store):
    """Batches by delivery state: taken, marked, failed, re-queued, counted."""

    async def take_batch(self, after_id: int = 0) -> Batch | None:
        """The next unsent batch past `after_id` that is due and that no replica is sending.

        Taken with a delivery lease: SKIP LOCKED lets replicas pick different batches at the
        same moment, and the lease keeps the batch theirs while the POST is under way (no
        transaction is held open across HTTP). A sender that dies leaves a lease that runs out.
        A sweep walks forward by id, so each batch is tried at most once per sweep.
        """
        async with self._write() as conn:
            now = await self._now(conn)
            row = (
                (
                    await conn.execute(
                        sa.select(batches)
                        .where(
                            batches.c.state.in_(UNSENT),
                            batches.c.id > after_id,
                            sa.or_(batches.c.next_attempt_at.is_(None), batches.c.next_attempt_at <= now),
                            sa.or_(batches.c.lease_until.is_(None), batches.c.lease_until < now),
                        )
                        .order_by(batches.c.id)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            await conn.execute(
                batches.update()
                .where(batches.c.id == row["id"])
                .values(lease_owner=self.replica, lease_until=now + self.lease_s)
            )
        return Batch(row["id"], row["tick_id"], row["persona_id"], row["kind"], row["body"], row["rows"])

    async def pending_batches(self) -> list[Batch]:
        """Every unsent batch, whatever its backoff or lease (tests and tools)."""
        async with self._engine.connect() as conn:
            rows = (
                (await conn.execute(sa.select(batches).where(batches.c.state.in_(UNSENT)).order_by(batches.c.id)))
                .mappings()
                .all()
            )
        return [Batch(r["id"], r["tick_id"], r["persona_id"], r["kind"], r["body"], r["rows"]) for r in rows]

    async def mark_batch(self, batch_id: int, state: BatchState, error: str | None) -> None:
        """Record one attempt that ended the batch's wait: delivered or refused.

        Only an unsent batch changes: a slow sender whose lease ran out while another replica
        delivered the same batch must not turn it back into anything else.
        """
        async with self._write() as conn:
            now = await self._now(conn)
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.state.in_(UNSENT))
                .values(
                    state=state,
                    attempts=batches.c.attempts + 1,
                    last_error=None if error is None else clean_text(error, 500),
                    delivered_at=now if state == "delivered" else None,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_until=None,
                )
            )

    async def fail_batch(
        self, batch_id: int, error: str, schedule: Callable[[int], tuple[BatchState, float]]
    ) -> tuple[int, BatchState, float, bool] | None:
        """Count a failed attempt and set the batch's own next attempt, `schedule(attempts)` -> (state, wait s).

        Returns the attempts, the new state, the wait, and whether the batch has just been parked;
        None when the batch is no longer unsent (another replica delivered or refused it meanwhile).
        """
        async with self._write() as conn:
            now = await self._now(conn)
            before = (
                await conn.execute(
                    sa.select(batches.c.attempts, batches.c.state).where(
                        batches.c.id == batch_id, batches.c.state.in_(UNSENT)
                    )
                )
            ).first()
            if before is None:
                return None
            attempts = 1 + int(before.attempts)
            state, wait_s = schedule(attempts)
            await conn.execute(
                batches.update()
                .where(batches.c.id == batch_id)
                .values(
                    state=state,
                    attempts=attempts,
                    last_error=clean_text(error, 500),
                    next_attempt_at=now + wait_s,
                    lease_owner=None,
                    lease_until=None,
                )
            )
            return attempts, state, wait_s, state == "parked" and before.state != "parked"

    async def requeue(self, states: tuple[str, ...] = ("refused", "parked")) -> int:
        """Operator's re-drive: these batches go back to pending, due now, with a fresh count."""
        async with self._write() as conn:
            result = await conn.execute(
                batches.update()
                .where(batches.c.state.in_(states))
                .values(state="pending", attempts=0, next_attempt_at=None)
            )
            return int(result.rowcount or 0)

    async def batch_counts(self) -> dict[str, int]:
        """Batches by state: what /metrics and `python -m runner outbox` show."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(batches.c.state, sa.func.count()).group_by(batches.c.state))).all()
        counts = {state: 0 for state in ("pending", "parked", "refused", "delivered")}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    async def problem_batches(self, limit: int = 20) -> list[BatchStatus]:
        """Parked and refused batches, the ones an operator has to look at."""
        async with self._engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(batches)
                        .where(batches.c.state.in_(("parked", "refused")))
                        .order_by(batches.c.id)
                        .limit(limit)
                    )
                )
                .mappings()
                .all()
            )
        return [
            BatchStatus(r["id"], r["tick_id"], r["kind"], r["state"], r["rows"], r["attempts"], r["last_error"])
            for r in rows
        ]

    async def backlog(self) -> int:
        """Batches still to be sent (pending or parked); refused ones wait for an operator."""
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(batches).where(batches.c.state.in_(UNSENT))
            )
            return int(count or 0)
