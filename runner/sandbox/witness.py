"""What each sandbox service *received*: every request's credentials, as the server saw them.

Tests assert on this record, not on what a client meant to send (issue 13: a shared client sent
one persona's cookie with the next persona's sign-in, and no test looked). For each request it
keeps the service, method, path, `Origin`, the number of Better Auth session cookies, and the
*owners* of every credential it carried: the user of each session cookie, the subject of the
Bearer JWT, the persona whose email a sign-in body names, and the user who opened the MCP session
it names; and for an MCP tool call, the `traceparent` its `params._meta` carried. A request
whose owners are more than one person carried someone else's credential. Secrets themselves are
never recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.sandbox.store import Store

if TYPE_CHECKING:
    from runner.sandbox.auth import AuthService

SessionOwner = Callable[[str], str | None]


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """The body once more, then the connection's own messages (a disconnect must still be seen)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


def cookie_pairs(header: str) -> list[tuple[str, str]]:
    """Every `name=value` of a Cookie header, repeated names included (a jar gone wrong may send two)."""
    pairs: list[tuple[str, str]] = []
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            pairs.append((name, value))
    return pairs


class Witness:
    """ASGI middleware recording who each request's credentials belong to, for one service."""

    def __init__(
        self,
        app: ASGIApp,
        service: str,
        store: Store,
        auth: AuthService,
        session_owner: SessionOwner | None = None,
    ) -> None:
        self.app, self.service, self.store, self.auth = app, service, store, auth
        self.session_owner = session_owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/__sandbox"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        owners: set[str] = set()
        cookies = 0
        for name, value in cookie_pairs(headers.get("cookie", "")):
            if name.endswith("session_token"):
                cookies += 1
                owners.add(self.auth.cookie_owner(value) or "<unknown session>")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            claims = self.auth.jwt_claims(token.strip(), verify_exp=False)
            owners.add(str(claims.get("sub")) if claims else "<unknown token>")
        if self.session_owner is not None and (session_id := headers.get("mcp-session-id")):
            owners.add(self.session_owner(session_id) or "<unknown session>")
        traceparent: str | None = None
        if scope["method"] == "POST" and self.service in ("auth", "mcp"):
            body = await read_body(receive)
            receive = replay(body, receive)
            message = _json(body)
            if self.service == "auth" and isinstance(email := _field(message, "email"), str):
                persona = self.store.persona_by_email(email)
                owners.add(persona["id"] if persona else f"<{email}>")
            if self.service == "mcp" and _field(message, "method") == "tools/call":
                # The W3C trace context the client put into the call (the MCP convention: params._meta).
                meta = _field(_field(message, "params"), "_meta")
                traceparent = tp if isinstance(tp := _field(meta, "traceparent"), str) else None
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.store.execute(
                "INSERT INTO requests (service, method, path, origin, session_cookies, owners, status, traceparent, at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    self.service,
                    scope["method"],
                    scope["path"],
                    headers.get("origin"),
                    cookies,
                    json.dumps(sorted(owners)),
                    status,
                    traceparent,
                    time.time(),
                ),
            )


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _field(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, dict) else None


__all__ = ["Witness", "cookie_pairs", "read_body", "replay"]
