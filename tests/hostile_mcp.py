"""An MCP server that misbehaves on purpose, built on the official SDK's low-level server, on loopback.

It serves whatever tool list a test gives it (crafted names, lying annotations, endless pages),
records every request with the JWT and session it came with, refuses requests with 401 when
a test says so, and can drop every connection in the middle of a call. The runner's auth and
personas API stay the sandbox's; only MANA_MCP_URL points here.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
    ToolAnnotations,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def tool(name: str, *, read_only: bool | None = None, destructive: bool | None = None) -> Tool:
    hints = None
    if read_only is not None or destructive is not None:
        hints = ToolAnnotations(read_only_hint=read_only, destructive_hint=destructive)
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "additionalProperties": False}
    return Tool(name=name, description=f"{name} (hostile test server)", input_schema=schema, annotations=hints)


@dataclass
class Seen:
    method: str
    token: str
    session: str | None
    tool: str | None = None
    arguments: Any = None


@dataclass
class HostileMcp:
    tools: list[Tool] = field(default_factory=lambda: [tool("todo.create"), tool("todo.list")])
    endless_pages: bool = False  # every tools/list page has a next cursor, forever
    page_size: int = 50
    # A JSON-RPC method ("initialize") or a tool name: answer it, then drop every connection.
    drop_on: str | None = None
    # (token, method) -> answer 401 instead; None: accept everything.
    refuse: Callable[[str, str], bool] | None = None
    seen: list[Seen] = field(default_factory=list)
    sessions: dict[str, str] = field(default_factory=dict)  # Mcp-Session-Id -> the JWT that opened it
    list_pages: int = 0
    url: str = ""

    async def __aenter__(self) -> HostileMcp:
        server = Server("hostile", on_list_tools=self._list_tools, on_call_tool=self._call_tool)
        app = server.streamable_http_app()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(self._front(app), log_level="critical", lifespan="on", timeout_graceful_shutdown=1)
        )
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[self._sock]))
        while not self._uvicorn.started:
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self._uvicorn.should_exit = True
        await self._task

    def calls(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "tools/call"]

    def _drop_everything(self) -> None:
        # Like a gateway pod that dies: the listener closes and every open connection is cut at once.
        self._uvicorn.should_exit = True
        self._uvicorn.force_exit = True
        for listener in self._uvicorn.servers:
            listener.close()
        for connection in list(self._uvicorn.server_state.connections):
            connection.transport.abort()  # type: ignore[attr-defined]

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        self.list_pages += 1
        if self.endless_pages:
            page = int(params.cursor) if params is not None and params.cursor else 0
            crafted = [tool(f"page{page}.tool{i}") for i in range(self.page_size)]
            return ListToolsResult(tools=crafted, next_cursor=str(page + 1))
        return ListToolsResult(tools=self.tools)

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        if params.name == self.drop_on:
            self._drop_everything()
        body = json.dumps({"called": params.name, "arguments": params.arguments}, indent=2)
        return CallToolResult(content=[TextContent(type="text", text=body)])

    def _front(self, app: ASGIApp) -> ASGIApp:
        async def front(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            token = headers.get("authorization", "").removeprefix("Bearer ")
            session = headers.get("mcp-session-id")
            messages: list[Message] = []
            body = b""
            while True:
                message = await receive()
                messages.append(message)
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            try:
                rpc = json.loads(body) if body else {}
            except ValueError:
                rpc = {}
            method = str(rpc.get("method", scope["method"])) if isinstance(rpc, dict) else scope["method"]
            params = rpc.get("params") or {} if isinstance(rpc, dict) else {}
            self.seen.append(Seen(method, token, session, params.get("name"), params.get("arguments")))
            if self.refuse is not None and self.refuse(token, method):
                await send(
                    {"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]}
                )
                await send({"type": "http.response.body", "body": b"Unauthorized"})
                return
            replay = iter(messages)

            async def receive_again() -> Message:
                return next(replay, None) or await receive()

            async def remember_session(message: Message) -> None:
                if message["type"] == "http.response.start" and method == "initialize":
                    for key, value in message.get("headers", []):
                        if key.lower() == b"mcp-session-id":
                            self.sessions[value.decode("latin-1")] = token
                await send(message)

            await app(scope, receive_again, remember_session)
            if method == self.drop_on:
                self._drop_everything()

        return front
