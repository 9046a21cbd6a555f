"""mana-mcp stand-in: the official SDK's MCPServer behind a gateway that checks JWT, space and session (§5).

Layers, outside in:
- `Gateway` (ASGI): injected faults, Bearer JWT (401), X-Mana-Space of that user (403), a session
  presented by another user (403). It hands the caller to the MCP layer through the ASGI scope.
- `_ToolCallRecorder` (SDK server middleware): per-user rate limit, input validation with the
  gateway's error texts, and a row in `mcp_calls` for every tools/call, valid or not.
- The tools: small CRUD over per-user, per-space SQLite tables.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import ToolAnnotations
from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.sandbox.auth import AuthService
from runner.sandbox.store import Clock, Faults, Store, error_response, iso, new_id

RATE_LIMIT_CALLS = 30
RATE_LIMIT_WINDOW_S = 60.0
ARCHIVE_CHARS = 300_000
_SCOPE_KEY = "mana.caller"

READ = ToolAnnotations(read_only_hint=True)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: str
    space_id: str


# Set by the recorder around each tools/call; the tool bodies read it instead of taking a ctx.
_caller: ContextVar[Caller] = ContextVar("mana_caller")


# --- the gateway in front -----------------------------------------------------------------


class Gateway:
    def __init__(self, app: ASGIApp, auth: AuthService, store: Store, faults: Faults) -> None:
        self.app = app
        self.auth = auth
        self.store = store
        self.faults = faults
        self._owners: dict[str, str] = {}  # Mcp-Session-Id -> the user who opened it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: the SDK's session manager must run
            await self.app(scope, receive, send)
            return
        if (fault := self.faults.take("mcp")) is not None:
            await fault(scope, receive, send)
            return
        request = Request(scope)
        user_id = self.auth.user_from_bearer(request)
        if user_id is None:
            # A session token (not a JWT), an expired or foreign-signed JWT all land here.
            refusal = error_response(401, "UNAUTHORIZED", "A valid access token is required")
            refusal.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            await refusal(scope, receive, send)
            return
        space_id = request.headers.get("x-mana-space", "")
        if space_id not in {s["id"] for s in self.store.spaces(user_id)}:
            await error_response(403, "FORBIDDEN", "X-Mana-Space is not a space of this user")(scope, receive, send)
            return
        session_id = request.headers.get("mcp-session-id")
        if session_id is not None and self._owners.get(session_id, user_id) != user_id:
            await error_response(403, "FORBIDDEN", "This session belongs to another user")(scope, receive, send)
            return
        scope[_SCOPE_KEY] = Caller(user_id, space_id)

        async def remember_owner(message: Message) -> None:
            if message["type"] == "http.response.start" and session_id is None:
                for key, value in message.get("headers", []):
                    if key.lower() == b"mcp-session-id":
                        self._owners.setdefault(value.decode("latin-1"), user_id)
            await send(message)

        await self.app(scope, receive, remember_owner)


# --- rate limit, validation, recording ----------------------------------------------------


def _error_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


def _validation_text(tool: str, exc: ValidationError) -> str:
    """`Invalid input for todo.create: title: Required`, the gateway's (zod-flavoured) wording."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "input"
        parts.append(f"{where}: {'Required' if error['type'] == 'missing' else error['msg']}")
    return f"Invalid input for {tool}: " + "; ".join(parts)


class _ToolCallRecorder:
    def __init__(self, store: Store, clock: Clock, tools: dict[str, Tool]) -> None:
        self.store = store
        self.clock = clock
        self.tools = tools
        self._calls: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def _limited(self, user_id: str, tool: str) -> bool:
        window = self._calls[(user_id, tool)]
        now = time.monotonic()
        while window and now - window[0] >= RATE_LIMIT_WINDOW_S:
            window.popleft()
        if len(window) >= RATE_LIMIT_CALLS:
            return True
        window.append(now)
        return False

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        request = ctx.request
        caller = request.scope.get(_SCOPE_KEY) if isinstance(request, Request) else None
        if not isinstance(caller, Caller):  # cannot happen behind the Gateway; refuse rather than guess
            return _error_result("Unauthorized")
        params = dict(ctx.params or {})
        name = str(params.get("name", ""))
        arguments = params.get("arguments")
        text: str | None = None
        result: dict[str, Any] | None = None
        try:
            tool = self.tools.get(name)
            if self._limited(caller.user_id, name):
                result = _error_result(f"Rate limit exceeded for {name}")
            elif tool is not None and isinstance(arguments, dict):
                try:
                    tool.fn_metadata.validate_arguments(arguments)
                except ValidationError as exc:
                    result = _error_result(_validation_text(name, exc))
            if result is None:
                token = _caller.set(caller)
                try:
                    answer = await call_next(ctx)
                finally:
                    _caller.reset(token)
                result = dict(answer) if isinstance(answer, dict) else {}
                _rename_failure(result, name)
            text = _first_text(result) if result.get("isError") else None
            return result
        except Exception as exc:  # a protocol error: still a call that reached the server
            text = str(exc) or type(exc).__name__
            raise
        finally:
            self.store.execute(
                "INSERT INTO mcp_calls (user_id, space_id, tool, arguments, is_error, error_text, at)"
                " VALUES (?,?,?,?,?,?,?)",
                (
                    caller.user_id,
                    caller.space_id,
                    name,
                    json.dumps(arguments, ensure_ascii=False),
                    int(result is None or bool(result.get("isError"))),
                    text,
                    iso(self.clock.now()),
                ),
            )


def _first_text(result: dict[str, Any]) -> str | None:
    for block in result.get("content") or []:
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            return str(block["text"])[:1000]
    return None


def _rename_failure(result: dict[str, Any], tool: str) -> None:
    """The SDK says `Error executing tool X: …`; the Mana gateway says `Tool X failed: …`."""
    if not result.get("isError"):
        return
    prefix = f"Error executing tool {tool}: "
    for block in result.get("content") or []:
        if isinstance(block, dict) and isinstance(block.get("text"), str) and block["text"].startswith(prefix):
            block["text"] = f"Tool {tool} failed: " + block["text"][len(prefix) :]


# --- the tools ------------------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def build_tools(store: Store, clock: Clock) -> list[Tool]:
    tools: list[Tool] = []

    def tool(name: str, annotations: ToolAnnotations | None, description: str) -> Callable[[Any], Any]:
        def register(fn: Any) -> Any:
            # Unstructured output: the text block is the result, no duplicate structured copy.
            tools.append(
                Tool.from_function(
                    fn, name=name, description=description, annotations=annotations, structured_output=False
                )
            )
            return fn

        return register

    def who() -> Caller:
        return _caller.get()

    def owned(table: str, item_id: str, label: str) -> dict[str, Any]:
        c = who()
        row = store.one(
            f"SELECT * FROM {table} WHERE id = ? AND user_id = ? AND space_id = ?", (item_id, c.user_id, c.space_id)
        )
        if row is None:
            raise ToolError(f"{label} {item_id} not found")
        return row

    def now() -> str:
        return iso(clock.now())

    # todo ------------------------------------------------------------------------------
    @tool("todo.create", WRITE, "Create a todo in the current space.")
    async def todo_create(
        title: Annotated[str, Field(min_length=1, max_length=500, description="What needs doing")],
        due: Annotated[date | None, Field(description="Due date, YYYY-MM-DD")] = None,
        priority: Annotated[int | None, Field(ge=1, le=3, description="1 = high, 3 = low")] = None,
    ) -> str:
        c, item_id, due_text = who(), new_id("todo_"), due.isoformat() if due else None
        store.execute(
            "INSERT INTO todos (id, user_id, space_id, title, due, priority, status, created_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (item_id, c.user_id, c.space_id, title, due_text, priority, "open", now()),
        )
        return _dump({"id": item_id, "title": title, "due": due_text, "priority": priority, "status": "open"})

    @tool("todo.list", READ, "List todos in the current space.")
    async def todo_list(status: Literal["open", "done", "all"] = "open") -> str:
        c = who()
        sql = "SELECT id, title, due, priority, status FROM todos WHERE user_id = ? AND space_id = ?"
        params: list[Any] = [c.user_id, c.space_id]
        if status != "all":
            sql += " AND status = ?"
            params.append(status)
        return _dump({"todos": store.query(sql + " ORDER BY created_at, id", params)})

    @tool("todo.complete", WRITE, "Mark a todo as done.")
    async def todo_complete(id: Annotated[str, Field(min_length=1)]) -> str:
        owned("todos", id, "todo")
        store.execute("UPDATE todos SET status = 'done' WHERE id = ?", (id,))
        return _dump({"id": id, "status": "done"})

    @tool("todo.delete", DESTRUCTIVE, "Delete a todo for good.")
    async def todo_delete(id: Annotated[str, Field(min_length=1)]) -> str:
        owned("todos", id, "todo")
        store.execute("DELETE FROM todos WHERE id = ?", (id,))
        return _dump({"id": id, "deleted": True})

    @tool("todo.bulkImport", None, "Import many todos at once (replaces nothing, but unreviewed).")
    async def todo_bulk_import(items: list[str]) -> str:
        # Registered without annotations: per the MCP spec that reads as destructive.
        c = who()
        ids = []
        for title in items:
            ids.append(new_id("todo_"))
            store.execute(
                "INSERT INTO todos (id, user_id, space_id, title, status, created_at) VALUES (?,?,?,?,?,?)",
                (ids[-1], c.user_id, c.space_id, title, "open", now()),
            )
        return _dump({"imported": len(ids), "ids": ids})

    # notes -----------------------------------------------------------------------------
    @tool("notes.create", WRITE, "Write a note.")
    async def notes_create(
        title: Annotated[str, Field(min_length=1, max_length=500)], body: Annotated[str, Field(max_length=20_000)]
    ) -> str:
        c, item_id = who(), new_id("note_")
        store.execute(
            "INSERT INTO notes (id, user_id, space_id, title, body, created_at) VALUES (?,?,?,?,?,?)",
            (item_id, c.user_id, c.space_id, title, body, now()),
        )
        return _dump({"id": item_id, "title": title})

    @tool("notes.search", READ, "Search notes by a word in title or body.")
    async def notes_search(query: Annotated[str, Field(min_length=1, max_length=200)]) -> str:
        c = who()
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = store.query(
            "SELECT id, title, body FROM notes WHERE user_id = ? AND space_id = ?"
            " AND (title LIKE ? ESCAPE '\\' OR body LIKE ? ESCAPE '\\') ORDER BY created_at, id LIMIT 20",
            (c.user_id, c.space_id, pattern, pattern),
        )
        return _dump({"notes": rows})

    @tool("notes.delete", DESTRUCTIVE, "Delete a note for good.")
    async def notes_delete(id: Annotated[str, Field(min_length=1)]) -> str:
        owned("notes", id, "note")
        store.execute("DELETE FROM notes WHERE id = ?", (id,))
        return _dump({"id": id, "deleted": True})

    @tool("notes.export", WRITE, "Export all notes as a file.")
    async def notes_export() -> str:
        # Always fails: the runner must record it as an error row and carry on.
        raise ToolError("export backend unavailable")

    # journal ---------------------------------------------------------------------------
    @tool("journal.add", WRITE, "Add a journal entry.")
    async def journal_add(
        text: Annotated[str, Field(min_length=1, max_length=10_000)],
        mood: Annotated[int | None, Field(ge=1, le=5, description="1 = awful, 5 = great")] = None,
    ) -> str:
        c, item_id = who(), new_id("jrn_")
        store.execute(
            "INSERT INTO journal (id, user_id, space_id, text, mood, created_at) VALUES (?,?,?,?,?,?)",
            (item_id, c.user_id, c.space_id, text, mood, now()),
        )
        return _dump({"id": item_id, "mood": mood})

    @tool("journal.list", READ, "Latest journal entries, newest first.")
    async def journal_list(limit: Annotated[int, Field(ge=1, le=50)] = 10) -> str:
        c = who()
        rows = store.query(
            "SELECT id, text, mood, created_at AS createdAt FROM journal WHERE user_id = ? AND space_id = ?"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (c.user_id, c.space_id, limit),
        )
        return _dump({"entries": rows})

    @tool("journal.archive", READ, "The whole journal archive as text (large).")
    async def journal_archive() -> str:
        # ~300 KB on purpose: the runner must bound what it hands to the model.
        c = who()
        lines = [f"# Journal-Archiv {c.space_id}"]
        entries = store.query(
            "SELECT text, created_at FROM journal WHERE user_id = ? AND space_id = ?", (c.user_id, c.space_id)
        )
        for row in entries:
            lines.append(f"{row['created_at']}: {row['text']}")
        n, size = 0, sum(len(line) + 1 for line in lines)
        while size < ARCHIVE_CHARS:
            n += 1
            line = f"Archiv-Eintrag {n:05d}: Heute war ein ganz gewöhnlicher Tag, nichts Besonderes passiert."
            lines.append(line)
            size += len(line) + 1
        return "\n".join(lines)

    # habits ----------------------------------------------------------------------------
    @tool("habits.create", WRITE, "Start tracking a habit.")
    async def habits_create(
        name: Annotated[str, Field(min_length=1, max_length=200)], cadence: Literal["daily", "weekly"]
    ) -> str:
        c, item_id = who(), new_id("hab_")
        store.execute(
            "INSERT INTO habits (id, user_id, space_id, name, cadence, created_at) VALUES (?,?,?,?,?,?)",
            (item_id, c.user_id, c.space_id, name, cadence, now()),
        )
        return _dump({"id": item_id, "name": name, "cadence": cadence})

    @tool("habits.list", READ, "List active habits.")
    async def habits_list() -> str:
        c = who()
        rows = store.query(
            "SELECT id, name, cadence FROM habits WHERE user_id = ? AND space_id = ? AND archived = 0"
            " ORDER BY created_at, id",
            (c.user_id, c.space_id),
        )
        return _dump({"habits": rows})

    @tool("habits.update", WRITE, "Rename a habit.")
    async def habits_update(
        id: Annotated[str, Field(min_length=1)], name: Annotated[str, Field(min_length=1, max_length=200)]
    ) -> str:
        owned("habits", id, "habit")
        store.execute("UPDATE habits SET name = ? WHERE id = ?", (name, id))
        return _dump({"id": id, "name": name})

    @tool("habits.archive", DESTRUCTIVE, "Archive a habit (stops tracking, hides history).")
    async def habits_archive(id: Annotated[str, Field(min_length=1)]) -> str:
        owned("habits", id, "habit")
        store.execute("UPDATE habits SET archived = 1 WHERE id = ?", (id,))
        return _dump({"id": id, "archived": True})

    # mood ------------------------------------------------------------------------------
    @tool("mood.log", WRITE, "Log how you feel right now.")
    async def mood_log(
        score: Annotated[int, Field(ge=1, le=10, description="1 = awful, 10 = great")],
        note: Annotated[str | None, Field(max_length=2000)] = None,
    ) -> str:
        c, item_id = who(), new_id("mood_")
        store.execute(
            "INSERT INTO moods (id, user_id, space_id, score, note, at) VALUES (?,?,?,?,?,?)",
            (item_id, c.user_id, c.space_id, score, note, now()),
        )
        return _dump({"id": item_id, "score": score})

    @tool("mood.today", READ, "Mood entries of today (server's UTC day).")
    async def mood_today() -> str:
        c = who()
        day = clock.now().date().isoformat()
        rows = store.query(
            "SELECT id, score, note, at FROM moods WHERE user_id = ? AND space_id = ? AND substr(at, 1, 10) = ?"
            " ORDER BY at",
            (c.user_id, c.space_id, day),
        )
        return _dump({"date": day, "entries": rows})

    @tool("mood.recent", READ, "Mood entries of the last days.")
    async def mood_recent(days: Annotated[int, Field(ge=1, le=30)] = 7) -> str:
        c = who()
        since = iso(clock.now() - timedelta(days=days))
        rows = store.query(
            "SELECT id, score, note, at FROM moods WHERE user_id = ? AND space_id = ? AND at >= ? ORDER BY at",
            (c.user_id, c.space_id, since),
        )
        return _dump({"days": days, "entries": rows})

    # spaces ----------------------------------------------------------------------------
    @tool("spaces.list", READ, "The spaces you belong to.")
    async def spaces_list() -> str:
        spaces = store.spaces(who().user_id)
        return _dump({"spaces": [{"id": s["id"], "name": s["name"], "type": s["type"]} for s in spaces]})

    return tools


def build_mcp_app(store: Store, clock: Clock, faults: Faults, auth: AuthService, host: str) -> ASGIApp:
    """A fresh MCPServer per sandbox: its session manager can run only once."""
    tools = build_tools(store, clock)
    server: MCPServer[Any] = MCPServer("mana-mcp-sandbox", tools=tools, log_level="WARNING")
    server.middleware.append(_ToolCallRecorder(store, clock, {t.name: t for t in tools}))
    return Gateway(server.streamable_http_app(host=host), auth, store, faults)
