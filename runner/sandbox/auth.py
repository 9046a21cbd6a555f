"""mana-auth stand-in (contract §3): Mana's own login, Better Auth's own sign-in, spaces, refresh.

Modelled on the real service (services/mana-auth on Better Auth, no bearer plugin):
- `POST /api/v1/auth/login` (Mana's wrapper, with its lockout and error envelope) answers the
  session token and an EdDSA JWT, and sets no cookie.
- `POST /api/auth/sign-in/email` (Better Auth's own) answers the session token and sets the signed
  session cookie `mana.session_token=<token>.<signature>`: better-call's signed cookie, i.e.
  URL-encoded `token + "." + base64(HMAC-SHA256(secret, token))`.
- `GET /api/auth/organization/list` takes only that cookie, unless `spaces_accept_bearer` models a
  future Mana with Bearer support; `POST /api/v1/auth/refresh` takes only that cookie.
- Both sign-in routes share Better Auth's per-IP limiter (3 per 10 s on /sign-in/*): the wrapper
  forwards X-Forwarded-For to the inner sign-in, so both count against one key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.sandbox.store import Clock, Faults, Store, error_response, new_opaque_id, persona_options

AUDIENCE = "mana"
MAX_FAILURES = 5
FAILURE_WINDOW_S = 15 * 60
LOCK_SECONDS = 30 * 60  # from the last failure
SESSION_SECONDS = 7 * 24 * 3600
COOKIE_NAME = "mana.session_token"  # Better Auth's `<cookiePrefix>.session_token`, Mana's prefix "mana"
RATE_LIMITED_MESSAGE = "Too many requests. Please try again later."
WRONG_PASSWORD_MESSAGE = "Invalid email or password"
PERSONA_TIER = "founder"  # scripts/personas seeds personas with access_tier 'founder'

# services/mana-auth/src/auth/sso-origins.ts; mana-auth's own base URL is trusted as well.
TRUSTED_ORIGINS = (
    "https://mana.how",
    "https://auth.mana.how",
    "https://whopxl.mana.how",
    "http://localhost:3001",
    "http://localhost:5173",
)
VAULT_PATH = "/api/v1/me/encryption-vault"
# services/mana-auth/src/routes/encryption-vault.ts, for a user without a vault row.
VAULT_MISSING_BODY = {"error": "vault not initialised", "code": "VAULT_NOT_INITIALISED"}
VAULT_MISSING_TEXT = json.dumps(VAULT_MISSING_BODY, separators=(",", ":"))  # as Hono's c.json writes it

RateLimitMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class SignInLimit:
    """Better Auth's sign-in limit. `auto`: only for requests with X-Forwarded-For, as in production
    behind a proxy (Better Auth finds no client IP otherwise and skips the limit); `on`: always,
    keyed by the peer address when the header is missing; `off`: never."""

    mode: RateLimitMode = "auto"
    max: int = 3
    window_s: float = 10.0


@dataclass
class _Session:
    id: str
    token: str
    user_id: str
    expires: float  # time.monotonic()


@dataclass
class _Bucket:
    """Better Auth's rate-limit record for one key: served requests counted, time of the last served."""

    count: int
    last: float


@dataclass
class AuthService:
    """Keys, sessions, lockouts and limits: in memory, so a restarted sandbox forgets them like a new deploy."""

    store: Store
    clock: Clock
    faults: Faults
    seed_secret: str
    jwt_ttl_s: int
    spaces_accept_bearer: bool = False
    signin_limit: SignInLimit = field(default_factory=SignInLimit)
    issuer: str = ""  # mana-auth's base URL; set once the server listens
    _key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    _kid: str = field(default_factory=new_opaque_id)
    _cookie_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # BETTER_AUTH_SECRET
    _sessions: dict[str, _Session] = field(default_factory=dict)  # by session token
    _failures: dict[str, list[float]] = field(default_factory=dict)  # email -> failure times (monotonic)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)  # client IP -> sign-in record

    # --- tokens ----------------------------------------------------------------------------

    def issue_jwt(self, user_id: str, email: str, *, session_id: str = "", tier: str = PERSONA_TIER) -> str:
        # Real time, not the sandbox clock: PyJWT checks exp against the wall clock.
        now = int(time.time())
        claims = {
            "iat": now,
            "sub": user_id,
            "email": email,
            "role": "user",
            "sid": session_id,
            "tier": tier,
            "exp": now + self.jwt_ttl_s,
            "iss": self.issuer,
            "aud": AUDIENCE,
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self._kid})

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

    def sign_cookie(self, token: str) -> str:
        """better-call's signed cookie value: URL-encoded `token.base64(HMAC-SHA256(secret, token))`."""
        digest = hmac.new(self._cookie_secret, token.encode("utf-8"), hashlib.sha256).digest()
        return quote(f"{token}.{base64.b64encode(digest).decode('ascii')}", safe="")

    def session_from_cookie(self, request: Request) -> _Session | None:
        raw = request.cookies.get(COOKIE_NAME)
        return self._session_of(raw) if raw else None

    def cookie_owner(self, raw: str) -> str | None:
        """The user a signed session cookie value belongs to (the witness names owners, never values)."""
        session = self._session_of(raw)
        return session.user_id if session is not None else None

    def _session_of(self, raw: str) -> _Session | None:
        token, dot, signature = unquote(raw).rpartition(".")
        # better-call accepts only a 44-character standard-base64 signature ending in '='.
        if not dot or len(signature) != 44 or not signature.endswith("="):
            return None
        if not hmac.compare_digest(self.sign_cookie(token), quote(f"{token}.{signature}", safe="")):
            return None
        session = self._sessions.get(token)
        if session is None or session.expires < time.monotonic() or self.store.persona(session.user_id) is None:
            return None
        return session

    def revoke_sessions(self) -> int:
        count = len(self._sessions)
        self._sessions.clear()
        return count

    # --- the sign-in limit and the lockout -----------------------------------------------------

    def _client_ip(self, request: Request) -> str | None:
        """The key Better Auth limits by, or None when the limit does not apply to this request."""
        forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
        mode = self.signin_limit.mode
        if mode == "off" or (mode == "auto" and not forwarded):
            return None
        return forwarded or (request.client.host if request.client else "unknown")

    def _limited(self, ip: str | None) -> float | None:
        """Seconds until the next sign-in from `ip` is served, when it is refused now.

        Better Auth (src/api/rate-limiter): refused while the count has reached max and the last
        *served* request is less than a window old; a refused request changes nothing.
        """
        bucket = self._buckets.get(ip) if ip is not None else None
        if bucket is None:
            return None
        since = time.monotonic() - bucket.last
        if bucket.count >= self.signin_limit.max and since < self.signin_limit.window_s:
            return self.signin_limit.window_s - since
        return None

    def _served(self, ip: str | None) -> None:
        """A sign-in was served (whatever its outcome): count it; a window of silence starts a new count."""
        if ip is None:
            return
        now = time.monotonic()
        bucket = self._buckets.get(ip)
        if bucket is None or now - bucket.last > self.signin_limit.window_s:
            self._buckets[ip] = _Bucket(1, now)
        else:
            bucket.count += 1
            bucket.last = now

    def _locked_for(self, email: str) -> int | None:
        """Mana's lockout: 5 failures within 15 minutes lock the account for 30 minutes from the last."""
        now = time.monotonic()
        recent = [t for t in self._failures.get(email, []) if now - t < FAILURE_WINDOW_S]
        if len(recent) < MAX_FAILURES:
            return None
        remaining = max(self._failures[email]) + LOCK_SECONDS - now
        return math.ceil(remaining) if remaining > 0 else None

    def _check_password(self, email: str, password: str) -> dict[str, Any] | None:
        persona = self.store.persona_by_email(email)
        if persona is None or not self.store.password_ok(persona, password, self.seed_secret):
            return None
        return persona

    def _new_session(self, persona: dict[str, Any]) -> _Session:
        session = _Session(new_opaque_id(), new_opaque_id(), persona["id"], time.monotonic() + SESSION_SECONDS)
        self._sessions[session.token] = session
        return session

    def _jwt_for(self, persona: dict[str, Any], session: _Session) -> str:
        return self.issue_jwt(persona["id"], persona["email"], session_id=session.id)

    # --- handlers --------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """Mana's `/api/v1/auth/login`: lockout, then Better Auth's sign-in, then a JWT; Mana's envelope."""
        now = self.clock.now()
        body = await _json_body(request)
        email = body.get("email") if isinstance(body, dict) else None
        if (fault := self.faults.take("login")) is not None:
            self.store.record_login(email if isinstance(email, str) else None, f"FAULT_{fault.status_code}", now)
            return fault
        if body is None:
            self.store.record_login(None, "VALIDATION", now)
            return error_response(400, "VALIDATION", "Invalid JSON body")
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
            self.store.record_login(email if isinstance(email, str) else None, "VALIDATION", now)
            return error_response(400, "VALIDATION", "email and password are required strings")

        if (remaining := self._locked_for(email)) is not None:
            self.store.record_login(email, "ACCOUNT_LOCKED", now)
            return error_response(429, "ACCOUNT_LOCKED", "Account temporarily locked", remaining)
        ip = self._client_ip(request)
        if self._limited(ip) is not None:
            # Mana maps Better Auth's 429 to its envelope and drops Better Auth's X-Retry-After.
            self.store.record_login(email, "RATE_LIMITED", now)
            return error_response(429, "RATE_LIMITED", RATE_LIMITED_MESSAGE)
        self._served(ip)
        persona = self._check_password(email, password)
        if persona is None:
            self._failures.setdefault(email, []).append(time.monotonic())
            self.store.record_login(email, "INVALID_CREDENTIALS", now)
            return error_response(401, "INVALID_CREDENTIALS", WRONG_PASSWORD_MESSAGE)

        self._failures.pop(email, None)  # a success clears the counter
        session = self._new_session(persona)
        answer: dict[str, Any] = {"redirect": False, "token": session.token, "user": _user(persona)}
        if not persona_options(persona).get("noAccessToken"):
            answer["accessToken"] = self._jwt_for(persona, session)
            answer["refreshToken"] = session.token
        self.store.record_login(email, "OK", now)
        return JSONResponse(answer)

    async def sign_in_email(self, request: Request) -> Response:
        """Better Auth's own `/api/auth/sign-in/email`: no lockout, Better Auth's shapes, the signed cookie."""
        now = self.clock.now()
        body = await _json_body(request)
        email = body.get("email") if isinstance(body, dict) else None
        shown = email if isinstance(email, str) else None
        if (fault := self.faults.take("signin")) is not None:
            self.store.record_login(shown, f"FAULT_{fault.status_code}", now, route="signin")
            return fault
        ip = self._client_ip(request)
        if (wait := self._limited(ip)) is not None:
            self.store.record_login(shown, "RATE_LIMITED", now, route="signin")
            return JSONResponse(
                {"message": RATE_LIMITED_MESSAGE}, status_code=429, headers={"X-Retry-After": str(math.ceil(wait))}
            )
        self._served(ip)
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(email, str) or not isinstance(password, str) or not email or not password:
            self.store.record_login(shown, "VALIDATION", now, route="signin")
            return _better_auth_error(400, "VALIDATION_ERROR", "email and password are required strings")
        persona = self._check_password(email, password)
        if persona is None:
            self.store.record_login(email, "INVALID_CREDENTIALS", now, route="signin")
            return _better_auth_error(401, "INVALID_EMAIL_OR_PASSWORD", WRONG_PASSWORD_MESSAGE)
        session = self._new_session(persona)
        self.store.record_login(email, "OK", now, route="signin")
        response = JSONResponse({"redirect": False, "token": session.token, "user": _user(persona)})
        cookie = f"{COOKIE_NAME}={self.sign_cookie(session.token)}; Max-Age={SESSION_SECONDS}"
        response.headers.append("set-cookie", f"{cookie}; Path=/; HttpOnly; SameSite=Lax")
        return response

    async def refresh(self, request: Request) -> Response:
        """A fresh JWT only for Better Auth's signed session cookie; anything else is 'Session expired'."""
        if (fault := self.faults.take("refresh")) is not None:
            return fault
        session = self.session_from_cookie(request)
        persona = self.store.persona(session.user_id) if session is not None else None
        if session is None or persona is None:
            return error_response(401, "TOKEN_EXPIRED", "Session expired")
        return JSONResponse({"accessToken": self._jwt_for(persona, session), "refreshToken": session.token})

    async def organizations(self, request: Request) -> Response:
        if (fault := self.faults.take("organizations")) is not None:
            return fault
        session = self.session_from_cookie(request)
        user_id = session.user_id if session is not None else None
        if user_id is None and self.spaces_accept_bearer:
            user_id = self.user_from_bearer(request)
        if user_id is None:
            return _better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        persona = self.store.persona(user_id)
        as_string = bool(persona and persona_options(persona).get("metadataAsString"))
        created = persona["created_at"] if persona else None
        spaces = []
        for space in self.store.spaces(user_id):
            metadata: dict[str, str] = (
                {"tier": "public", "type": "personal"} if space["type"] == "personal" else {"type": space["type"]}
            )
            spaces.append(
                {
                    "id": space["id"],
                    "name": space["name"],
                    "slug": space["slug"],
                    "logo": None,
                    "createdAt": created,
                    # Older rows hold the jsonb as a JSON string; clients must accept both shapes.
                    "metadata": json.dumps(metadata) if as_string else metadata,
                }
            )
        return JSONResponse(spaces)

    def origin_refusal(self, request: Request) -> Response | None:
        """Better Auth 1.6.0's origin check (api/middlewares/origin-check).

        A request other than GET, HEAD or OPTIONS that carries a Cookie header must name a trusted
        Origin (or Referer); without a cookie none is checked.
        """
        if request.method in ("GET", "HEAD", "OPTIONS") or "cookie" not in request.headers:
            return None
        origin = request.headers.get("origin") or request.headers.get("referer") or ""
        if not origin or origin == "null":
            return _better_auth_error(403, "MISSING_OR_NULL_ORIGIN", "Missing or null Origin")
        if _origin_of(origin) not in (self.issuer, *TRUSTED_ORIGINS):
            return _better_auth_error(403, "INVALID_ORIGIN", "Invalid origin")
        return None

    async def vault_key(self, request: Request) -> Response:
        """`GET /api/v1/me/encryption-vault/key` (JWT): the master key, or 404 for a user without a vault."""
        user_id = self.user_from_bearer(request)
        if user_id is None:
            return error_response(401, "UNAUTHORIZED", "Invalid or expired token")
        key = self.store.vault_key(user_id)
        if key is None:
            return JSONResponse(VAULT_MISSING_BODY, status_code=404)
        return JSONResponse({"masterKey": key, "formatVersion": 1, "kekId": "sandbox-kek"})

    async def vault_init(self, request: Request) -> Response:
        """`POST /api/v1/me/encryption-vault/init` (JWT): idempotent, answers the (new or existing) key."""
        user_id = self.user_from_bearer(request)
        if user_id is None:
            return error_response(401, "UNAUTHORIZED", "Invalid or expired token")
        key = self.store.create_vault(user_id, self.clock.now())
        return JSONResponse({"masterKey": key, "formatVersion": 1, "kekId": "sandbox-kek"})

    async def jwks(self, request: Request) -> Response:
        key = json.loads(OKPAlgorithm.to_jwk(self._key.public_key()))
        return JSONResponse({"keys": [{**key, "kid": self._kid, "alg": "EdDSA"}]})

    def app(self, extra_routes: list[BaseRoute] | None = None) -> ASGIApp:
        routes: list[BaseRoute] = [
            Route("/api/v1/auth/login", self.login, methods=["POST"]),
            Route("/api/v1/auth/refresh", self.refresh, methods=["POST"]),
            Route("/api/auth/sign-in/email", self.sign_in_email, methods=["POST"]),
            Route("/api/auth/organization/list", self.organizations, methods=["GET"]),
            Route("/api/auth/jwks", self.jwks, methods=["GET"]),
            Route(f"{VAULT_PATH}/key", self.vault_key, methods=["GET"]),
            Route(f"{VAULT_PATH}/init", self.vault_init, methods=["POST"]),
            Route("/health", _health, methods=["GET"]),
        ]
        return _OriginCheck(Starlette(routes=routes + (extra_routes or [])), self)

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


class _OriginCheck:
    """Better Auth's middleware runs before every one of its endpoints (`/api/auth/*`), not Mana's own routes."""

    def __init__(self, app: ASGIApp, auth: AuthService) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/auth/"):
            refusal = self.auth.origin_refusal(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _origin_of(value: str) -> str:
    """scheme://host[:port] of an Origin or a Referer (a Referer carries a path)."""
    parts = urlsplit(value)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else value


def _user(persona: dict[str, Any]) -> dict[str, Any]:
    """The user object both sign-ins answer (contract §3), for a seeded persona."""
    return {
        "id": persona["id"],
        "email": persona["email"],
        "name": persona["name"],
        "emailVerified": True,
        "image": None,
        "createdAt": persona["created_at"],
        "updatedAt": persona["created_at"],
        "twoFactorEnabled": False,
        "accessTier": PERSONA_TIER,
        "kind": "persona",
    }


def _better_auth_error(status: int, code: str, message: str) -> JSONResponse:
    """Better Auth's own error shape on /api/auth/*: not Mana's envelope."""
    return JSONResponse({"message": message, "code": code}, status_code=status)


async def _health(request: Request) -> Response:
    return JSONResponse({"ok": True, "at": datetime.now(UTC).isoformat()})


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return None
