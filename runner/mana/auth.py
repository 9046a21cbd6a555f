"""mana-auth: log a persona in and find its personal space (contract §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from runner.mana.errors import PermanentError, RetryPolicy, request_json


@dataclass(frozen=True, slots=True)
class Login:
    user_id: str
    access_token: str  # the EdDSA JWT mana-mcp accepts; never the session token

    def __repr__(self) -> str:
        return f"Login(user_id={self.user_id!r}, access_token=<redacted>)"


class AuthClient:
    def __init__(self, client: httpx.AsyncClient, base_url: str, policy: RetryPolicy) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._policy = policy

    async def login(self, email: str, password: str) -> Login:
        body = await request_json(
            self._client,
            "POST",
            f"{self._base}/api/v1/auth/login",
            json={"email": email, "password": password},
            stage="login",
            policy=self._policy,
        )
        token = body.get("accessToken") if isinstance(body, dict) else None
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            # `token`/`refreshToken` are session tokens mana-mcp refuses; without the JWT this login is useless.
            raise PermanentError("login: answer carried no accessToken (JWT not minted)", stage="login")
        # Not registered for redaction: the log processor removes anything JWT-shaped, and the
        # session tokens are never handed to a logger. Registering one per login would grow forever.
        user_id = user.get("id") if isinstance(user, dict) else None
        return Login(user_id=str(user_id or ""), access_token=token)

    async def personal_space(self, access_token: str) -> str:
        spaces = await request_json(
            self._client,
            "GET",
            f"{self._base}/api/auth/organization/list",
            headers={"Authorization": f"Bearer {access_token}"},
            stage="spaces",
            policy=self._policy,
        )
        if not isinstance(spaces, list):
            raise PermanentError("spaces: answer is not a list", stage="spaces")
        for space in spaces:
            if isinstance(space, dict) and _space_type(space.get("metadata")) == "personal" and space.get("id"):
                return str(space["id"])
        # Writing into a team or family space would put persona noise in front of real people.
        raise PermanentError(f"spaces: no personal space among {len(spaces)}", stage="spaces")


def _space_type(metadata: Any) -> str | None:
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    return metadata.get("type") if isinstance(metadata, dict) else None
