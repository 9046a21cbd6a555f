"""apps/api personas internal API: who is due, and where the rows go (contract §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from runner.mana.errors import RetryPolicy, request_json, status_only
from runner.persona import DuePersona

BatchKind = Literal["actions", "feedback"]


@dataclass(frozen=True, slots=True)
class DueList:
    personas: list[DuePersona]
    server_time: datetime
    skipped: list[str] = field(default_factory=list)  # one reason per row we could not use
    # Whole-answer problems: no `personas` envelope, rows beyond the bound, prompts cut.
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DueLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_rows: int = 5000
    prompt_max_chars: int = 20_000


def parse_due(body: Any, limits: DueLimits) -> DueList:
    """A decoded /due answer into what can be played; never raises for any JSON value.

    The answer is ordered oldest-active first, so rows past `max_rows` are the ones that can
    wait best; they come back at the next poll.
    """
    warnings: list[str] = []
    rows: Any = body.get("personas") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        shape = type(body).__name__ if not isinstance(body, dict) else "an object without a personas list"
        warnings.append(f"answer is not the contract's envelope ({shape}); nothing is due")
        rows = []
    if len(rows) > limits.max_rows:
        warnings.append(f"{len(rows)} rows, only the first {limits.max_rows} are used this poll (DUE_MAX_ROWS)")
        rows = rows[: limits.max_rows]
    personas: list[DuePersona] = []
    skipped: list[str] = []
    cut = 0
    for index, row in enumerate(rows):
        try:
            persona = DuePersona.model_validate(row)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])[:80] or "row"
            skipped.append(f"row {index}: {where}: {first['msg']}"[:200])
            continue
        if len(persona.system_prompt) > limits.prompt_max_chars:
            cut += 1
            persona = persona.model_copy(update={"system_prompt": persona.system_prompt[: limits.prompt_max_chars]})
        personas.append(persona)
    if cut:
        warnings.append(f"{cut} systemPrompts cut to {limits.prompt_max_chars} characters (PERSONA_PROMPT_MAX_CHARS)")
    return DueList(personas=personas, server_time=_server_time(body), skipped=skipped, warnings=warnings)


class PersonasApi:
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        service_key: str,
        policy: RetryPolicy,
        path: str,
        limits: DueLimits | None = None,
    ) -> None:
        self._client = client
        self._limits = limits or DueLimits()
        self._base = base_url.rstrip("/") + "/" + path.strip("/")
        self._headers = {"X-Service-Key": service_key}
        self._policy = policy

    async def due(self) -> DueList:
        body = await request_json(
            self._client,
            "GET",
            f"{self._base}/due",
            headers=self._headers,
            stage="due",
            policy=self._policy,
            max_bytes=self._limits.max_bytes,
        )
        return parse_due(body, self._limits)

    async def post_batch(self, persona_id: str, kind: BatchKind, body: bytes) -> None:
        """Send a batch exactly as the journal froze it, so every retry is byte-identical."""
        await request_json(
            self._client,
            "POST",
            f"{self._base}/{quote(persona_id, safe='')}/{kind}",
            content=body,
            headers={**self._headers, "Content-Type": "application/json"},
            stage=kind,
            policy=self._policy,
        )

    async def ping(self) -> None:
        """Readiness: the API answers and takes our key.

        The contract has no cheap probe endpoint, so this is GET /due, but only its status is
        looked at: the body is never read (the connection is closed instead), so a probe costs
        the server one query and the runner no transfer.
        """
        await status_only(self._client, "GET", f"{self._base}/due", headers=self._headers, stage="ready")


def _server_time(body: Any) -> datetime:
    value = body.get("serverTime") if isinstance(body, dict) else None
    if isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
            parsed.astimezone(UTC)  # a year-1 time with a positive offset cannot be expressed in UTC
            return parsed
        except (ValueError, OverflowError):
            pass
    return datetime.now(UTC)
