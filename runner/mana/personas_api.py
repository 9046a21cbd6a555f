"""apps/api personas internal API: who is due, and where the rows go (contract §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from runner.mana.errors import RetryPolicy, request_json
from runner.persona import DuePersona

BatchKind = Literal["actions", "feedback"]


@dataclass(frozen=True, slots=True)
class DueList:
    personas: list[DuePersona]
    server_time: datetime
    skipped: list[str] = field(default_factory=list)  # one reason per row we could not use


class PersonasApi:
    def __init__(
        self, client: httpx.AsyncClient, base_url: str, service_key: str, policy: RetryPolicy, path: str
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/") + "/" + path.strip("/")
        self._headers = {"X-Service-Key": service_key}
        self._policy = policy

    async def due(self) -> DueList:
        body = await request_json(
            self._client, "GET", f"{self._base}/due", headers=self._headers, stage="due", policy=self._policy
        )
        rows: Any = body.get("personas") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            rows = []
        personas: list[DuePersona] = []
        skipped: list[str] = []
        for index, row in enumerate(rows):
            try:
                personas.append(DuePersona.model_validate(row))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "row"
                skipped.append(f"row {index}: {where}: {first['msg']}")
        return DueList(personas=personas, server_time=_server_time(body), skipped=skipped)

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
        """Readiness: the API answers and takes our key."""
        await request_json(
            self._client, "GET", f"{self._base}/due", headers=self._headers, stage="ready", policy=RetryPolicy(1)
        )


def _server_time(body: Any) -> datetime:
    value = body.get("serverTime") if isinstance(body, dict) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)
