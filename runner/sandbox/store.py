"""State shared by the three sandbox apps: the SQLite store, the settable clock, injected faults.

One SQLite connection guarded by a lock: every statement is short, all three apps live in one
event loop, and a single writer is the simplest way to be correct under concurrent requests.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import string
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.responses import JSONResponse

from runner.persona import derive_password

_SCHEMA = """
CREATE TABLE IF NOT EXISTS personas (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL, email TEXT NOT NULL UNIQUE,
    archetype TEXT NOT NULL, system_prompt TEXT NOT NULL, module_mix TEXT NOT NULL,
    tick_cadence TEXT NOT NULL, last_active_at TEXT, options TEXT NOT NULL DEFAULT '{}',
    password_secret TEXT, deleted INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spaces (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, position INTEGER NOT NULL,
    name TEXT NOT NULL, slug TEXT NOT NULL, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS actions (
    id TEXT PRIMARY KEY, persona_id TEXT NOT NULL, tick_id TEXT NOT NULL, tool_name TEXT NOT NULL,
    result TEXT NOT NULL, input_hash TEXT, error_message TEXT, latency_ms INTEGER, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY, persona_id TEXT NOT NULL, tick_id TEXT NOT NULL, module TEXT NOT NULL,
    rating REAL NOT NULL, notes TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mcp_calls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, space_id TEXT NOT NULL,
    tool TEXT NOT NULL, arguments TEXT NOT NULL, is_error INTEGER NOT NULL, error_text TEXT, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS logins (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT, outcome TEXT NOT NULL, at TEXT NOT NULL,
    route TEXT NOT NULL DEFAULT 'login', real_at REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vaults (user_id TEXT PRIMARY KEY, master_key TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
    origin TEXT, session_cookies INTEGER NOT NULL, owners TEXT NOT NULL, status INTEGER NOT NULL, traceparent TEXT,
    at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tool_records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, id TEXT NOT NULL,
    user_id TEXT NOT NULL, space_id TEXT NOT NULL, data TEXT NOT NULL, UNIQUE (collection, id));
"""

# The secret a `wrongSeed` persona's password is derived from: anything but the configured one.
WRONG_SEED_SECRET = "sandbox-wrong-seed-secret"

PERSONA_OPTIONS = ("wrongSeed", "noAccessToken", "metadataAsString", "noPersonalSpace", "alwaysDue")
EXTRA_SPACES = ("team", "family", "none")


def iso(moment: datetime) -> str:
    """JavaScript's Date.toISOString(): UTC, milliseconds, 'Z' (sorts lexicographically = in time)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    """Always UTC out: weekday and day boundaries are the server's UTC ones (contract §4)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def new_id(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}" if prefix else str(uuid.uuid4())


_ID_ALPHABET = string.ascii_letters + string.digits


def new_opaque_id() -> str:
    """An id as Better Auth makes them for users, spaces and sessions: 32 letters and digits, not a UUID."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(32))


class Clock:
    """Wall clock unless a test froze it (POST /__sandbox/clock)."""

    def __init__(self) -> None:
        self.fixed: datetime | None = None

    def now(self) -> datetime:
        return self.fixed if self.fixed is not None else datetime.now(UTC)


@dataclass
class Fault:
    status: int
    count: int
    retry_after: int | None = None
    code: str | None = None


FAULT_ROUTES = ("due", "actions", "feedback", "login", "signin", "refresh", "organizations", "mcp")

_CODES = {
    400: "VALIDATION",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    429: "RATE_LIMITED",
    500: "INTERNAL",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}


def error_response(status: int, code: str, message: str, retry_after: int | None = None) -> JSONResponse:
    """The contract's error envelope, with Retry-After when a wait is known."""
    body: dict[str, Any] = {"error": code, "message": message, "status": status}
    headers: dict[str, str] = {}
    if retry_after is not None:
        body["retryAfterSec"] = retry_after
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(body, status_code=status, headers=headers)


class Faults:
    """Scripted failures: the next `count` requests to a route answer `status` and do nothing else."""

    def __init__(self) -> None:
        self._pending: dict[str, Fault] = {}

    def arm(self, route: str, fault: Fault) -> None:
        self._pending[route] = fault

    def take(self, route: str) -> JSONResponse | None:
        fault = self._pending.get(route)
        if fault is None or fault.count <= 0:
            return None
        fault.count -= 1
        code = fault.code or _CODES.get(fault.status, "INTERNAL")
        return error_response(fault.status, code, f"sandbox fault injected on {route}", fault.retry_after)


class Store:
    def __init__(self, path: str) -> None:
        self._lock = threading.RLock()
        # isolation_level=None: autocommit, with explicit BEGIN where a batch must be atomic.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        # A sandbox file from before logins said which route and when (real time): add the columns.
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(logins)")}
        if "route" not in columns:
            self._db.execute("ALTER TABLE logins ADD COLUMN route TEXT NOT NULL DEFAULT 'login'")
        if "real_at" not in columns:
            self._db.execute("ALTER TABLE logins ADD COLUMN real_at REAL NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- encryption vaults (mana-auth, contract §9) ------------------------------------------

    def vault_key(self, user_id: str) -> str | None:
        row = self.one("SELECT master_key FROM vaults WHERE user_id = ?", (user_id,))
        return str(row["master_key"]) if row else None

    def create_vault(self, user_id: str, now: datetime) -> str:
        """Mint the user's master key unless one exists (Mana's `init` is idempotent); the key either way."""
        key = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        self.execute(
            "INSERT OR IGNORE INTO vaults (user_id, master_key, created_at) VALUES (?,?,?)", (user_id, key, iso(now))
        )
        return self.vault_key(user_id) or key

    # --- personas -------------------------------------------------------------------------

    def persona_count(self) -> int:
        row = self.one("SELECT COUNT(*) AS n FROM personas")
        return int(row["n"]) if row else 0

    def create_persona(self, spec: dict[str, Any], extra_space: str, now: datetime) -> dict[str, str]:
        """A user of kind persona, its descriptor and its spaces, as the seed script would make them."""
        name = str(spec["name"])
        email = f"persona.{name}@mana.test"
        options = {k: bool(v) for k, v in (spec.get("options") or {}).items() if k in PERSONA_OPTIONS}
        user_id = new_opaque_id()
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM personas").fetchone()[0]
            db.execute(
                "INSERT INTO personas (id, seq, name, email, archetype, system_prompt, module_mix, tick_cadence,"
                " options, password_secret, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    user_id,
                    seq,
                    name,
                    email,
                    spec["archetype"],
                    spec["systemPrompt"],
                    json.dumps(spec["moduleMix"]),
                    spec["tickCadence"],
                    json.dumps(options),
                    WRONG_SEED_SECRET if options.get("wrongSeed") else None,
                    iso(now),
                ),
            )
            spaces: list[tuple[str, str, str]] = []  # (type, name, slug), listed in this order
            if options.get("noPersonalSpace"):
                spaces.append(("team", f"Team {name}", f"team-{name}"))
            else:
                # A shared space listed before the personal one catches clients that take the first.
                if extra_space == "team":
                    spaces.append(("team", f"Team {name}", f"team-{name}"))
                elif extra_space == "family":
                    spaces.append(("family", f"Familie {name}", f"familie-{name}"))
                spaces.append(("personal", f"{name} (privat)", f"personal-{name}"))
            for position, (kind, space_name, slug) in enumerate(spaces):
                db.execute(
                    "INSERT INTO spaces (id, user_id, position, name, slug, type) VALUES (?,?,?,?,?,?)",
                    (new_opaque_id(), user_id, position, space_name, slug, kind),
                )
        return {"userId": user_id, "email": email}

    def persona_by_email(self, email: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM personas WHERE email = ? AND deleted = 0", (email,))

    def persona(self, user_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM personas WHERE id = ? AND deleted = 0", (user_id,))

    def spaces(self, user_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM spaces WHERE user_id = ? ORDER BY position", (user_id,))

    def password_ok(self, persona: dict[str, Any], password: str, seed_secret: str) -> bool:
        secret = persona["password_secret"] or seed_secret
        return derive_password(secret, persona["email"]) == password

    def record_login(self, email: str | None, outcome: str, now: datetime, route: str = "login") -> None:
        """Every sign-in attempt, on either route; `real_at` is wall time (the clock may be frozen)."""
        self.execute(
            "INSERT INTO logins (email, outcome, at, route, real_at) VALUES (?,?,?,?,?)",
            (email, outcome, iso(now), route, time.time()),
        )

    # --- what the MCP tools stored (mana-sync's rows, as the registry's handlers see them) --------

    def put_record(self, collection: str, user_id: str, space_id: str, data: dict[str, Any]) -> None:
        self.execute(
            "INSERT INTO tool_records (collection, id, user_id, space_id, data) VALUES (?,?,?,?,?)",
            (collection, data["id"], user_id, space_id, json.dumps(data, ensure_ascii=False)),
        )

    def patch_record(self, collection: str, user_id: str, record_id: str, fields: dict[str, Any]) -> bool:
        """A field-level update, like mana-sync's; False when the user has no such record."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT data FROM tool_records WHERE collection = ? AND id = ? AND user_id = ?",
                (collection, record_id, user_id),
            ).fetchone()
            if row is None:
                return False
            data = {**json.loads(row[0]), **fields}
            db.execute(
                "UPDATE tool_records SET data = ? WHERE collection = ? AND id = ?",
                (json.dumps(data, ensure_ascii=False), collection, record_id),
            )
        return True

    def records(self, collection: str, user_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(space id, row) of every record of the user in a collection, oldest first (a mana-sync pull)."""
        rows = self.query(
            "SELECT space_id, data FROM tool_records WHERE collection = ? AND user_id = ? ORDER BY seq",
            (collection, user_id),
        )
        return [(str(r["space_id"]), dict(json.loads(r["data"]))) for r in rows]


def persona_options(row: dict[str, Any]) -> dict[str, bool]:
    return dict(json.loads(row["options"] or "{}"))
