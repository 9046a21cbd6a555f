"""A real HTTP proxy on loopback that forwards to the sandbox unless a rule answers instead.

It plays the misbehaving parts of a deployment: an ingress that answers HTML 404 during a
deploy, a proxy's 413, an API that refuses one persona's batch forever, a server that echoes
a secret. Rules see the method, the path and the body, and return a response or None (forward).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from types import TracebackType

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Rule = Callable[[str, str, bytes], Response | None]


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.rule: Rule = lambda method, path, body: None
        self.seen: Counter[str] = Counter()  # "METHOD path" -> requests that reached the proxy
        self.answered: Counter[str] = Counter()  # ... that a rule answered instead of forwarding
        self._client = httpx.AsyncClient(timeout=30)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        key = f"{request.method} {request.url.path}"
        self.seen[key] += 1
        answer = self.rule(request.method, request.url.path, body)
        if answer is not None:
            self.answered[key] += 1
            return answer
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        upstream = await self._client.request(
            request.method,
            f"{self.target}{request.url.path}",
            params=request.query_params,
            content=body,
            headers=headers,
        )
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return Response(upstream.content, status_code=upstream.status_code, headers=passed)

    async def __aenter__(self) -> FaultProxy:
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "DELETE", "PUT"])])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await self._task
        await self._client.aclose()
