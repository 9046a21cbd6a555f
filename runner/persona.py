"""What a persona is, and the pure rules that must match the Mana side bit for bit.

Nothing here does I/O: the password derivation, the input hash and the tick id are
functions of their arguments only, so they can be checked against the reference vectors
and recomputed after a restart with the same result.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.log import redact

DEV_SEED_SECRET = "dev-persona-seed-secret-rotate-in-prod"

Cadence = Literal["daily", "weekdays", "hourly"]
Result = Literal["ok", "error"]

# Rows that are not tool calls but must still be visible on the dashboard.
TICK_ROW = "__tick"
PARSE_MODULE = "__parse"
# A scope probe's verdict (runner/probe.py); a leak's message starts with LEAK_PREFIX, the report's cause class.
PROBE_TOOL = "__probe"
LEAK_PREFIX = "scope leak:"

# A fixed namespace: tick ids must come out the same in every process, forever.
_TICK_NAMESPACE = uuid.UUID("5b0e8f3c-6a7d-4c1e-9f2a-3d4b5c6e7f80")


class DuePersona(BaseModel):
    """One row of GET /due, validated at the edge; a row that fails is skipped, not fatal."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    user_id: str = Field(alias="userId", min_length=1)
    email: str = Field(min_length=3)
    archetype: str = ""
    system_prompt: str = Field(alias="systemPrompt", default="")
    module_mix: dict[str, float] = Field(alias="moduleMix", default_factory=dict)
    tick_cadence: Cadence = Field(alias="tickCadence")
    last_active_at: datetime | None = Field(alias="lastActiveAt", default=None)

    @field_validator("user_id", "email")
    @classmethod
    def _plain(cls, value: str) -> str:
        # Ids travel in URLs, the journal and log lines; a control character or lone surrogate there is a bad row.
        if len(value) > 320 or _ID_UNSAFE.search(value):
            raise ValueError("control characters, lone surrogates or over 320 characters")
        return value


# What a row's text may not carry. PostgreSQL's text type refuses NUL (the API then answers
# 500 for the whole batch, forever); lone surrogates cannot be encoded as UTF-8 at all (they
# are what invalid UTF-8 becomes through surrogateescape, or a JSON "\ud800" escape); other
# C0/C1 controls only garble the dashboard. Tab and newline stay: they are ordinary text.
_UNSTORABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_ID_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
TOOL_NAME_MAX = 255  # the API cuts row ids at 255 characters; a longer name only collides
TEXT_MAX = 2000


def clean_text(text: str, limit: int = TEXT_MAX) -> str:
    """The one rule for text that leaves the runner in a row: storable, secret-free, bounded.

    Redaction comes after stripping (a secret split by a NUL is whole again) and before the cut
    (a cut secret would no longer match and leak its first part).
    """
    return redact(_UNSTORABLE.sub("", text))[:limit]


def _clean_optional(text: str | None) -> str | None:
    return None if text is None else clean_text(text)


@dataclass(frozen=True, slots=True)
class ActionRow:
    tool_name: str
    result: Result
    input_hash: str | None = None
    error_message: str | None = None
    latency_ms: int | None = None

    def __post_init__(self) -> None:
        # Every row is cleaned where it is made, so nothing can be frozen into a batch uncleaned.
        object.__setattr__(self, "tool_name", clean_text(self.tool_name, TOOL_NAME_MAX))
        object.__setattr__(self, "error_message", _clean_optional(self.error_message))

    def to_json(self, tick_id: str) -> dict[str, Any]:
        row: dict[str, Any] = {"tickId": tick_id, "toolName": self.tool_name, "result": self.result}
        if self.input_hash is not None:
            row["inputHash"] = self.input_hash
        if self.error_message is not None:
            row["errorMessage"] = self.error_message
        if self.latency_ms is not None:
            row["latencyMs"] = self.latency_ms
        return row


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    module: str
    rating: int
    notes: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "module", clean_text(self.module, TOOL_NAME_MAX))
        object.__setattr__(self, "notes", _clean_optional(self.notes))

    def to_json(self, tick_id: str) -> dict[str, Any]:
        row: dict[str, Any] = {"tickId": tick_id, "module": self.module, "rating": self.rating}
        if self.notes:
            row["notes"] = self.notes
        return row


def derive_password(secret: str, email: str) -> str:
    """The seed script's rule; any drift locks every persona out."""
    digest = hmac.new(secret.encode("utf-8"), email.encode("utf-8"), hashlib.sha256).digest()
    encoded = base64.b64encode(digest).decode("ascii")
    return re.sub(r"[^A-Za-z0-9]", "", encoded)[:32]


def module_of(tool_name: str) -> str:
    return tool_name.split(".", 1)[0]


def tick_window(cadence: Cadence, at: datetime) -> str:
    """The cadence window a moment falls in: the UTC hour for hourly, the UTC day otherwise."""
    utc = at.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H") if cadence == "hourly" else utc.strftime("%Y-%m-%d")


def tick_id(persona_id: str, window: str) -> str:
    """Pure in (persona, window), so a retried or resumed tick writes onto the same rows."""
    return str(uuid.uuid5(_TICK_NAMESPACE, f"{persona_id}/{window}"))


def input_hash(value: Any) -> str:
    """First 16 hex chars of SHA-256 over JavaScript's JSON.stringify(value)."""
    return hashlib.sha256(js_stringify(value).encode("utf-8")).hexdigest()[:16]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_MAX_SAFE = 2**53


def js_stringify(value: Any) -> str:
    """JSON.stringify as V8 prints it: no spaces, raw non-ASCII, JS numbers, JS key order."""
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return _js_string(value)
    if isinstance(value, int):
        # JS numbers are doubles: past 2**53 the reference loses the same precision we do here.
        return _js_number(float(value)) if abs(value) > _MAX_SAFE else str(value)
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(js_stringify(item) for item in value) + "]"
    if isinstance(value, dict):
        keys = [str(k) for k in value]
        # Every JS object lists array-index keys first, ascending, then the rest in insertion order.
        index_keys = sorted((k for k in keys if _is_array_index(k)), key=int)
        other_keys = [k for k in keys if not _is_array_index(k)]
        items = {str(k): v for k, v in value.items()}
        return "{" + ",".join(f"{_js_string(k)}:{js_stringify(items[k])}" for k in index_keys + other_keys) + "}"
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _is_array_index(key: str) -> bool:
    return _ARRAY_INDEX.fullmatch(key) is not None and int(key) < 2**32 - 1


def _js_string(text: str) -> str:
    # Python's escaper matches JSON.stringify for everything but lone surrogates,
    # which V8 (well-formed JSON.stringify) writes as lowercase \u escapes.
    dumped = json.dumps(text, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)


def _js_number(number: float) -> str:
    """Number.prototype.toString for finite doubles (ECMA-262 Number::toString)."""
    if not math.isfinite(number):
        return "null"
    if number == 0:
        return "0"
    sign = "-" if number < 0 else ""
    # repr gives the shortest round-tripping digits, the same digits V8 picks.
    _, digit_tuple, exponent = Decimal(repr(abs(number))).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    k, n = len(digits), len(digits) + exponent  # value = 0.digits * 10**n
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        body = (digits if k == 1 else digits[0] + "." + digits[1:]) + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + body
