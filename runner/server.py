"""The daemon's HTTP face: /health, /ready, /metrics, and /diag/* when RUNNER_DIAG is on.

Everything it answers goes through the log module's redaction: a server that echoes a
password or the service key into an error must not have it served back here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runner import metrics
from runner.dispatch import Dispatcher, PollError
from runner.journal import Journal
from runner.log import redact
from runner.mana.errors import ManaError
from runner.report import Thresholds, rating_trends
from runner.runtime import Runtime
from runner.session import LoginBlocked
from runner.tick import sign_in

# A probe flood must not become a /due flood: one readiness check serves every probe for this long.
READY_CACHE_S = 5.0


def build_app(runtime: Runtime, dispatcher: Dispatcher) -> Starlette:
    settings = runtime.settings

    async def health(_: Request) -> Response:
        # Liveness only: a Mana outage must not get the runner restarted, the outbox is waiting it out.
        return JSONResponse(
            {
                "status": "ok",
                "paused": dispatcher.paused,
                "intervalMs": settings.tick_interval_ms,
                "concurrency": settings.persona_concurrency,
                "inFlight": dispatcher.in_flight,
                # Which replica answers, and on which journal: tells replicas apart in one look.
                "replica": runtime.journal.replica,
                "journal": runtime.journal.kind,
                # As of this replica's last poll: every replica's spend today, the open reservations included.
                "budget": {
                    "spentUsd": round(dispatcher.budget.spent_usd, 6),
                    "limitUsd": dispatcher.budget.limit_usd,
                    "exhausted": dispatcher.budget.exhausted,
                    "day": dispatcher.budget.day,
                },
            }
        )

    ready_lock = asyncio.Lock()
    ready_cache: list[tuple[float, dict[str, str]]] = []

    async def check_ready() -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await runtime.api.ping()
            checks["api"] = "ok"
        except ManaError as exc:
            checks["api"] = redact(str(exc))[:300]
        try:
            await runtime.journal.writable()
            checks["journal"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure to write means not ready
            checks["journal"] = f"{type(exc).__name__}"
        return checks

    async def ready(_: Request) -> Response:
        # Single flight: probes arriving together wait for one check instead of each making one.
        async with ready_lock:
            if not ready_cache or time.monotonic() - ready_cache[0][0] > READY_CACHE_S:
                ready_cache[:] = [(time.monotonic(), await check_ready())]
            checks = ready_cache[0][1]
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    thresholds = Thresholds.of(settings)

    async def metrics_endpoint(_: Request) -> Response:
        await runtime.outbox.publish()
        await _publish_ratings(runtime.journal, thresholds)
        await dispatcher.publish_budget()  # fresh at every scrape, not only as of the last poll
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def diag_login(request: Request) -> Response:
        email = request.query_params.get("email", "")
        if not email:
            return JSONResponse({"error": "email query parameter required"}, status_code=400)
        try:
            # The tick's own sign-in: the same lockout rule (a refused password is never tried
            # again, and a refusal here blocks ticks too) and the same login pacing.
            session = await sign_in(runtime.tick_deps, email)
        except ManaError as exc:
            # 409: the runner itself declines (a refused password is not tried again); 502: Mana answered so.
            status = 409 if isinstance(exc, LoginBlocked) else 502
            return JSONResponse({"ok": False, "stage": exc.stage, "error": redact(str(exc))}, status_code=status)
        space = session.space
        return JSONResponse({"ok": True, "userId": session.user_id, "personalSpaceId": space.id, "via": space.via})

    async def diag_tick(_: Request) -> Response:
        try:
            started = await dispatcher.poll()
        except PollError as exc:
            return JSONResponse({"error": redact(str(exc))}, status_code=502)
        return JSONResponse({"started": started})

    routes = [
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", metrics_endpoint),
    ]
    if settings.runner_diag:  # settings refuse RUNNER_DIAG in production
        routes += [Route("/diag/login", diag_login), Route("/diag/tick", diag_tick, methods=["POST"])]
    return Starlette(routes=routes)


class _NoSignalServer(uvicorn.Server):
    """uvicorn would take over SIGTERM/SIGINT (and re-raise them on exit); the runner drains itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class HttpHandle:
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


async def start_http(runtime: Runtime, dispatcher: Dispatcher, host: str = "127.0.0.1") -> HttpHandle:
    family = socket.getaddrinfo(host, runtime.settings.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, runtime.settings.port))
    config = uvicorn.Config(build_app(runtime, dispatcher), log_level="warning", access_log=False, lifespan="off")
    server = _NoSignalServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    return HttpHandle(server, task, sock.getsockname()[1])


async def _publish_ratings(journal: Journal, thresholds: Thresholds) -> None:
    """Each module's recent mean rating and regression flag, from the report's rollup, as gauges.

    Computed at scrape time from the journal, so every replica exports the fleet's figures (one
    grouped query over the rollup's last recent+prior days). A module with no rating in the recent
    period has no recent mean to export.
    """
    trends = await rating_trends(journal, datetime.now(UTC).date(), thresholds)
    for module, trend in trends.items():
        if trend["recent_mean"] is not None:
            metrics.MODULE_RATING_RECENT.labels(module=module).set(trend["recent_mean"])
        metrics.MODULE_RATING_REGRESSION.labels(module=module).set(1 if trend["regression"] else 0)
