"""The one place that decides what is retried.

Rule (contract §3): retry transport errors, 5xx and 429 after its Retry-After; never a
4xx otherwise. A retried 401 at login counts toward the persona's lockout, and a retried
400 can only fail again. tenacity applies the rule; nothing else loops on HTTP.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from runner.log import get_logger

T = TypeVar("T")
log = get_logger("runner.mana")

# A server asking for a longer pause than this is not waited for inside a tick:
# the tick fails retryably and the scheduler comes back later (an ACCOUNT_LOCKED says 15 min).
MAX_RETRY_AFTER_S = 30.0


class ManaError(Exception):
    """Anything that went wrong talking to a Mana service."""

    retryable: bool = False

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class TransportError(ManaError):
    """No HTTP answer at all: refused, reset, timed out."""

    retryable = True


class ApiError(ManaError):
    """An HTTP answer outside 2xx, with the contract's error envelope when there is one."""

    def __init__(self, status: int, code: str, message: str, *, stage: str, retry_after: float | None = None) -> None:
        super().__init__(f"{stage}: HTTP {status} {code}: {message}".strip(), stage=stage)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.retryable = status >= 500 or (
            status == 429 and code != "ACCOUNT_LOCKED" and (retry_after or 0) <= MAX_RETRY_AFTER_S
        )


class PermanentError(ManaError):
    """A well-formed answer that will not change on retry (no JWT minted, no personal space)."""


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ManaError) and exc.retryable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 20.0

    def wait(self, state: RetryCallState) -> float:
        """Retry-After when the server gave one, else exponential backoff with full jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER_S)
        ceiling = min(self.max_s, self.base_s * 2 ** (state.attempt_number - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=self.wait,
            stop=stop_after_attempt(self.attempts),
            before_sleep=_log_retry,
            reraise=True,
        )
        return await retrying(fn)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("retrying", attempt=state.attempt_number, error=str(exc), stage=getattr(exc, "stage", None))


def error_from_response(response: httpx.Response, stage: str) -> ApiError:
    code, message, retry_after = "", "", _retry_after(response)
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        # Mana's envelope names the code `error`; Better Auth's own routes name it `code`.
        code = str(body.get("error") or body.get("code") or "")
        message = str(body.get("message", ""))[:200]
        if retry_after is None and isinstance(body.get("retryAfterSec"), (int, float)):
            retry_after = float(body["retryAfterSec"])
    return ApiError(response.status_code, code or response.reason_phrase, message, stage=stage, retry_after=retry_after)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


async def request_json(
    client: httpx.AsyncClient, method: str, url: str, *, stage: str, policy: RetryPolicy, **kwargs: Any
) -> Any:
    """One logical call: retried by the policy, 2xx JSON returned, anything else raised typed."""

    async def attempt() -> Any:
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"{stage}: {type(exc).__name__}", stage=stage) from exc
        if response.status_code >= 300:
            raise error_from_response(response, stage)
        try:
            return response.json()
        except json.JSONDecodeError as exc:
            raise ApiError(response.status_code, "BAD_BODY", "answer is not JSON", stage=stage) from exc

    return await policy.run(attempt)
