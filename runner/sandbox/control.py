"""Test controls under /__sandbox/ on the api app: inspect what was stored, script faults, move time.

No service key here on purpose: this surface exists only in the sandbox, for tests and demos.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from runner.sandbox.auth import AuthService
from runner.sandbox.mcp_server import McpState
from runner.sandbox.store import (
    EXTRA_SPACES,
    FAULT_ROUTES,
    PERSONA_OPTIONS,
    Fault,
    Store,
    iso,
    parse_iso,
    persona_options,
)

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_CADENCES = ("daily", "weekdays", "hourly")


def validate_persona_spec(spec: Any) -> str | None:
    """Why a persona spec (catalog entry or POST body) is unusable, or None when it is fine."""
    if not isinstance(spec, dict):
        return "expected an object"
    if not isinstance(spec.get("name"), str) or not _NAME.fullmatch(spec["name"]):
        return "name: lowercase ascii letters, digits, '.', '_' or '-'"
    if spec.get("tickCadence") not in _CADENCES:
        return "tickCadence: one of daily, weekdays, hourly"
    for key in ("archetype", "systemPrompt"):
        if not isinstance(spec.get(key), str):
            return f"{key}: expected a string"
    mix = spec.get("moduleMix")
    if not isinstance(mix, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in mix.values()
    ):
        return "moduleMix: expected an object of numbers"
    options = spec.get("options", {})
    if not isinstance(options, dict) or not all(
        k in PERSONA_OPTIONS and isinstance(v, bool) for k, v in options.items()
    ):
        return f"options: booleans among {', '.join(PERSONA_OPTIONS)}"
    if spec.get("extraSpace", "team") not in EXTRA_SPACES:
        return "extraSpace: one of team, family, none"
    return None


def _bad(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return None


def control_mount(store: Store, auth: AuthService, mcp: McpState) -> Mount:
    clock, faults = auth.clock, auth.faults

    async def actions(request: Request) -> Response:
        persona_id = request.query_params.get("personaId")  # optional filter
        where = " WHERE persona_id = ?" if persona_id else ""
        rows = store.query(
            "SELECT id, persona_id AS personaId, tick_id AS tickId, tool_name AS toolName, result,"
            " input_hash AS inputHash, error_message AS errorMessage, latency_ms AS latencyMs,"
            f" created_at AS createdAt FROM actions{where} ORDER BY rowid",
            (persona_id,) if persona_id else (),
        )
        return JSONResponse(rows)

    async def feedback(request: Request) -> Response:
        rows = store.query(
            "SELECT id, persona_id AS personaId, tick_id AS tickId, module, rating, notes, created_at AS createdAt"
            " FROM feedback ORDER BY rowid"
        )
        return JSONResponse(rows)

    async def mcp_calls(request: Request) -> Response:
        rows = store.query(
            "SELECT seq, user_id AS userId, space_id AS spaceId, tool, arguments, is_error AS isError,"
            " error_text AS errorText, at FROM mcp_calls ORDER BY seq"
        )
        for row in rows:
            row["arguments"] = json.loads(row["arguments"])
            row["isError"] = bool(row["isError"])
        return JSONResponse(rows)

    async def requests(request: Request) -> Response:
        """What each service received (runner/sandbox/witness.py): credentials by owner, never by value."""
        rows = store.query(
            "SELECT service, method, path, origin, session_cookies AS sessionCookies, owners, status, traceparent, at"
            " FROM requests ORDER BY seq"
        )
        for row in rows:
            row["owners"] = json.loads(row["owners"])
        return JSONResponse(rows)

    async def logins(request: Request) -> Response:
        rows = store.query("SELECT email, outcome, at, route, real_at AS realAt FROM logins ORDER BY seq")
        return JSONResponse(rows)

    async def personas(request: Request) -> Response:
        rows = []
        for p in store.query("SELECT * FROM personas ORDER BY seq"):
            rows.append(
                {
                    "userId": p["id"],
                    "email": p["email"],
                    "name": p["name"],
                    "archetype": p["archetype"],
                    "tickCadence": p["tick_cadence"],
                    "moduleMix": json.loads(p["module_mix"]),
                    "lastActiveAt": p["last_active_at"],
                    "options": persona_options(p),
                    "deleted": bool(p["deleted"]),
                    "spaces": [
                        {"id": s["id"], "name": s["name"], "slug": s["slug"], "type": s["type"]}
                        for s in store.spaces(p["id"])
                    ],
                }
            )
        return JSONResponse(rows)

    async def create_persona(request: Request) -> Response:
        spec = await _body(request)
        if (problem := validate_persona_spec(spec)) is not None:
            return _bad(problem)
        if store.one("SELECT id FROM personas WHERE name = ?", (spec["name"],)) is not None:
            return _bad("persona exists", 409)
        return JSONResponse(store.create_persona(spec, spec.get("extraSpace", "team"), clock.now()))

    async def delete_persona(request: Request) -> Response:
        changed = store.execute("UPDATE personas SET deleted = 1 WHERE id = ?", (request.path_params["id"],))
        return JSONResponse({"ok": bool(changed)}, status_code=200 if changed else 404)

    async def arm_fault(request: Request) -> Response:
        body = await _body(request)
        if not isinstance(body, dict) or body.get("route") not in FAULT_ROUTES:
            return _bad(f"route: one of {', '.join(FAULT_ROUTES)}")
        status, count, retry = body.get("status"), body.get("count", 1), body.get("retryAfter")
        if not isinstance(status, int) or not 100 <= status <= 599 or not isinstance(count, int) or count < 0:
            return _bad("status: int 100..599, count: int >= 0")
        if retry is not None and (not isinstance(retry, int) or retry < 0):
            return _bad("retryAfter: int >= 0")
        code = body.get("code")
        faults.arm(body["route"], Fault(status, count, retry, code if isinstance(code, str) else None))
        return JSONResponse({"ok": True})

    async def set_clock(request: Request) -> Response:
        body = await _body(request)
        value = body.get("now") if isinstance(body, dict) else "missing"
        try:
            clock.fixed = None if value is None else parse_iso(str(value))
        except ValueError:
            return _bad("now: an ISO-8601 time or null")
        return JSONResponse({"now": iso(clock.now()), "fixed": clock.fixed is not None})

    async def arm_tool_fault(request: Request) -> Response:
        """{"tool", "message"} fails the handler; {"tool", "padTo": N} pads the result text to N characters."""
        body = await _body(request)
        tool, count = (body.get("tool"), body.get("count", 1)) if isinstance(body, dict) else (None, None)
        if not isinstance(tool, str) or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return _bad("tool: a tool name, count: int >= 0")
        message, pad_to = body.get("message"), body.get("padTo")
        if isinstance(message, str) and message and pad_to is None:
            mcp.faults.arm_failure(tool, message, count)
        elif isinstance(pad_to, int) and not isinstance(pad_to, bool) and pad_to > 0 and message is None:
            mcp.faults.arm_padding(tool, pad_to, count)
        else:
            return _bad("one of message: a non-empty string, padTo: int > 0")
        return JSONResponse({"ok": True})

    async def expire_jwts(request: Request) -> Response:
        """JWTs issued before now count as expired: at the gateway (401) and in the handlers of their sessions."""
        body = await _body(request)
        user_id = body.get("userId") if isinstance(body, dict) else None
        if user_id is not None and not isinstance(user_id, str):
            return _bad("userId: a string, or absent for everyone")
        await mcp.cutoffs.expire(user_id)
        return JSONResponse({"ok": True})

    async def revoke_sessions(request: Request) -> Response:
        return JSONResponse({"revoked": auth.revoke_sessions()})

    return Mount(
        "/__sandbox",
        routes=[
            Route("/actions", actions, methods=["GET"]),
            Route("/feedback", feedback, methods=["GET"]),
            Route("/mcp-calls", mcp_calls, methods=["GET"]),
            Route("/logins", logins, methods=["GET"]),
            Route("/requests", requests, methods=["GET"]),
            Route("/personas", personas, methods=["GET"]),
            Route("/personas", create_persona, methods=["POST"]),
            Route("/personas/{id}", delete_persona, methods=["DELETE"]),
            Route("/faults", arm_fault, methods=["POST"]),
            Route("/clock", set_clock, methods=["POST"]),
            Route("/sessions/revoke", revoke_sessions, methods=["POST"]),
            Route("/tool-faults", arm_tool_fault, methods=["POST"]),
            Route("/jwt/expire", expire_jwts, methods=["POST"]),
        ],
    )
