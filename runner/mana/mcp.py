"""mana-mcp: a Streamable HTTP session through the official `mcp` SDK (contract §5).

One session per tick, opened with the persona's JWT and its personal space. The real
gateway's tool handlers keep the JWT that *opened* the session, so after renewing an
expired JWT the session is replaced, not reused (contract §5).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
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
from mcp.types import CallToolResult, ListToolsResult, Tool

from runner.log import get_logger
from runner.mana.errors import ApiError, ManaError, TransportError

T = TypeVar("T")
log = get_logger("runner.mana")

TokenSource = Callable[[], Awaitable[str]]

# tools/list is paged by the server. The real gateway lists 33 tools on one page; a server that
# always answers with a next cursor must not grow the runner's memory without end (issue 7),
# and the SDK already caps one page at 1 MiB (its largest SSE event).
MAX_TOOL_PAGES = 10
MAX_TOOLS = 256
# A tick renews an expired JWT at most this often; a JWT lives 15 min and a tick at most 10.
MAX_RENEWALS = 3
# What the personas API stores per errorMessage has no documented limit (its column is text
# and nothing validates it); the reference runner cuts at 500 characters, and so do we.
ERROR_MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str  # the MCP name, dots and all
    description: str
    input_schema: dict[str, Any]
    # The server's hints as sent; None when it sent none (the real gateway never does).
    read_only_hint: bool | None = None
    destructive_hint: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    ok: bool
    text: str


class SpaceRefused(ManaError):
    """mana-mcp refused a JWT minted a moment ago: the space header (or the account) is refused.

    A missing or refused X-Mana-Space is a 401 like an expired JWT, so after one renewal a
    second 401 is not retried: renewing again would loop. Not retryable within this tick.
    """


def spec_of(tool: Tool) -> ToolSpec:
    hints = tool.annotations
    return ToolSpec(
        name=tool.name,
        description=tool.description or "",
        input_schema=dict(tool.input_schema),
        read_only_hint=hints.read_only_hint if hints is not None else None,
        destructive_hint=hints.destructive_hint if hints is not None else None,
    )


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
    status. A 401 mid-tick means the JWT expired: fetch a fresh one, open a new session with
    it and resend there; a 401 right after that raises SpaceRefused instead of looping.
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
        self._session = AsyncExitStack()
        self._client: Client | None = None
        self._http: httpx2.AsyncClient | None = None
        self._tls = tls
        self.renewals = 0  # JWT renewals this tick, each with a new session
        self.sessions = 0  # sessions opened this tick
        self._renewed_unproven = False  # renewed, and no request has succeeded since

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
            await self._open_session()
        except BaseException as exc:
            await self._stack.aclose()
            if isinstance(exc, ApiError) and exc.status == 401:
                # The JWT was minted for this tick a moment ago: renewing it would change nothing.
                raise self._refused(exc) from None
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Closing a dead session must not mask the tick's own outcome.
        with contextlib.suppress(Exception):
            await self._session.aclose()
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    async def _open_session(self) -> None:
        """Initialize a session on the shared HTTP client; raise a classified ManaError when refused."""
        assert self._http is not None, "use McpGateway as an async context manager"
        self._last_status = 0
        # mode="legacy": the gateway speaks the handshake-era protocol; "auto" would cost a probe each session.
        client = Client(
            streamable_http_client(self._url, http_client=self._http),
            mode="legacy",
            read_timeout_seconds=self._call_timeout_s,
        )
        try:
            self._client = await self._session.enter_async_context(client)
        except Exception as exc:  # noqa: BLE001 - classified by the status the hook saw
            with contextlib.suppress(Exception):
                await self._session.aclose()
            raise self._error(exc) from None
        self.sessions += 1

    async def tools(self) -> list[ToolSpec]:
        """Every served tool, bounded in pages and count (a cut is logged with its reason)."""
        specs: list[ToolSpec] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_TOOL_PAGES):
            try:
                page = await self._renewing(functools.partial(self._list_page, cursor))
            except MCPError as exc:
                raise self._error(exc) from None
            specs += [spec_of(t) for t in page.tools]
            if len(specs) >= MAX_TOOLS:
                if page.next_cursor or len(specs) > MAX_TOOLS:
                    log.warning("tools/list cut", kept=MAX_TOOLS, reason=f"more than MAX_TOOLS={MAX_TOOLS} served")
                return specs[:MAX_TOOLS]
            cursor = page.next_cursor
            if not cursor:
                return specs
            if cursor in seen:
                log.warning("tools/list cut", kept=len(specs), reason="the server repeated a cursor")
                return specs
            seen.add(cursor)
        log.warning("tools/list cut", kept=len(specs), reason=f"more than MAX_TOOL_PAGES={MAX_TOOL_PAGES} pages")
        return specs

    async def _list_page(self, cursor: str | None) -> ListToolsResult:
        # Looked up at send time: after a renewal the resend goes to the new session.
        return await self._connected().list_tools(cursor=cursor)

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """A tool's own failure is an outcome the persona reports, never an exception.

        A ManaError escapes: a refused space, or a renewal whose login or new session failed.
        Without a session the tick cannot go on, and a renewal must not be tried again per call.
        """
        try:
            result = await self._renewing(functools.partial(self._call_tool, name, arguments))
        except ManaError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken call is still one error row, not a dead tick
            return ToolOutcome(ok=False, text=_short(exc))
        return ToolOutcome(ok=not result.is_error, text=result_text(result))

    async def _call_tool(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        return await self._connected().call_tool(name, arguments)

    async def _renewing(self, send: Callable[[], Awaitable[T]]) -> T:
        """Send; on a 401 (the request never ran), renew the JWT, open a new session, resend there."""
        self._last_status = 0
        try:
            answer = await send()
        except MCPError:
            if self._last_status != 401:
                raise
            await self._renew()
            self._last_status = 0
            try:
                answer = await send()
            except MCPError as exc:
                if self._last_status == 401:
                    raise self._refused(exc) from None
                raise
        self._renewed_unproven = False
        return answer

    async def _renew(self) -> None:
        if self._renewed_unproven or self.renewals >= MAX_RENEWALS:
            raise SpaceRefused(
                f"mcp: HTTP 401 again after {self.renewals} JWT renewal(s) this tick; not renewing again",
                stage="mcp",
            )
        self._token = await self._refresh()
        self.renewals += 1
        self._renewed_unproven = True
        assert self._http is not None
        self._http.headers.update(self._headers())
        # The old session's handlers would go on with the expired JWT: close it (its DELETE
        # carries the new JWT, so the gateway can drop it) and open a new one.
        with contextlib.suppress(Exception):
            await self._session.aclose()
        self._session = AsyncExitStack()
        self._client = None
        try:
            await self._open_session()
        except ApiError as exc:
            if exc.status == 401:
                raise self._refused(exc) from None
            raise
        log.info("mcp session renewed", renewals=self.renewals)

    def _refused(self, exc: BaseException) -> SpaceRefused:
        fresh = "renewed" if self.renewals else "minted for this tick"
        return SpaceRefused(
            f"mcp: HTTP 401 with a JWT {fresh} a moment ago: the X-Mana-Space header or the account is refused"
            f" ({_short(exc)})",
            stage="mcp",
        )

    def _connected(self) -> Client:
        assert self._client is not None, "use McpGateway as an async context manager"
        return self._client

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", "X-Mana-Space": self._space_id}

    async def _watch(self, response: httpx2.Response) -> None:
        if response.status_code >= 400:
            self._last_status = response.status_code

    def _error(self, exc: Exception) -> ManaError:
        """The SDK hides the HTTP status; the response hook saw it, so classify by it."""
        if isinstance(exc, ManaError):
            return exc
        status = self._last_status
        if status >= 400:
            return ApiError(status, "MCP_REFUSED" if status in (401, 403) else "MCP_ERROR", _short(exc), stage="mcp")
        return TransportError(f"mcp: {_short(exc)}", stage="mcp")


def _short(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


# --- what an error row keeps of a tool's error text ---------------------------------------

_WS = re.compile(r"\s+")
# `MCP error -32602: Input validation error: Invalid arguments for tool habits.create: [ …zod issues… ]`
_VALIDATION = re.compile(
    r"^(?:MCP error -?\d+:\s*)?(?:Input validation error:\s*)?"
    r"(?P<head>Invalid arguments for tool \S+?):\s*(?P<issues>\[.*\])\s*$",
    re.DOTALL,
)
_JSONRPC_PREFIX = re.compile(r"^MCP error -?\d+:\s*")


def error_message(text: str, limit: int = ERROR_MESSAGE_LIMIT) -> str:
    """The informative part of an error text, for an action row's errorMessage (the one rule).

    A schema refusal's JSON issue list becomes `path: message (check)` per issue; every text
    has its whitespace collapsed (the gateway's texts are multi-line) and is cut at `limit`.
    `Tool X failed: …` and `Tool X not allowed: …` are kept whole up to the limit.
    """
    stripped = text.strip()
    match = _VALIDATION.match(stripped)
    if match is not None:
        issues = _issues(match.group("issues"))
        if issues is not None:
            stripped = f"{match.group('head')}: {issues}"
    elif stripped.startswith("MCP error"):
        stripped = _JSONRPC_PREFIX.sub("", stripped)
    flat = _WS.sub(" ", stripped).strip() or "error"
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _issues(raw: str) -> str | None:
    try:
        issues = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(issues, list) or not issues:
        return None
    parts: list[str] = []
    for issue in issues:
        if not isinstance(issue, dict):
            return None
        path = issue.get("path")
        where = ".".join(str(p) for p in path) if isinstance(path, list) and path else "(input)"
        message = str(issue.get("message") or issue.get("code") or "invalid")
        # zod 3 names a failed string check `validation`, zod 4 `format`; "Invalid" alone says little.
        check = issue.get("validation") or issue.get("format")
        parts.append(f"{where}: {message}" + (f" ({check})" if isinstance(check, str) and check else ""))
    return "; ".join(parts)
