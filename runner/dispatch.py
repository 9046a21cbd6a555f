"""Polling, claiming and the worker pool: which due persona ticks when, and recovery of what a run left open."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from dataclasses import dataclass
from datetime import datetime

from runner import metrics
from runner.journal import BudgetSpent
from runner.log import get_logger
from runner.mana.errors import ManaError
from runner.persona import DuePersona, tick_id, tick_window
from runner.runtime import Runtime, scripted_factory
from runner.tick import TickDeps, run_tick

log = get_logger("runner.dispatch")

PRUNE_EVERY_S = 3600.0


class PollError(Exception):
    """GET /due could not be made: wrong key, API down after retries."""


@dataclass(slots=True)
class BudgetState:
    """The fleet's budget as this replica last saw it (at its last poll), for /health."""

    spent_usd: float = 0.0  # today's (UTC) calls of every replica plus running ticks' unspent reservations
    limit_usd: float | None = None
    exhausted: bool = False
    day: str = ""


class Dispatcher:
    """Starts a tick for each due persona, at most PERSONA_CONCURRENCY at once.

    Each persona gets its own task that waits for a slot, so a slow tick holds one slot,
    not a whole chunk. The claim happens only when the slot is free: a tick queued at
    shutdown was never started and leaves no trace, so it is simply due again later.
    """

    def __init__(self, runtime: Runtime, *, record: bool = False) -> None:
        self._rt = runtime
        # `once` and the demo report on the ticks they ran; the daemon keeps no such list.
        self.claimed: list[tuple[DuePersona, str]] | None = [] if record else None
        self._slots = asyncio.Semaphore(runtime.settings.persona_concurrency)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._accepting = True
        self._pruned_at = 0.0
        self._heartbeat: asyncio.Task[None] | None = None
        self.paused = runtime.settings.runner_paused
        self.last_due = 0  # personas the last GET /due listed
        metrics.PAUSED.set(int(self.paused))
        self.budget = BudgetState(limit_usd=runtime.settings.budget_usd_per_day)
        self._spent_day = ""  # the UTC day a claim found the fleet's budget spent: logged once a day
        # BUDGET_EXHAUSTED=scripted: the same tick, played offline at no cost.
        offline = scripted_factory(runtime.settings)
        self._scripted: TickDeps = dataclasses.replace(runtime.tick_deps, make_provider=offline)

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        metrics.PAUSED.set(int(paused))
        log.info("paused" if paused else "resumed")

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def poll(self) -> int:
        """One GET /due; starts what is due and not already running. Raises PollError."""
        if self.paused or not self._accepting:
            return 0
        try:
            due = await self._rt.api.due()
        except ManaError as exc:
            metrics.POLLS.labels(result="error").inc()
            raise PollError(str(exc)) from exc
        metrics.POLLS.labels(result="ok").inc()
        self.last_due = len(due.personas)
        for warning in due.warnings:
            log.warning("due answer", problem=warning)
        if due.skipped:
            # One line per poll, not one per row: 10,000 bad rows must not become 10,000 lines.
            log.warning("due rows skipped", count=len(due.skipped), first=due.skipped[:5])
        started = 0
        for persona in due.personas:
            if persona.user_id in self._in_flight:
                continue
            task = asyncio.create_task(self._run(persona, due.server_time), name=f"tick:{persona.user_id}")
            self._in_flight[persona.user_id] = task
            task.add_done_callback(functools.partial(self._forget, persona.user_id))
            started += 1
        log.info("polled", due=len(due.personas), started=started, in_flight=len(self._in_flight))
        if self._in_flight and (self._heartbeat is None or self._heartbeat.done()):
            self._heartbeat = asyncio.create_task(self._renew_leases(), name="leases")
        return started

    async def _renew_leases(self) -> None:
        """Keep this replica's running ticks its own: renewed a third of a lease apart, so two
        renewals can fail (a database hiccup) before another replica may take a tick over."""
        journal = self._rt.journal
        while self._in_flight:
            await asyncio.sleep(journal.lease_s / 3)
            try:
                await journal.renew_leases()
            except Exception as exc:  # noqa: BLE001 - the next renewal tries again; a lost lease fences itself
                metrics.ERRORS.labels(stage="lease").inc()
                log.warning("lease renewal failed", error=str(exc))

    def _forget(self, persona_id: str, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(persona_id, None)

    async def poll_and_deliver(self) -> None:
        """The scheduled job: never raises, so one bad poll does not stop the schedule."""
        try:
            # Every live replica looks for ticks whose replica died, at every poll: their rows are
            # sealed and delivered here, whichever replica runs on.
            await recover(self._rt)
            await self._rt.outbox.deliver()
            await self._prune_hourly()
            await self.publish_budget()
            started = await self.poll()
            await self._note_poll("paused" if self.paused else "ok", started)
        except PollError as exc:
            log.error("poll failed", error=str(exc))
            await self._note_poll("error", None, str(exc))
        except asyncio.CancelledError:
            # The scheduler's shutdown cancels a poll in progress (SIGTERM/SIGHUP): every journal write
            # is one transaction, so nothing is half done; say so instead of a traceback, and end quietly.
            log.info("poll cut by shutdown")
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one poll
            metrics.ERRORS.labels(stage="poll").inc()
            log.exception("poll crashed", error=str(exc))

    async def _note_poll(self, result: str, started: int | None, error: str | None = None) -> None:
        """What `python -m runner status` shows of this replica; only a hint, so it never fails the poll."""
        due = self.last_due if result == "ok" else None
        try:
            await self._rt.journal.record_poll(result, due, started, error)
        except Exception as exc:  # noqa: BLE001 - the journal's trouble shows at the next tick's write
            log.warning("poll not recorded", error=str(exc))

    async def publish_budget(self) -> None:
        """Today's fleet spend from the journal into /health and the budget gauges.

        Spent means a tick expected at BUDGET_TICK_DEFAULT_USD no longer fits (a claim refused between
        two polls says so at once). Today's calls are what counts, so a new UTC day clears it.
        """
        try:
            spend = await self._rt.journal.fleet_spend()
        except Exception as exc:  # noqa: BLE001 - only a reading; the next poll tries again
            log.warning("budget not read", error=str(exc))
            return
        budget = self._rt.tick_deps.config.budget
        limit = budget.fleet_usd
        exhausted = budget.fleet_spent(spend.spent_usd)
        if self._spent_day and self._spent_day != spend.day:
            log.info("fleet budget renewed: a new UTC day", day=spend.day)
            self._spent_day = ""
        self._set_budget(BudgetState(spend.spent_usd, limit, exhausted, spend.day))

    def _set_budget(self, state: BudgetState) -> None:
        self.budget = state
        metrics.BUDGET_SPENT.labels(scope="fleet").set(state.spent_usd)
        metrics.BUDGET_LIMIT.labels(scope="fleet").set(state.limit_usd or 0)
        metrics.BUDGET_EXHAUSTED.set(int(state.exhausted))

    def _budget_spent(self, spent: BudgetSpent) -> bool:
        """A claim found a budget spent: True when the tick is to play scripted instead of waiting."""
        if spent.scope != "fleet":
            log.debug("persona budget spent: its ticks wait for the next UTC day", reason=str(spent))
            return False
        scripted = self._rt.settings.budget_exhausted == "scripted"
        if self._spent_day != spent.day:  # once per day and replica, not once per persona and poll
            self._spent_day = spent.day
            then = "new ticks play scripted at no cost" if scripted else "new ticks wait for the next UTC day"
            log.warning(f"fleet budget spent: {then}", reason=str(spent))
        self._set_budget(BudgetState(spent.spent, spent.limit, True, spent.day))
        return scripted

    async def _prune_hourly(self) -> None:
        now = time.time()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        pruned = await self._rt.journal.prune(self._rt.settings.runner_retention_days * 86_400)
        if pruned:
            log.info("journal pruned", ticks=pruned)

    async def _run(self, persona: DuePersona, server_time: datetime) -> None:
        async with self._slots:
            if not self._accepting:
                return
            try:
                window = tick_window(persona.tick_cadence, server_time)
                tid = tick_id(persona.user_id, window)
                deps = self._rt.tick_deps
                try:
                    claim = await self._rt.journal.claim(persona.user_id, window, tid, deps.config.budget)
                except BudgetSpent as spent:
                    if not self._budget_spent(spent):
                        return  # nothing was claimed: the persona waits
                    # No reservation: the scripted player costs nothing.
                    deps = self._scripted
                    claim = await self._rt.journal.claim(persona.user_id, window, tid)
                if claim is None:
                    return  # done in this window, or waiting for its retry time
                if self.claimed is not None:
                    self.claimed.append((persona, claim.tick_id))
                await run_tick(deps, persona, claim, window)
            except Exception as exc:  # noqa: BLE001 - e.g. the journal's disk is full; keep the others going
                metrics.ERRORS.labels(stage="tick").inc()
                log.exception("tick crashed", persona=persona.email, error=str(exc))
                return
        # The sender picks the new batches up; this task does not wait in line behind other sweeps.
        self._rt.outbox.wake()

    async def wait_idle(self) -> None:
        while self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self._stop_renewing()

    async def _stop_renewing(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    async def drain(self, deadline_s: float) -> None:
        """Stop taking ticks, give the running ones until the deadline, then cut them cleanly."""
        self._accepting = False
        tasks = list(self._in_flight.values())
        if not tasks:
            await self._stop_renewing()
            return
        log.info("draining", in_flight=len(tasks), deadline_s=deadline_s)
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()  # the tick seals itself as interrupted on its way out
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("drain deadline reached: ticks cut", cut=len(pending))
        await self._stop_renewing()


async def recover(runtime: Runtime) -> None:
    """Seal the ticks nobody holds any more (a dead process's, or a dead replica's once its lease ran out)."""
    interrupted = await runtime.journal.recover()
    if interrupted:
        metrics.TICKS.labels(outcome="interrupted").inc(len(interrupted))
        log.warning("sealed ticks a dead run left open", ticks=len(interrupted), first=interrupted[:5])


@dataclass(frozen=True, slots=True)
class RoundReport:
    ticks: list[tuple[DuePersona, str]]
    backlog: int  # batches still waiting for the API


async def run_once(runtime: Runtime) -> RoundReport:
    """One poll, every due tick, every row delivered that can be."""
    await recover(runtime)
    await runtime.outbox.deliver()
    dispatcher = Dispatcher(runtime, record=True)
    await dispatcher.poll()
    await dispatcher.wait_idle()
    return RoundReport(ticks=dispatcher.claimed or [], backlog=await runtime.outbox.flush())
