"""apps/api personas internal API stand-in: /due, /:id/actions, /:id/feedback (contract §4)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from runner.sandbox.store import Clock, Faults, Store, iso, parse_iso, persona_options

BASE_PATH = "/api/v1/personas/internal"
LEGACY_BASE_PATH = "/api/v1/internal/personas"  # older deployments served it from mana-auth
MAX_ACTIONS = 500
MAX_FEEDBACK = 100


class _Invalid(Exception):
    """A body the real API's validator would refuse; the message names the first bad field."""


def is_due(persona: dict[str, Any], now: datetime) -> bool:
    if persona_options(persona).get("alwaysDue"):
        return True
    cadence = persona["tick_cadence"]
    if cadence == "weekdays" and now.weekday() >= 5:  # the server's UTC day
        return False
    last = persona["last_active_at"]
    if last is None:
        return True
    gap = timedelta(hours=1) if cadence == "hourly" else timedelta(hours=24)
    return now - parse_iso(last) >= gap


def due_row(persona: dict[str, Any]) -> dict[str, Any]:
    return {
        "userId": persona["id"],
        "email": persona["email"],
        "archetype": persona["archetype"],
        "systemPrompt": persona["system_prompt"],
        "moduleMix": json.loads(persona["module_mix"]),
        "tickCadence": persona["tick_cadence"],
        "lastActiveAt": persona["last_active_at"],
    }


class PersonasApi:
    def __init__(self, store: Store, clock: Clock, faults: Faults, service_key: str) -> None:
        self.store = store
        self.clock = clock
        self.faults = faults
        self._service_key = service_key.encode()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/due", self.due, methods=["GET"]),
            Route("/{id}/actions", self.actions, methods=["POST"]),
            Route("/{id}/feedback", self.feedback, methods=["POST"]),
        ]

    def mount(self, path: str = BASE_PATH) -> Mount:
        return Mount(path, routes=self.routes())

    def _refuse(self, request: Request, route: str) -> Response | None:
        """Injected fault first (an outage in front of the app), then the service key."""
        if (fault := self.faults.take(route)) is not None:
            return fault
        key = request.headers.get("x-service-key", "").encode()
        if not hmac.compare_digest(key, self._service_key):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def due(self, request: Request) -> Response:
        if (refused := self._refuse(request, "due")) is not None:
            return refused
        now = self.clock.now()
        rows = [p for p in self.store.query("SELECT * FROM personas WHERE deleted = 0") if is_due(p, now)]
        # Never active first, then the longest idle; seq keeps ties stable.
        rows.sort(key=lambda p: (p["last_active_at"] is not None, p["last_active_at"] or "", p["seq"]))
        return JSONResponse({"personas": [due_row(p) for p in rows], "serverTime": iso(now)})

    async def _batch(
        self, request: Request, kind: str, limit: int, check: Callable[[dict[str, Any], int], None]
    ) -> tuple[str, list[dict[str, Any]]] | Response:
        """The checks both row routes share, in the contract's order: fault, key, body, persona."""
        if (refused := self._refuse(request, kind)) is not None:
            return refused
        try:
            rows = _rows(await request.body(), kind, limit)
            for i, row in enumerate(rows):
                check(row, i)
        except _Invalid as exc:
            return _bad(str(exc))
        persona_id = request.path_params["id"]
        if self.store.persona(persona_id) is None:
            return JSONResponse({"error": "Persona not found"}, status_code=404)
        return persona_id, rows

    async def actions(self, request: Request) -> Response:
        accepted = await self._batch(request, "actions", MAX_ACTIONS, _check_action)
        if isinstance(accepted, Response):
            return accepted
        persona_id, rows = accepted
        now = iso(self.clock.now())
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO actions (id, persona_id, tick_id, tool_name, result, input_hash, error_message,"
                " latency_ms, created_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [
                    (
                        # The id rule is the whole idempotency story: index in *this* request.
                        f"{row['tickId']}-{i}-{row['toolName']}"[:255],
                        persona_id,
                        row["tickId"],
                        row["toolName"],
                        row["result"],
                        row.get("inputHash"),
                        row.get("errorMessage"),
                        _int_or_none(row.get("latencyMs")),
                        now,
                    )
                    for i, row in enumerate(rows)
                ],
            )
            db.execute("UPDATE personas SET last_active_at = ? WHERE id = ?", (now, persona_id))
        return JSONResponse({"ok": True, "written": len(rows)})

    async def feedback(self, request: Request) -> Response:
        accepted = await self._batch(request, "feedback", MAX_FEEDBACK, _check_feedback)
        if isinstance(accepted, Response):
            return accepted
        persona_id, rows = accepted
        now = iso(self.clock.now())
        with self.store.transaction() as db:
            # One rating per module per tick; lastActiveAt is deliberately left alone.
            db.executemany(
                "INSERT INTO feedback (id, persona_id, tick_id, module, rating, notes, created_at)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [
                    (
                        f"{r['tickId']}-{r['module']}",
                        persona_id,
                        r["tickId"],
                        r["module"],
                        r["rating"],
                        r.get("notes"),
                        now,
                    )
                    for r in rows
                ],
            )
        return JSONResponse({"ok": True, "written": len(rows)})


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": "Invalid request body", "message": message}, status_code=400)


def _rows(raw: bytes, key: str, limit: int) -> list[dict[str, Any]]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Invalid("invalid JSON") from None
    rows = body.get(key) if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise _Invalid(f"{key}: expected an array")
    if not 1 <= len(rows) <= limit:
        raise _Invalid(f"{key}: expected 1 to {limit} rows, got {len(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _Invalid(f"{key}[{i}]: expected an object")
    return rows


def _require_str(row: dict[str, Any], field: str, where: str, optional: bool = False) -> None:
    # Optional means absent, not null: a zod .optional() refuses null.
    if optional and field not in row:
        return
    value = row.get(field)
    if not isinstance(value, str) or (not optional and not value):
        raise _Invalid(f"{where}.{field}: expected a {'string' if optional else 'non-empty string'}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_action(row: dict[str, Any], i: int) -> None:
    where = f"actions[{i}]"
    _require_str(row, "tickId", where)
    _require_str(row, "toolName", where)
    if row.get("result") not in ("ok", "error"):
        raise _Invalid(f"{where}.result: expected 'ok' or 'error'")
    _require_str(row, "inputHash", where, optional=True)
    _require_str(row, "errorMessage", where, optional=True)
    if "latencyMs" in row:
        value = row["latencyMs"]
        # A JSON 12.0 is an integer to JavaScript, so it passes as one here too.
        if not _is_number(value) or not float(value).is_integer():
            raise _Invalid(f"{where}.latencyMs: expected an integer")


def _check_feedback(row: dict[str, Any], i: int) -> None:
    where = f"feedback[{i}]"
    _require_str(row, "tickId", where)
    _require_str(row, "module", where)
    rating: Any = row.get("rating")
    if not _is_number(rating) or not 1 <= rating <= 5:
        raise _Invalid(f"{where}.rating: expected a number from 1 to 5")
    _require_str(row, "notes", where, optional=True)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
