"""The durable record of every tick: what it claimed, each tool call, its rating, its batches.

One package, a module per concern, each a part of `Journal`:
  store.py       opening the database, its owner lock, one write transaction, the database clock
  budget.py      model calls and their cost per day; the fleet's and each persona's daily budget
  ticks.py       the write path of a tick: claim, lease, calls, ratings, seal; recovery; pruning
  batches.py     the outbox's batches and their delivery state
  remembered.py  what is kept per persona across ticks: login blocks, personal spaces, vaults
  rollup.py      the report's read model (daily rollup, findings), written as each tick is sealed
  polls.py       each replica's last poll, for `python -m runner status`

SQLAlchemy Core keeps the SQL portable: SQLite (WAL, synchronous=FULL) is the default, and a
PostgreSQL journal is shared by any number of replicas. Every decision that involves time
(leases, retry times, backoff, pruning) is judged by the database's clock, never a replica's.

Several replicas coordinate through the database alone: a claim is the insert of a unique
(persona, window) row; a running tick carries its replica and a lease that the replica renews;
a tick whose lease ran out is sealed as interrupted by whichever live replica finds it first,
under a row lock that also fences the late owner's next call (LeaseLost); a batch is sent by one
replica at a time (SKIP LOCKED and a delivery lease).

A SQLite journal belongs to one process: `open` takes an exclusive OS lock (flock on
`<journal>.lock`) for the life of the process, which also proves that every tick another process
left running is abandoned.
"""

from __future__ import annotations

from runner.journal.batches import ACTIONS_PER_BATCH, UNSENT, Batch, BatchState, BatchStatus, Outbox
from runner.journal.budget import Budget, BudgetSpent, FleetSpend
from runner.journal.polls import Polls
from runner.journal.remembered import Remembered
from runner.journal.rollup import ReadModel
from runner.journal.store import JournalError, LeaseLost, replica_id
from runner.journal.ticks import PRUNE_CHUNK, Claim, TickSummary, TickWrites


class Journal(TickWrites, Outbox, Remembered, ReadModel, Polls):
    """The whole journal: each concern is a part (a mixin over `Store`); open it with `Journal.open`."""


__all__ = [
    "ACTIONS_PER_BATCH",
    "PRUNE_CHUNK",
    "UNSENT",
    "Batch",
    "BatchState",
    "BatchStatus",
    "Budget",
    "BudgetSpent",
    "FleetSpend",
    "Claim",
    "Journal",
    "JournalError",
    "LeaseLost",
    "TickSummary",
    "replica_id",
]
