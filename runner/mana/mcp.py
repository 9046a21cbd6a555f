"""mana-mcp: one Streamable HTTP session per tick, through the official `mcp` SDK (contract §5)."""

from __future__ import annotations

import contextlib
import functools
import json
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import MCP_DEFAULT_SSE_READ_TIMEOUT, MCP_DEFAULT_TIMEOUT
from mcp.types import CallToolResult, Tool

from runner.mana.errors import ApiError, ManaError, TransportError

T = TypeVar("T")

TokenSource = Callable[[], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str  # the MCP name, dots and all
    description: str
    input_schema: dict[str, Any]
    destructive: bool


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    ok: bool
    text: str


def is_destructive(tool: Tool) -> bool:
    """MCP spec defaults: no annotations means readOnly=false, destructive=true."""
    hints = tool.annotations
    if hints is None:
        return True
    if hints.read_only_hint:
        return False
    return hints.destructive_hint is not False


def result_text(result: CallToolResult) -> str:
    parts: list[str] = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


class McpGateway:
    """A persona's MCP session: Bearer JWT + X-Mana-Space on every request.

    The SDK turns an HTTP 401 into a generic error, so a response hook remembers the
    status; a 401 mid-tick means the JWT expired: fetch a fresh one once and go on.
    """

    def __init__(
        self,
        origin: str,
        space_id: str,
        token: str,
        refresh: TokenSource,
        call_timeout_s: float,
        tls: ssl.SSLContext,
    ) -> None:
        self._url = origin.rstrip("/") + "/mcp"
        self._space_id = space_id
        self._token = token
        self._refresh = refresh
        self._call_timeout_s = call_timeout_s
        self._last_status = 0
        self._stack = AsyncExitStack()
        self._client: Client | None = None
        self._http: httpx2.AsyncClient | None = None
        self._tls = tls

    async def __aenter__(self) -> McpGateway:
        # The SDK's own factory would load the CA bundle again for every tick (~25 ms of CPU, bench/).
        self._http = httpx2.AsyncClient(
            headers=self._headers(),
            timeout=httpx2.Timeout(MCP_DEFAULT_TIMEOUT, read=MCP_DEFAULT_SSE_READ_TIMEOUT),
            verify=self._tls,
        )
        self._http.event_hooks["response"].append(self._watch)
        try:
            await self._stack.enter_async_context(self._http)
            # mode="legacy": the gateway speaks the handshake-era protocol; "auto" would cost a probe each session.
            client = Client(
                streamable_http_client(self._url, http_client=self._http),
                mode="legacy",
                read_timeout_seconds=self._call_timeout_s,
            )
            self._client = await self._stack.enter_async_context(client)
        except BaseException as exc:
            await self._stack.aclose()
            if isinstance(exc, Exception):
                raise self._error(exc) from None
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Closing a dead session must not mask the tick's own outcome.
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    async def tools(self) -> list[ToolSpec]:
        client = self._connected()
        specs: list[ToolSpec] = []
        cursor: str | None = None
        while True:
            try:
                page = await self._fresh_on_401(functools.partial(client.list_tools, cursor=cursor))
            except MCPError as exc:
                raise self._error(exc) from None
            specs += [
                ToolSpec(t.name, t.description or "", dict(t.input_schema), is_destructive(t)) for t in page.tools
            ]
            cursor = page.next_cursor
            if not cursor:
                return specs

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Never raises for a tool's own failure: that is an outcome the persona reports."""
        client = self._connected()
        try:
            result = await self._fresh_on_401(lambda: client.call_tool(name, arguments))
        except Exception as exc:  # noqa: BLE001 - a broken call is still one error row, not a dead tick
            return ToolOutcome(ok=False, text=_short(exc))
        return ToolOutcome(ok=not result.is_error, text=result_text(result))

    async def _fresh_on_401(self, send: Callable[[], Awaitable[T]]) -> T:
        """A 401 means the request never ran (the JWT expired): resend it once with a fresh JWT."""
        self._last_status = 0
        try:
            return await send()
        except MCPError:
            if self._last_status != 401:
                raise
        await self._use_token(await self._refresh())
        self._last_status = 0
        return await send()

    def _connected(self) -> Client:
        assert self._client is not None, "use McpGateway as an async context manager"
        return self._client

    async def _use_token(self, token: str) -> None:
        self._token = token
        assert self._http is not None
        self._http.headers.update(self._headers())

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", "X-Mana-Space": self._space_id}

    async def _watch(self, response: httpx2.Response) -> None:
        if response.status_code >= 400:
            self._last_status = response.status_code

    def _error(self, exc: Exception) -> ManaError:
        """The SDK hides the HTTP status; the response hook saw it, so classify by it."""
        status = self._last_status
        if status >= 400:
            return ApiError(status, "MCP_REFUSED" if status in (401, 403) else "MCP_ERROR", _short(exc), stage="mcp")
        return TransportError(f"mcp: {_short(exc)}", stage="mcp")


def _short(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
