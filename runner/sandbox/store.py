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
CREATE TABLE IF NOT EXISTS members (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, space_id TEXT NOT NULL, user_id TEXT NOT NULL,
    role TEXT NOT NULL, created_at TEXT NOT NULL, UNIQUE (space_id, user_id));
CREATE TABLE IF NOT EXISTS invitations (
    id TEXT PRIMARY KEY, space_id TEXT NOT NULL, email TEXT NOT NULL, role TEXT NOT NULL, inviter_id TEXT NOT NULL,
    status TEXT NOT NULL, expires_at TEXT NOT NULL, created_at TEXT NOT NULL);
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
        # Spaces made through Better Auth's create route keep their metadata as the JSON string it stored.
        if "metadata" not in {row["name"] for row in self._db.execute("PRAGMA table_info(spaces)")}:
            self._db.execute("ALTER TABLE spaces ADD COLUMN metadata TEXT")
        # A sandbox file from before memberships: each seeded space's creator is its owner.
        self._db.execute(
            "INSERT OR IGNORE INTO members (id, space_id, user_id, role, created_at)"
            " SELECT lower(hex(randomblob(16))), id, user_id, 'owner', '' FROM spaces ORDER BY user_id, position"
        )

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
                space_id = new_opaque_id()
                db.execute(
                    "INSERT INTO spaces (id, user_id, position, name, slug, type) VALUES (?,?,?,?,?,?)",
                    (space_id, user_id, position, space_name, slug, kind),
                )
                _add_member(db, space_id, user_id, "owner", iso(now))
        return {"userId": user_id, "email": email}

    def persona_by_email(self, email: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM personas WHERE email = ? AND deleted = 0", (email,))

    def persona(self, user_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM personas WHERE id = ? AND deleted = 0", (user_id,))

    def spaces(self, user_id: str) -> list[dict[str, Any]]:
        """The spaces the user is a member of, in the order they joined (Better Auth's organization list)."""
        return self.query(
            "SELECT s.*, m.role FROM spaces s JOIN members m ON m.space_id = s.id WHERE m.user_id = ? ORDER BY m.seq",
            (user_id,),
        )

    # --- organizations (Better Auth's organization plugin, contract §8) -----------------------

    def space_by_slug(self, slug: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM spaces WHERE slug = ?", (slug,))

    def space_by_id(self, space_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM spaces WHERE id = ?", (space_id,))

    def create_space(
        self, owner_id: str, name: str, slug: str, kind: str, metadata: str, now: datetime
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A new organization and its creator's owner membership; (space row, member row)."""
        space_id = new_opaque_id()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO spaces (id, user_id, position, name, slug, type, metadata) VALUES (?,?,?,?,?,?,?)",
                (space_id, owner_id, 0, name, slug, kind, metadata),
            )
            _add_member(db, space_id, owner_id, "owner", iso(now))
        space, member = self.space_by_id(space_id), self.member(space_id, owner_id)
        assert space is not None and member is not None
        return space, member

    def member(self, space_id: str, user_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM members WHERE space_id = ? AND user_id = ?", (space_id, user_id))

    def members(self, space_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT m.*, p.name, p.email FROM members m JOIN personas p ON p.id = m.user_id"
            " WHERE m.space_id = ? ORDER BY m.seq",
            (space_id,),
        )

    def add_member(self, space_id: str, user_id: str, role: str, now: datetime) -> dict[str, Any]:
        with self.transaction() as db:
            _add_member(db, space_id, user_id, role, iso(now))
        member = self.member(space_id, user_id)
        assert member is not None
        return member

    def remove_member(self, space_id: str, user_id: str) -> bool:
        return self.execute("DELETE FROM members WHERE space_id = ? AND user_id = ?", (space_id, user_id)) > 0

    def invitation(self, invitation_id: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM invitations WHERE id = ?", (invitation_id,))

    def pending_invitations(self, email: str, space_id: str | None = None) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT i.*, s.name AS organization_name FROM invitations i JOIN spaces s ON s.id = i.space_id"
            " WHERE lower(i.email) = lower(?) AND i.status = 'pending' ORDER BY i.created_at",
            (email,),
        )
        return [r for r in rows if space_id is None or r["space_id"] == space_id]

    def create_invitation(
        self, space_id: str, email: str, role: str, inviter_id: str, now: datetime, expires: datetime
    ) -> dict[str, Any]:
        invitation_id = new_opaque_id()
        self.execute(
            "INSERT INTO invitations (id, space_id, email, role, inviter_id, status, expires_at, created_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (invitation_id, space_id, email, role, inviter_id, "pending", iso(expires), iso(now)),
        )
        invitation = self.invitation(invitation_id)
        assert invitation is not None
        return invitation

    def set_invitation_status(self, invitation_id: str, status: str) -> None:
        self.execute("UPDATE invitations SET status = ? WHERE id = ?", (status, invitation_id))

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

    def records(self, collection: str, user_id: str) -> list[Record]:
        """A mana-sync pull, oldest first: the user's own rows in every space, plus co-members' rows in
        the spaces the user belongs to (`WHERE user_id = $me OR space_id = ANY($my_spaces)`, contract §8)."""
        rows = self.query(
            "SELECT space_id, user_id, data FROM tool_records WHERE collection = ?"
            " AND (user_id = ? OR space_id IN (SELECT space_id FROM members WHERE user_id = ?)) ORDER BY seq",
            (collection, user_id, user_id),
        )
        return [Record(str(r["space_id"]), str(r["user_id"]), dict(json.loads(r["data"]))) for r in rows]


@dataclass(frozen=True, slots=True)
class Record:
    """One pulled row: the space it was pushed into, who pushed it, and its data."""

    space_id: str
    user_id: str
    data: dict[str, Any]


def _add_member(db: sqlite3.Connection, space_id: str, user_id: str, role: str, at: str) -> None:
    db.execute(
        "INSERT INTO members (id, space_id, user_id, role, created_at) VALUES (?,?,?,?,?)",
        (new_opaque_id(), space_id, user_id, role, at),
    )


def persona_options(row: dict[str, Any]) -> dict[str, bool]:
    return dict(json.loads(row["options"] or "{}"))
