"""structlog set-up: JSON lines in a container, readable lines on a terminal, secrets never.

Redaction is a processor, so it sees every event from every module (and the stdlib
loggers routed through it) after all values are bound and before anything is rendered.
Secrets are registered at run time as they appear (a derived password, a fresh JWT).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

REDACTED = "[redacted]"

# A JWT anywhere in a message is a credential, registered or not.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
# So is Better Auth's signed session cookie, `<token>.<base64 HMAC-SHA256>`, URL-encoded or not.
# By shape, like the JWT: a new cookie per sign-in would make a registry grow forever.
_SIGNED_COOKIE = re.compile(r"[A-Za-z0-9]{16,}\.(?:[A-Za-z0-9+/]|%2[BbFf]){42,43}(?:=|%3[Dd]){1,2}")
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


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {key: _redact_value(value) for key, value in event.items()}


def _redact_rendered(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Tracebacks are rendered late (format_exc_info); redact what they produced too.
    if "exception" in event:
        event["exception"] = redact(str(event["exception"]))
    return event


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
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
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
