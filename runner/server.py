"""The daemon's HTTP face: /health, /ready, /metrics, and /diag/* outside production."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runner import metrics
from runner.log import register_secret
from runner.mana.errors import ManaError
from runner.persona import derive_password
from runner.scheduler import Dispatcher, PollError, Runtime


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
            }
        )

    async def ready(_: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            await runtime.api.ping()
            checks["api"] = "ok"
        except ManaError as exc:
            checks["api"] = str(exc)
        try:
            await runtime.journal.writable()
            checks["journal"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure to write means not ready
            checks["journal"] = f"{type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        metrics.OUTBOX_BACKLOG.set(await runtime.journal.backlog())
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def diag_login(request: Request) -> Response:
        email = request.query_params.get("email", "")
        if not email:
            return JSONResponse({"error": "email query parameter required"}, status_code=400)
        auth = runtime.tick_deps.auth
        password = derive_password(settings.persona_seed_secret.get_secret_value(), email)
        register_secret(password)
        try:
            login = await auth.login(email, password)
            space = await auth.personal_space(login, email, password)
        except ManaError as exc:
            return JSONResponse({"ok": False, "stage": exc.stage, "error": str(exc)}, status_code=502)
        return JSONResponse({"ok": True, "userId": login.user_id, "personalSpaceId": space.id, "via": space.via})

    async def diag_tick(_: Request) -> Response:
        try:
            started = await dispatcher.poll()
        except PollError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        return JSONResponse({"started": started})

    routes = [
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", metrics_endpoint),
    ]
    if not settings.production:
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


async def start_http(runtime: Runtime, dispatcher: Dispatcher, host: str = "0.0.0.0") -> HttpHandle:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, runtime.settings.port))
    config = uvicorn.Config(build_app(runtime, dispatcher), log_level="warning", access_log=False, lifespan="off")
    server = _NoSignalServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    return HttpHandle(server, task, sock.getsockname()[1])
