"""mana-auth stand-in: password login with lockout, EdDSA JWTs, refresh, organization list (contract §3)."""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runner.sandbox.store import Clock, Faults, Store, error_response, persona_options

AUDIENCE = "mana"
MAX_FAILURES = 5
LOCK_SECONDS = 15 * 60
SESSION_SECONDS = 7 * 24 * 3600


@dataclass
class _Lockout:
    failures: int = 0
    locked_until: float = 0.0  # time.monotonic()


@dataclass
class AuthService:
    """Keys, sessions and lockouts: in memory, so a restarted sandbox forgets them like a new deploy."""

    store: Store
    clock: Clock
    faults: Faults
    seed_secret: str
    jwt_ttl_s: int
    _key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    _sessions: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (user id, expiry)
    _lockouts: dict[str, _Lockout] = field(default_factory=dict)

    def issue_jwt(self, user_id: str, email: str) -> str:
        # Real time, not the sandbox clock: PyJWT checks exp against the wall clock.
        now = int(time.time())
        claims = {"sub": user_id, "email": email, "aud": AUDIENCE, "iat": now, "exp": now + self.jwt_ttl_s}
        return jwt.encode(claims, self._key, algorithm="EdDSA")

    def verify_jwt(self, token: str) -> str | None:
        """The user id of a valid access token; None for anything else (session tokens included)."""
        try:
            claims = jwt.decode(token, self._key.public_key(), algorithms=["EdDSA"], audience=AUDIENCE)
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        return sub if isinstance(sub, str) and self.store.persona(sub) is not None else None

    def user_from_bearer(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return self.verify_jwt(token.strip()) if scheme.lower() == "bearer" and token else None

    def revoke_sessions(self) -> int:
        count = len(self._sessions)
        self._sessions.clear()
        return count

    # --- handlers --------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        now = self.clock.now()
        body = await _json_body(request)
        email = body.get("email") if isinstance(body, dict) else None
        if (fault := self.faults.take("login")) is not None:
            self.store.record_login(email if isinstance(email, str) else None, f"FAULT_{fault.status_code}", now)
            return fault
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
            self.store.record_login(email if isinstance(email, str) else None, "VALIDATION", now)
            return error_response(400, "VALIDATION", "email and password are required strings")

        lock = self._lockouts.setdefault(email, _Lockout())
        remaining = lock.locked_until - time.monotonic()
        if remaining > 0:
            self.store.record_login(email, "ACCOUNT_LOCKED", now)
            return error_response(429, "ACCOUNT_LOCKED", "Too many failed attempts", math.ceil(remaining))
        if lock.locked_until:  # the lock ran out: a fresh start
            self._lockouts[email] = lock = _Lockout()

        persona = self.store.persona_by_email(email)
        if persona is None or not self.store.password_ok(persona, password, self.seed_secret):
            lock.failures += 1
            if lock.failures >= MAX_FAILURES:
                lock.locked_until = time.monotonic() + LOCK_SECONDS
            self.store.record_login(email, "INVALID_CREDENTIALS", now)
            return error_response(401, "INVALID_CREDENTIALS", "Invalid email or password")

        self._lockouts.pop(email, None)
        session = secrets.token_urlsafe(32)
        self._sessions[session] = (persona["id"], time.monotonic() + SESSION_SECONDS)
        answer: dict[str, Any] = {
            "user": {"id": persona["id"], "email": persona["email"]},
            "token": session,
            "redirect": False,
        }
        if not persona_options(persona).get("noAccessToken"):
            answer["accessToken"] = self.issue_jwt(persona["id"], persona["email"])
        answer["refreshToken"] = session
        self.store.record_login(email, "OK", now)
        return JSONResponse(answer)

    async def refresh(self, request: Request) -> Response:
        if (fault := self.faults.take("refresh")) is not None:
            return fault
        body = await _json_body(request)
        token = body.get("refreshToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            return error_response(400, "VALIDATION", "refreshToken is required")
        user_id, expires = self._sessions.get(token, ("", 0.0))
        persona = self.store.persona(user_id) if user_id else None
        if persona is None or expires < time.monotonic():
            self._sessions.pop(token, None)
            return error_response(401, "TOKEN_EXPIRED", "Session expired or unknown")
        return JSONResponse({"accessToken": self.issue_jwt(persona["id"], persona["email"])})

    async def organizations(self, request: Request) -> Response:
        if (fault := self.faults.take("organizations")) is not None:
            return fault
        user_id = self.user_from_bearer(request)
        if user_id is None:
            return error_response(401, "UNAUTHORIZED", "A valid access token is required")
        persona = self.store.persona(user_id)
        as_string = bool(persona and persona_options(persona).get("metadataAsString"))
        spaces = []
        for space in self.store.spaces(user_id):
            metadata: Any = {"type": space["type"]}
            spaces.append(
                {
                    "id": space["id"],
                    "name": space["name"],
                    "slug": space["slug"],
                    # Some deployments serialise metadata twice; clients must accept both shapes.
                    "metadata": json.dumps(metadata) if as_string else metadata,
                }
            )
        return JSONResponse(spaces)

    def app(self, extra_routes: list[BaseRoute] | None = None) -> Starlette:
        routes: list[BaseRoute] = [
            Route("/api/v1/auth/login", self.login, methods=["POST"]),
            Route("/api/v1/auth/refresh", self.refresh, methods=["POST"]),
            Route("/api/auth/organization/list", self.organizations, methods=["GET"]),
            Route("/health", _health, methods=["GET"]),
        ]
        return Starlette(routes=routes + (extra_routes or []))

    def jwt_claims(self, token: str, *, verify_exp: bool = True) -> dict[str, Any] | None:
        """The claims of an access token signed here (expired ones too when verify_exp is False); None otherwise."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                options={"verify_exp": verify_exp},
            )
        except jwt.PyJWTError:
            return None
        return claims


async def _health(request: Request) -> Response:
    return JSONResponse({"ok": True, "at": datetime.now(UTC).isoformat()})


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return None
