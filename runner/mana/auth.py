"""mana-auth: sign-ins, the space list and the encryption vault, for any persona (contract §3, §9).

Facts of the real service that shape this module:
- Its space list (`GET /api/auth/organization/list`) refuses `Authorization: Bearer <JWT>` today;
  only Better Auth's signed session cookie, set by `POST /api/auth/sign-in/email`, opens it. The
  client tries Bearer once per process and, when refused, uses the cookie from then on.
- Sign-ins are rate-limited per client IP (3 per 10 s, both login endpoints counting, the 429
  without Retry-After). One `LoginLimiter` per process paces every sign-in of every tick.
- Better Auth refuses a non-GET request that carries a cookie without a trusted `Origin`
  (its origin check): a sign-in is sent no cookie, and a request with a persona's cookie
  carries that cookie alone and mana-auth's own origin (`MANA_AUTH_ORIGIN` overrides it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from runner.log import get_logger
from runner.mana.errors import (
    ApiError,
    ManaError,
    PermanentError,
    RetryPolicy,
    fetch,
    parse_json,
    request_json,
    status_only,
)

log = get_logger("runner.mana.auth")

# Mana's own envelope says INVALID_CREDENTIALS; Better Auth's own sign-in says INVALID_EMAIL_OR_PASSWORD.
WRONG_PASSWORD_CODES = frozenset({"INVALID_CREDENTIALS", "INVALID_EMAIL_OR_PASSWORD"})
SESSION_COOKIE_SUFFIX = "session_token"  # Better Auth names it `<prefix>.session_token` (Mana: mana.session_token)
VAULT_PATH = "/api/v1/me/encryption-vault"  # JWT-authenticated, per user (contract §9)
VAULT_MISSING = "VAULT_NOT_INITIALISED"

# Pauses the caller's own clock (the tick's timeout) while it waits for a login slot.
WaitHook = Callable[[], AbstractAsyncContextManager[None]]
SpaceVia = Literal["journal", "bearer", "cookie"]  # remembered, or looked up by which credential


def is_wrong_password(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status == 401 and exc.code in WRONG_PASSWORD_CODES


class LoginLimiter:
    """At most `max_logins` sign-ins per `window_s`, for the whole process.

    Better Auth's limiter (better-auth src/api/rate-limiter) keeps, per IP and path, a count and
    the time of the last served request; it refuses while `count >= max` and the last served
    request is less than a window ago, and starts a new count only after a full window of
    silence. That is stricter than "N in any window": sign-ins 4 s apart are refused at the 4th
    though no 10 s window holds four. So this limiter mirrors it: a chain of at most N sign-ins,
    and the next chain starts only a window (plus a margin) after the chain's last sign-in
    *answered* (the server stamps its time when it answers). Chains are a window apart, so no
    window of W seconds ever holds more than N sign-ins either. A hand-written limiter because
    the usual libraries (aiolimiter: a leaky bucket) can put N+1 sign-ins into one window.
    """

    def __init__(
        self,
        max_logins: int,
        window_s: float,
        *,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_logins < 1 or window_s <= 0:
            raise ValueError("a login rate needs at least 1 sign-in per positive window")
        self.max_logins = max_logins
        self.window_s = window_s
        # Timer and scheduling slack; 5 % of the window, so a scaled-down test window stays scaled.
        self.margin_s = window_s * 0.05 if margin_s is None else margin_s
        self._clock = clock
        self._count = 0  # sign-ins in the current chain, answered or not
        self._in_flight = 0
        self._last = float("-inf")  # when the chain's latest sign-in answered (or a 429 said "full")
        self._queue = asyncio.Lock()  # FIFO: waiters are served in the order they came
        self._freed = asyncio.Event()

    @asynccontextmanager
    async def slot(self, waiting: WaitHook | None = None) -> AsyncIterator[None]:
        """Hold one sign-in slot for the duration of one sign-in request."""
        await self._acquire(waiting)
        try:
            yield
        finally:
            self._in_flight -= 1
            self._last = max(self._last, self._clock())
            self._freed.set()

    def refused(self) -> None:
        """The server said 429 anyway (another client on our IP, another replica): wait a full window."""
        self._count = self.max_logins
        self._last = max(self._last, self._clock())

    async def _acquire(self, waiting: WaitHook | None) -> None:
        # No await between a check and its take: in one event loop that pair is atomic.
        if not self._queue.locked() and self._free_now():
            self._take()
            return
        async with waiting() if waiting is not None else nullcontext(), self._queue:
            while not self._free_now():
                await self._wait()
            self._take()

    def _take(self) -> None:
        self._count += 1
        self._in_flight += 1

    def _free_now(self) -> bool:
        if self._in_flight == 0 and self._clock() - self._last > self.window_s + self.margin_s:
            self._count = 0  # a full window of silence: Better Auth starts a new count
        return self._count < self.max_logins

    async def _wait(self) -> None:
        if self._in_flight:
            self._freed.clear()
            await self._freed.wait()  # an answer moves `_last`; only then is the wait known
        else:
            await asyncio.sleep(max(0.0, self._last + self.window_s + self.margin_s - self._clock()) + 0.001)


@dataclass(frozen=True, slots=True)
class Login:
    user_id: str
    access_token: str  # the EdDSA JWT mana-mcp accepts; never the session token

    def __repr__(self) -> str:
        return f"Login(user_id={self.user_id!r}, access_token=<redacted>)"

    @property
    def bearer(self) -> dict[str, str]:
        """The headers of a request made with this JWT (the cookie's twin is `AuthClient.with_cookie`)."""
        return {"Authorization": f"Bearer {self.access_token}"}


@dataclass(frozen=True, slots=True)
class Space:
    id: str
    via: SpaceVia


@dataclass(frozen=True, slots=True)
class SpaceInfo:
    """One entry of a persona's space list: Better Auth's organization with Mana's space type."""

    id: str
    name: str
    slug: str
    type: str | None  # None when its metadata names no type (older or foreign data)


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a space (`list-members`): who, and with which role (owner | admin | member)."""

    user_id: str
    email: str
    name: str
    role: str


class AuthClient:
    """mana-auth's routes, for any persona; it holds no credential of its own.

    Every credential comes in as an argument from the persona's own session and goes out on that
    one request (runner/session.py). The HTTP client is shared by every persona and keeps no
    cookies (runner/mana/http.py), so nothing one persona was given reaches another's request.
    What it does hold are facts about the server: whether the space list takes Bearer, and the
    sign-in pace that Mana counts per client IP.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        policy: RetryPolicy,
        limiter: LoginLimiter | None = None,
        origin: str | None = None,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        # Better Auth refuses a cookie-bearing request without a trusted Origin; its own base URL is trusted.
        url = httpx.URL(self._base)
        self._origin = origin or f"{url.scheme}://{url.netloc.decode('ascii')}"
        self._policy = policy
        self.limiter = limiter or LoginLimiter(3, 10.0)
        # Does the space list take Bearer? Unknown until asked once; the answer holds for the process.
        self.bearer_accepted: bool | None = None
        self._probe = asyncio.Lock()

    async def login(self, email: str, password: str, *, waiting: WaitHook | None = None) -> Login:
        """Mana's own login: the JWT. It sets no cookie and is sent none."""
        response, raw = await self._sign_in("/api/v1/auth/login", email, password, "login", waiting)
        body = parse_json(raw, response.status_code, "login")
        token = body.get("accessToken") if isinstance(body, dict) else None
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            # `token`/`refreshToken` are session tokens mana-mcp refuses; without the JWT this login is useless.
            raise PermanentError("login: answer carried no accessToken (JWT not minted)", stage="login")
        # Not registered for redaction: the log processor removes anything JWT-shaped, and the
        # session tokens are never handed to a logger. Registering one per login would grow forever.
        user_id = user.get("id") if isinstance(user, dict) else None
        return Login(user_id=str(user_id or ""), access_token=token)

    async def session_cookie(self, email: str, password: str, *, waiting: WaitHook | None = None) -> str:
        """`name=value` of Better Auth's signed session cookie, from its own sign-in (sent no cookie)."""
        response, _ = await self._sign_in("/api/auth/sign-in/email", email, password, "signin", waiting)
        for header in response.headers.get_list("set-cookie"):
            pair = header.split(";", 1)[0].strip()
            name, _, value = pair.partition("=")
            if name.endswith(SESSION_COOKIE_SUFFIX) and value:
                return pair  # sent back verbatim: the value is already URL-encoded as the server signed it
        raise PermanentError("signin: answer set no session cookie", stage="signin")

    def with_cookie(self, cookie: str) -> dict[str, str]:
        """The headers of a request that carries one persona's cookie: that cookie alone, and the trusted Origin."""
        return {"Cookie": cookie, "Origin": self._origin}

    async def spaces_by_bearer(self, login: Login) -> list[Any] | None:
        """The space list by Bearer; None when the route does not take Bearer (learnt once per process)."""
        if self.bearer_accepted is False:
            return None
        # Only the first ticks of a process queue here; after that the answer is known.
        async with self._probe if self.bearer_accepted is None else nullcontext():
            return await self._ask_by_bearer(login)

    async def _ask_by_bearer(self, login: Login) -> list[Any] | None:
        if self.bearer_accepted is False:  # learnt while this tick queued for the probe
            return None
        try:
            spaces = await self._spaces(login.bearer)
        except ApiError as exc:
            # A JWT minted a moment ago and refused: the route does not take Bearer at all.
            if exc.status != 401 or self.bearer_accepted:
                raise
            self.bearer_accepted = False
            log.warning(
                "mana-auth's space list refuses Bearer; using Better Auth's session cookie instead"
                " (one more sign-in when a persona's space is not yet known)",
                answer=str(exc),
            )
            return None
        self.bearer_accepted = True
        return spaces

    async def spaces_by_cookie(self, cookie: str) -> list[Any]:
        return await self._spaces(self.with_cookie(cookie))

    # --- Better Auth's organization routes (contract §8): cookie only, each with its persona's own cookie.
    # A POST here changes mana-auth, so it is sent once, never retried: a create or an accept whose
    # answer was lost would be refused on a second try, and re-running `spaces --apply` finds what happened.

    async def create_space(self, cookie: str, name: str, slug: str, space_type: str) -> SpaceInfo:
        body = {"name": name, "slug": slug, "metadata": {"type": space_type}}
        answer = await self._org_post(cookie, "create", body)
        space = spaces_of([answer])
        if not space:
            raise PermanentError("organization: create answered no space", stage="organization")
        return space[0]

    async def invite(self, cookie: str, space_id: str, email: str, role: str = "member") -> str:
        """The new invitation's id (the mail Mana sends goes to a persona's address, i.e. nowhere)."""
        answer = await self._org_post(
            cookie, "invite-member", {"email": email, "role": role, "organizationId": space_id}
        )
        return _string_field(answer, "id", "invite-member")

    async def invitations(self, cookie: str) -> list[tuple[str, str]]:
        """(invitation id, space id) of each pending invitation to the cookie's own persona."""
        answer = await self._org_get(cookie, "list-user-invitations", {})
        if not isinstance(answer, list):
            raise PermanentError("organization: list-user-invitations answered no list", stage="organization")
        return [
            (str(i["id"]), str(i["organizationId"]))
            for i in answer
            if isinstance(i, dict)
            and i.get("status", "pending") == "pending"
            and i.get("id")
            and i.get("organizationId")
        ]

    async def accept(self, cookie: str, invitation_id: str) -> None:
        await self._org_post(cookie, "accept-invitation", {"invitationId": invitation_id})

    async def members(self, cookie: str, space_id: str) -> list[Member]:
        answer = await self._org_get(cookie, "list-members", {"organizationId": space_id})
        rows = answer.get("members") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise PermanentError("organization: list-members answered no members", stage="organization")
        members = []
        for row in rows:
            user = row.get("user") if isinstance(row, dict) else None
            if isinstance(user, dict) and isinstance(user.get("email"), str):
                name = user.get("name")
                members.append(
                    Member(
                        str(row.get("userId", "")),
                        user["email"],
                        name if isinstance(name, str) else "",
                        str(row.get("role", "")),
                    )
                )
        return members

    async def _org_post(self, cookie: str, route: str, body: dict[str, Any]) -> Any:
        url = f"{self._base}/api/auth/organization/{route}"
        response, raw = await fetch(
            self._client, "POST", url, stage="organization", json=body, headers=self.with_cookie(cookie)
        )
        return parse_json(raw, response.status_code, "organization")

    async def _org_get(self, cookie: str, route: str, query: dict[str, str]) -> Any:
        url = f"{self._base}/api/auth/organization/{route}"
        return await request_json(
            self._client,
            "GET",
            url,
            stage="organization",
            policy=self._policy,
            params=query,
            headers=self.with_cookie(cookie),
        )

    async def vault_exists(self, login: Login) -> bool:
        """Whether the persona has an encryption vault (contract §9); its key's answer is never read."""
        url = f"{self._base}{VAULT_PATH}/key"

        async def attempt() -> bool:
            try:
                await status_only(self._client, "GET", url, stage="vault", headers=login.bearer)
            except ApiError as exc:
                if exc.status == 404 and exc.code == VAULT_MISSING:
                    return False
                raise
            return True

        return await self._policy.run(attempt)

    async def init_vault(self, login: Login) -> None:
        """Create the vault as Mana's web app does at a first login (idempotent on Mana's side)."""
        url = f"{self._base}{VAULT_PATH}/init"

        async def attempt() -> None:
            # Only the status: the answer is the master key, which the runner has no use for.
            await status_only(self._client, "POST", url, stage="vault", headers=login.bearer)

        await self._policy.run(attempt)

    async def _sign_in(
        self, path: str, email: str, password: str, stage: str, waiting: WaitHook | None
    ) -> tuple[httpx.Response, bytes]:
        """One sign-in, paced by the process-wide limiter; retried by the one retry rule. No cookie goes with it."""

        async def attempt() -> tuple[httpx.Response, bytes]:
            try:
                async with self.limiter.slot(waiting):
                    return await fetch(
                        self._client,
                        "POST",
                        f"{self._base}{path}",
                        stage=stage,
                        json={"email": email, "password": password},
                    )
            except ApiError as error:
                if error.status == 429 and error.code != "ACCOUNT_LOCKED":
                    # Mana's 429 names no wait: the limiter waits out its window before the next try,
                    # so the retry itself need not sleep (and never sooner than the server allows).
                    self.limiter.refused()
                    if error.retry_after is None:
                        raise ApiError(429, error.code, str(error), stage=stage, retry_after=0.0) from None
                raise

        return await self._policy.run(attempt)

    async def _spaces(self, headers: dict[str, str]) -> list[Any]:
        url = f"{self._base}/api/auth/organization/list"
        spaces = await request_json(self._client, "GET", url, stage="spaces", policy=self._policy, headers=headers)
        if not isinstance(spaces, list):
            raise PermanentError("spaces: answer is not a list", stage="spaces")
        return spaces


def spaces_of(listed: list[Any]) -> list[SpaceInfo]:
    """The entries of a space list that carry an id, with their type (metadata as object or JSON string)."""
    out = []
    for space in listed:
        if isinstance(space, dict) and isinstance(space.get("id"), str) and space["id"]:
            kind = _space_type(space.get("metadata"))
            name, slug = space.get("name"), space.get("slug")
            out.append(
                SpaceInfo(
                    space["id"],
                    name if isinstance(name, str) else "",
                    slug if isinstance(slug, str) else "",
                    kind if isinstance(kind, str) else None,
                )
            )
    return out


def _string_field(answer: Any, key: str, route: str) -> str:
    value = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(value, str) or not value:
        raise PermanentError(f"organization: {route} answered no {key}", stage="organization")
    return value


def personal_space_of(spaces: list[SpaceInfo]) -> str:
    for space in spaces:
        if space.type == "personal":
            return space.id  # opaque (Better Auth ids are not UUIDs): taken as it is
    # Writing into a team or family space would put persona noise in front of real people.
    raise PermanentError(f"spaces: no personal space among {len(spaces)}", stage="spaces")


def _space_type(metadata: Any) -> str | None:
    if isinstance(metadata, str):  # older rows hold the jsonb as a JSON string
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    return metadata.get("type") if isinstance(metadata, dict) else None


__all__ = [
    "AuthClient",
    "Login",
    "LoginLimiter",
    "ManaError",
    "Member",
    "Space",
    "SpaceInfo",
    "WaitHook",
    "is_wrong_password",
    "personal_space_of",
    "spaces_of",
]
