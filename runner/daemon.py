"""The daemon's life: the poll schedule, the HTTP face, and the drained exit when told to stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from runner.dispatch import Dispatcher
from runner.log import get_logger
from runner.runtime import Runtime
from runner.server import start_http

log = get_logger("runner.daemon")

FINAL_FLUSH_S = 10.0


async def serve(runtime: Runtime, stop: asyncio.Event, dispatcher: Dispatcher | None = None) -> None:
    """The daemon: poll on schedule, serve health and metrics until `stop` is set, then drain and flush.

    The caller owns the process's signals: it sets `stop`, and pauses or resumes through the
    dispatcher it passes in (a new one is made when it has no need to reach it).
    """
    settings = runtime.settings
    # No recovery of its own here: the first poll runs at once, paused or not, and every poll recovers.
    dispatcher = dispatcher or Dispatcher(runtime)

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
    # No new poll from here; a poll job the scheduler created but has not started yet gets one
    # loop step to enter poll_and_deliver, which ends quietly when the shutdown below cancels it.
    # Cancelled before its first step, APScheduler would log the CancelledError as a job failure.
    scheduler.pause()
    await asyncio.sleep(0)
    scheduler.shutdown(wait=False)
    await dispatcher.drain(settings.drain_timeout_s)
    try:
        backlog = await asyncio.wait_for(runtime.outbox.flush(), timeout=FINAL_FLUSH_S)
        log.info("outbox flushed", backlog=backlog)
    except TimeoutError:
        log.warning("outbox not flushed before exit; the journal keeps it for the next start")
    await http.stop()
    log.info("stopped")
