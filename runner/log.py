"""structlog set-up: JSON lines in a container, readable lines on a terminal, secrets never.

Redaction is a processor, so it sees every event from every module (and the stdlib
loggers routed through it) after all values are bound and before anything is rendered.
Secrets are registered at run time as they appear (a derived password, a fresh JWT).
The same registry redacts what the runner sends or serves (rows, /ready, /diag answers):
`redact` is the one function for both.

Floods are bounded here too: every value is cut to FIELD_MAX characters, and a warning or
error repeated with the same event, error and persona is let through RATE_BURST times per
RATE_WINDOW_S; the next one that passes says how many were held back (`suppressed`).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

REDACTED = "[redacted]"

# Credentials by shape, registered or not: a JWT anywhere, a bearer token, a session cookie.
_JWT = re.compile(
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|(?i:(?<=bearer ))[A-Za-z0-9._~+/=-]{8,}"
    r"|(?i:(?<=session_token=))[^;,\s\"']{8,}"
)
# So is Better Auth's signed session cookie, `<token>.<base64 HMAC-SHA256>`, URL-encoded or not.
# By shape, like the JWT: a new cookie per sign-in would make a registry grow forever.
# Anchored at the start of an alphanumeric run and possessive: linear on a megabyte of letters
# (an unanchored `[A-Za-z0-9]{16,}\.` rescans the run from every position: quadratic).
_SIGNED_COOKIE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{16,}+\.(?:[A-Za-z0-9+/]|%2[BbFf]){42,43}(?:=|%3[Dd]){1,2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
FIELD_MAX = 2000
EXCEPTION_MAX = 16_000
RATE_WINDOW_S = 60.0
RATE_BURST = 5
_RATE_KEYS_MAX = 2000
_rate: dict[tuple[str, str, str], list[float]] = {}
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Add a value to redact. Registering the same value again costs a set lookup, nothing more."""
    global _pattern
    # Short values would redact ordinary words; none of our secrets is that short.
    if not value or len(value) < 6 or value in _secrets:
        return
    with _lock:
        _secrets.add(value)
        # Longest first, so a secret that contains another is removed whole. Built once per new
        # secret, not per log line: with thousands of personas a per-line sort cost milliseconds.
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def redact(text: str) -> str:
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _SIGNED_COOKIE.sub(REDACTED, _JWT.sub(REDACTED, text))


def _cap(text: str, limit: int = FIELD_MAX) -> str:
    # A lone surrogate cannot be written to a UTF-8 stream; the logging module would print a traceback instead.
    text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _cap(redact(value))
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return _cap(redact(f"{type(value).__name__}: {value}"))
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {key: _redact_value(value) for key, value in event.items()}


def _redact_rendered(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Tracebacks are rendered late (format_exc_info); redact what they produced too.
    if "exception" in event:
        event["exception"] = _cap(redact(str(event["exception"])), EXCEPTION_MAX)
    return event


def _rate_limit(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Hold back the 6th and later copies of one warning within a minute; count them."""
    if method not in ("warning", "error", "critical", "exception"):
        return event
    key = (str(event.get("event"))[:200], str(event.get("error", ""))[:200], str(event.get("persona", ""))[:200])
    now = time.monotonic()
    with _lock:
        entry = _rate.get(key)
        if entry is None or now - entry[0] > RATE_WINDOW_S:
            if len(_rate) >= _RATE_KEYS_MAX:
                _rate.clear()  # bounded memory; at worst a few repeats get through again
            _rate[key] = [now, 1.0, 0.0]
            if entry is not None and entry[2]:
                event["suppressed"] = int(entry[2])
            return event
        entry[1] += 1
        if entry[1] <= RATE_BURST:
            return event
        entry[2] += 1
    raise structlog.DropEvent


def configure(fmt: Literal["auto", "json", "console"] = "auto", level: str = "info") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    tail: list[Any] = [structlog.processors.format_exc_info, _redact_rendered]
    structlog.configure(
        # Only structlog's own chain may drop an event; a stdlib record cannot be dropped in a formatter.
        processors=[*shared, _rate_limit, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every request would drown the tick lines.
    for noisy in ("httpx", "httpx2", "httpcore", "mcp", "anthropic", "uvicorn.access", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str = "runner") -> Any:
    return structlog.get_logger(name)
