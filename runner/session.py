"""One persona's session: the only code that holds that persona's credentials.

A session lives for one tick (or one persona command) and owns everything that identifies the
persona to Mana: the password re-derived from the seed secret, the JWT, Better Auth's session
cookie when the space list needed one, the persona's spaces, and whether its encryption vault
exists. It asks the journal for what is remembered (a refused password, the personal space, a
known vault) and is the only caller of mana-auth for its persona. The shared HTTP clients hold
nothing of it (runner/mana/http.py), so two personas' sessions never meet in one request.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from runner.journal import Journal
from runner.log import get_logger, register_secret
from runner.mana.auth import (
    AuthClient,
    Login,
    Member,
    Space,
    SpaceInfo,
    WaitHook,
    is_wrong_password,
    personal_space_of,
    spaces_of,
)
from runner.mana.errors import ApiError, ManaError, PermanentError
from runner.persona import derive_password

log = get_logger("runner.session")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    seed_secret: str
    # A remembered personal space older than this is looked up again (MANA_SPACE_RECHECK_H).
    space_recheck_s: float = 7 * 86_400.0
    # Create a missing encryption vault at first contact (PERSONA_VAULT_INIT).
    vault_init: bool = True

    @property
    def secret_fingerprint(self) -> str:
        """Names the seed secret in the journal without storing it."""
        return hashlib.sha256(b"persona-runner/" + self.seed_secret.encode("utf-8")).hexdigest()[:16]


class LoginBlocked(PermanentError):
    """This persona's password was refused before with this seed secret: not tried again (lockout)."""


class PersonaSession:
    """A persona's JWT, cookie, space and vault for one tick; `open` signs in, `renew` mints a new JWT.

    `stage` is told which step is under way (login, spaces, vault), so a failure names it.
    `waiting` pauses the caller's clock while a sign-in queues for the process-wide pace.
    """

    def __init__(
        self,
        config: SessionConfig,
        auth: AuthClient,
        journal: Journal,
        email: str,
        user_id: str | None = None,
        *,
        waiting: WaitHook | None = None,
        stage: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._auth = auth
        self._journal = journal
        self.email = email
        self._user_id = user_id or None  # known from /due; the persona commands know only the email
        self._waiting = waiting
        self._stage = stage or (lambda _: None)
        self._password: str | None = None
        self._login: Login | None = None
        self._cookie: str | None = None  # Better Auth's signed session cookie, only if the space list needed it
        self._space: Space | None = None
        self._spaces: list[SpaceInfo] | None = None  # the space list, asked once per session

    def __repr__(self) -> str:
        return f"PersonaSession(email={self.email!r}, user_id={self.user_id!r}, credentials=<redacted>)"

    @property
    def user_id(self) -> str:
        return self._user_id or (self._login.user_id if self._login is not None else "")

    @property
    def jwt(self) -> str:
        assert self._login is not None, "open the session first"
        return self._login.access_token

    @property
    def space(self) -> Space:
        assert self._space is not None, "open the session first"
        return self._space

    async def open(self, *, vault: bool = False) -> None:
        """The JWT and the personal space (a remembered space costs no second sign-in); the vault if asked."""
        known = await self._journal.known_space(self._user_id, self._config.space_recheck_s) if self._user_id else None
        space = Space(known, "journal") if known is not None else None
        async with self._counting_refusals():
            if space is None and self._auth.bearer_accepted is False:
                # The cookie's sign-in first: the JWT minted after it is fresh when the MCP session opens.
                space = await self._space_by_cookie()
            self._stage("login")
            self._login = await self._auth.login(self.email, await self._secret(), waiting=self._waiting)
            if space is None:
                self._stage("spaces")
                listed = await self._auth.spaces_by_bearer(self._login)
                if listed is not None:
                    space = Space(personal_space_of(self._listed(listed)), "bearer")
            if space is None:
                space = await self._space_by_cookie()
        self._space = space
        if self.user_id and space.via != "journal":
            await self._journal.remember_space(self.user_id, space.id)
        if vault and self._config.vault_init:
            await self._ensure_vault()

    async def renew(self) -> str:
        """A fresh JWT for this persona (mana-mcp refused an expired one).

        A new sign-in rather than the refresh route: the derived password always works and needs
        no cookie; like every sign-in it never spends a lockout attempt twice.
        """
        async with self._counting_refusals():
            self._stage("login")
            self._login = await self._auth.login(self.email, await self._secret(), waiting=self._waiting)
        return self._login.access_token

    async def forget_space(self) -> None:
        """mana-mcp refused a fresh JWT in the remembered space: look the space up again next time."""
        if self.user_id:
            await self._journal.forget_space(self.user_id)

    async def _space_by_cookie(self) -> Space:
        """Better Auth's sign-in for this persona's own cookie, then the space list with it."""
        self._stage("spaces")
        listed = self._listed(await self._auth.spaces_by_cookie(await self._own_cookie()))
        return Space(personal_space_of(listed), "cookie")

    def _listed(self, answer: list[Any]) -> list[SpaceInfo]:
        """The space list as read, kept for the session: the shared-space draw and the probe need it too."""
        self._spaces = spaces_of(answer)
        return self._spaces

    async def _own_cookie(self) -> str:
        """This persona's Better Auth cookie, signed in for once per session."""
        if self._cookie is None:
            self._cookie = await self._auth.session_cookie(self.email, await self._secret(), waiting=self._waiting)
        return self._cookie

    async def _org_cookie(self) -> str:
        """The cookie for an organization call: a refused password here counts like any other (lockout)."""
        async with self._counting_refusals():
            return await self._own_cookie()

    # --- the persona's spaces and Better Auth's organization routes (contract §8), with its own cookie.

    async def spaces(self) -> list[SpaceInfo]:
        """Every space of the persona with its type: by Bearer where the list takes it, else by the cookie.

        Asked at most once per session, and not at all when opening it looked the list up: a tick's
        shared-space draw and its probe read the same list.
        """
        if self._spaces is None:
            self._stage("spaces")
            listed = (
                await self._auth.spaces_by_bearer(self._login) if self._login and self._auth.bearer_accepted else None
            )
            if listed is None:
                listed = await self._auth.spaces_by_cookie(await self._org_cookie())
            return self._listed(listed)
        return self._spaces

    async def members(self, space_id: str) -> list[Member]:
        return await self._auth.members(await self._org_cookie(), space_id)

    async def create_space(self, name: str, slug: str, space_type: str) -> SpaceInfo:
        """A new space with this persona as its owner (Better Auth makes the creator the owner)."""
        return await self._auth.create_space(await self._org_cookie(), name, slug, space_type)

    async def invite(self, space_id: str, email: str) -> str:
        return await self._auth.invite(await self._org_cookie(), space_id, email)

    async def invitations(self) -> list[tuple[str, str]]:
        """(invitation id, space id) of the invitations waiting for this persona."""
        return await self._auth.invitations(await self._org_cookie())

    async def accept(self, invitation_id: str) -> None:
        await self._auth.accept(await self._org_cookie(), invitation_id)

    async def _ensure_vault(self) -> None:
        """Create the vault once per persona, as Mana's web app does at a user's first login (contract §9).

        A passing failure (mana-auth down) fails the step so the tick is tried again; a refusal
        that will not pass is logged and the day goes on: its encrypting tools then fail with
        Mana's own "vault not initialised", which is what the rows should show.
        """
        assert self._login is not None
        if not self.user_id or await self._journal.vault_known(self.user_id):
            return
        self._stage("vault")
        try:
            if await self._auth.vault_exists(self._login):
                await self._journal.remember_vault(self.user_id, "found")
                return
            await self._auth.init_vault(self._login)
        except ManaError as exc:
            if exc.retryable:
                raise
            log.warning("encryption vault could not be checked or created; encrypting tools will fail", error=str(exc))
            return
        await self._journal.remember_vault(self.user_id, "created")
        log.info("encryption vault created at first contact", persona=self.email)

    async def _secret(self) -> str:
        """The derived password, unless it was refused before with this secret: never spend a lockout attempt twice.

        The persona commands know a persona by its email only (a refused login reveals no user
        id), so blocks are looked up by user id and by email alike.
        """
        if self._password is None:
            fingerprint = self._config.secret_fingerprint
            blocked = await self._journal.login_block(self._user_id, fingerprint, self.email)
            if blocked:
                raise LoginBlocked(
                    f"login: not attempted, refused before with this seed secret ({blocked})", stage="login"
                )
            self._password = derive_password(self._config.seed_secret, self.email)
            register_secret(self._password)
        return self._password

    @asynccontextmanager
    async def _counting_refusals(self) -> AsyncIterator[None]:
        """Every refused password counts toward Mana's lockout: never again with this secret, on either sign-in."""
        try:
            yield
        except ApiError as exc:
            if is_wrong_password(exc):
                await self._journal.block_login(
                    self._user_id or self.email, self._config.secret_fingerprint, str(exc), email=self.email
                )
                self._password = None
            raise
