"""Polling, claiming, the worker pool, and the daemon's life from start to drained exit."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from anthropic import AsyncAnthropic
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from runner import metrics
from runner.agent.providers.anthropic import AnthropicProvider
from runner.agent.providers.scripted import ScriptedProvider
from runner.journal import Journal
from runner.log import get_logger, register_secret
from runner.mana.auth import AuthClient, LoginLimiter
from runner.mana.errors import ManaError, RetryPolicy
from runner.mana.personas_api import DueLimits, PersonasApi
from runner.outbox import Outbox, OutboxPolicy
from runner.persona import DuePersona, tick_id, tick_window
from runner.settings import Settings
from runner.tick import ProviderFactory, TickConfig, TickDeps, run_tick

log = get_logger("runner.scheduler")

FINAL_FLUSH_S = 10.0
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    journal: Journal
    api: PersonasApi
    outbox: Outbox
    tick_deps: TickDeps


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Every long-lived resource, opened once and closed in reverse order."""
    # Whoever builds a runtime gets redaction of its secrets in everything it logs, stores or serves.
    for secret in settings.secrets():
        register_secret(secret)
    journal = await Journal.open(settings.journal_location, lease_s=settings.runner_lease_s)
    policy = RetryPolicy(attempts=settings.mana_retry_attempts, base_s=settings.mana_retry_base_s)
    timeout = httpx.Timeout(30.0, connect=10.0)
    anthropic: AsyncAnthropic | None = None
    try:
        async with (
            httpx.AsyncClient(timeout=timeout) as auth_http,
            httpx.AsyncClient(timeout=timeout) as api_http,
        ):
            # One limiter for every sign-in of the process: Mana counts them per client IP.
            auth = AuthClient(auth_http, settings.mana_auth_url, policy, LoginLimiter(*settings.login_rate))
            api = PersonasApi(
                api_http,
                settings.mana_api_url,
                settings.mana_service_key.get_secret_value(),
                policy,
                settings.mana_personas_path,
                DueLimits(settings.due_max_bytes, settings.due_max_rows, settings.persona_prompt_max_chars),
            )
            make_provider: ProviderFactory
            if settings.llm_provider == "scripted":
                seed = settings.scripted_seed
                make_provider = lambda p, tid: ScriptedProvider(f"{seed}:{tid}", p.module_mix)  # noqa: E731
            else:
                anthropic = AsyncAnthropic(
                    api_key=settings.anthropic_api_key.get_secret_value() or None,
                    base_url=settings.anthropic_base_url,
                    max_retries=settings.anthropic_max_retries,
                    timeout=120.0,
                )
                client = anthropic
                make_provider = lambda p, tid: AnthropicProvider(  # noqa: E731
                    client, settings.anthropic_model, settings.llm_max_tokens, settings.persona_language
                )
            config = tick_config(settings)
            deps = TickDeps(config=config, auth=auth, journal=journal, make_provider=make_provider)
            outbox_policy = OutboxPolicy(
                retry_base_s=settings.outbox_retry_base_s,
                retry_max_s=settings.outbox_retry_max_s,
                park_after=settings.outbox_park_after,
                parked_retry_s=settings.outbox_parked_retry_s,
            )
            yield Runtime(settings, journal, api, Outbox(journal, api, outbox_policy), deps)
    finally:
        if anthropic is not None:
            await anthropic.close()
        await journal.close()


def tick_config(settings: Settings) -> TickConfig:
    """What a tick needs from the settings; the daemon and the persona commands build it alike."""
    return TickConfig(
        seed_secret=settings.persona_seed_secret.get_secret_value(),
        mcp_url=settings.mana_mcp_url,
        max_turns=settings.persona_max_turns,
        timeout_s=settings.persona_tick_timeout_s,
        max_attempts=settings.persona_max_attempts,
        retry_base_s=settings.persona_retry_base_s,
        language=settings.persona_language,
        policy=settings.tool_policy,
        space_recheck_s=settings.mana_space_recheck_h * 3600,
    )


class PollError(Exception):
    """GET /due could not be made: wrong key, API down after retries."""


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
        self.paused = runtime.settings.runner_paused
        metrics.PAUSED.set(int(self.paused))

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
        return started

    def _forget(self, persona_id: str, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(persona_id, None)

    async def poll_and_deliver(self) -> None:
        """The scheduled job: never raises, so one bad poll does not stop the schedule."""
        try:
            await self._rt.outbox.deliver()
            await self._prune_hourly()
            await self.poll()
        except PollError as exc:
            log.error("poll failed", error=str(exc))
        except asyncio.CancelledError:
            # The scheduler's shutdown cancels a poll in progress (SIGTERM/SIGHUP): every journal write
            # is one transaction, so nothing is half done; say so instead of a traceback, and end quietly.
            log.info("poll cut by shutdown")
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one poll
            metrics.ERRORS.labels(stage="poll").inc()
            log.exception("poll crashed", error=str(exc))

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
                claim = await self._rt.journal.claim(persona.user_id, window, tid)
                if claim is None:
                    return  # done in this window, or waiting for its retry time
                if self.claimed is not None:
                    self.claimed.append((persona, claim.tick_id))
                await run_tick(self._rt.tick_deps, persona, claim)
            except Exception as exc:  # noqa: BLE001 - e.g. the journal's disk is full; keep the others going
                metrics.ERRORS.labels(stage="tick").inc()
                log.exception("tick crashed", persona=persona.email, error=str(exc))
                return
        # The sender picks the new batches up; this task does not wait in line behind other sweeps.
        self._rt.outbox.wake()

    async def wait_idle(self) -> None:
        while self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def drain(self, deadline_s: float) -> None:
        """Stop taking ticks, give the running ones until the deadline, then cut them cleanly."""
        self._accepting = False
        tasks = list(self._in_flight.values())
        if not tasks:
            return
        log.info("draining", in_flight=len(tasks), deadline_s=deadline_s)
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()  # the tick seals itself as interrupted on its way out
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("drain deadline reached: ticks cut", cut=len(pending))


async def recover(runtime: Runtime) -> None:
    interrupted = await runtime.journal.recover()
    if interrupted:
        metrics.TICKS.labels(outcome="interrupted").inc(len(interrupted))
        log.warning("closed ticks a previous run left open", ticks=len(interrupted))


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


async def serve(runtime: Runtime) -> None:
    """The daemon: poll on schedule, serve health and metrics, drain on SIGTERM/SIGINT."""
    from runner.server import start_http  # the HTTP face is only needed by the daemon

    settings = runtime.settings
    await recover(runtime)
    dispatcher = Dispatcher(runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # No configuration reload exists; a HUP (a closed terminal, a supervisor's habit) drains like TERM.
    loop.add_signal_handler(signal.SIGHUP, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dispatcher.set_paused, True)
    loop.add_signal_handler(signal.SIGUSR2, dispatcher.set_paused, False)

    http = await start_http(runtime, dispatcher, settings.http_host)
    scheduler = AsyncIOScheduler(timezone=UTC)
    # max_instances=1: a slow poll is skipped over, never overlapped; coalesce: no catch-up bursts.
    scheduler.add_job(
        dispatcher.poll_and_deliver,
        "interval",
        seconds=settings.tick_interval_ms / 1000,
        max_instances=1,
        coalesce=True,
        next_run_time=datetime.now(UTC),
    )
    scheduler.start()
    log.info(
        "runner started",
        interval_ms=settings.tick_interval_ms,
        concurrency=settings.persona_concurrency,
        paused=dispatcher.paused,
        port=http.port,
    )
    await stop.wait()
    log.info("shutting down", in_flight=dispatcher.in_flight)
    scheduler.shutdown(wait=False)
    await dispatcher.drain(settings.drain_timeout_s)
    try:
        backlog = await asyncio.wait_for(runtime.outbox.flush(), timeout=FINAL_FLUSH_S)
        log.info("outbox flushed", backlog=backlog)
    except TimeoutError:
        log.warning("outbox not flushed before exit; the journal keeps it for the next start")
    await http.stop()
    log.info("stopped")
