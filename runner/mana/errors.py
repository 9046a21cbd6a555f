"""The one place that decides what is retried.

Rule (contract §3): retry transport errors, 5xx and 429 after its Retry-After; never a
4xx otherwise. A retried 401 at login counts toward the persona's lockout, and a retried
400 can only fail again. tenacity applies the rule; nothing else loops on HTTP.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from runner.log import get_logger
from runner.persona import clean_text

T = TypeVar("T")
log = get_logger("runner.mana")

# A server asking for a longer pause than this is not waited for inside a tick:
# the tick fails retryably and the scheduler comes back later (an ACCOUNT_LOCKED says 15 min).
MAX_RETRY_AFTER_S = 30.0
# What is read of any answer. A 2xx body past its caller's bound is refused whole (half a JSON
# document is no document); an error body is only read for its envelope, so a little suffices.
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024


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
    """An HTTP answer outside 2xx, with the contract's error envelope when there is one.

    `retryable` says the same request may succeed later (5xx, a 429 that is not a lockout);
    whether to wait for it inside this call is `is_retryable`'s rule. `envelope` is True when
    the body was a JSON object with a string `error`: the shape the Mana services answer in,
    which a proxy's HTML or empty page is not.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        stage: str,
        retry_after: float | None = None,
        envelope: bool = False,
    ) -> None:
        code, message = clean_text(code, 200), clean_text(message, 200)
        super().__init__(f"{stage}: HTTP {status} {code}: {message}".strip(), stage=stage)
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.envelope = envelope
        self.retryable = status >= 500 or (status == 429 and code != "ACCOUNT_LOCKED")


class PermanentError(ManaError):
    """A well-formed answer that will not change on retry (no JWT minted, no personal space)."""


def is_retryable(exc: BaseException) -> bool:
    """Worth another attempt inside this call: a 429 asking for a long pause is not waited for here."""
    if isinstance(exc, ApiError) and exc.status == 429 and (exc.retry_after or 0) > MAX_RETRY_AFTER_S:
        return False
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


def decode_json(raw: bytes) -> Any:
    """JSON from bytes, or ValueError for anything that is not (bad UTF-8, 5,000-digit integers, deep nesting)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def error_from_response(response: httpx.Response, stage: str, raw: bytes) -> ApiError:
    """The typed error of a non-2xx answer; `raw` is its (bounded) body."""
    code, message, retry_after, envelope = "", "", _retry_after(response), False
    try:
        body: Any = decode_json(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        # Mana's envelope names the code `error` (the personas API's own refusals carry it, a
        # proxy's page does not); Better Auth's own routes name it `code`; the vault routes send
        # both, with the words in `error` and the code in `code`.
        envelope = isinstance(body.get("error"), str)
        named = isinstance(body.get("code"), str) and body["code"]
        code = str(body["code"] if named else body.get("error") or "")
        message = str(body.get("message") or (body.get("error") if named else "") or "")[:200]
        if retry_after is None and isinstance(body.get("retryAfterSec"), (int, float)):
            retry_after = max(0.0, min(float(body["retryAfterSec"]), 86_400.0))
    return ApiError(
        response.status_code,
        code or response.reason_phrase,
        message,
        stage=stage,
        retry_after=retry_after,
        envelope=envelope,
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        # Bounded: `inf` or 1e300 would overflow the scheduler's clock arithmetic.
        return max(0.0, min(float(value), 86_400.0)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


@asynccontextmanager
async def _exchange(
    client: httpx.AsyncClient, method: str, url: str, *, stage: str, **kwargs: Any
) -> AsyncIterator[httpx.Response]:
    """One streamed exchange; what httpx raises becomes the typed error, the one place that maps it.

    A body its own Content-Encoding cannot undo (`gzip` that is not gzip) is a bad answer, never a
    crash; no answer at all is a transport error.
    """
    status = 0
    try:
        async with client.stream(method, url, **kwargs) as response:
            status = response.status_code
            yield response
    except httpx.DecodingError as exc:
        why = "answer could not be decoded (its Content-Encoding does not match)"
        raise ApiError(status, "BAD_BODY", why, stage=stage) from exc
    except httpx.TransportError as exc:
        raise TransportError(f"{stage}: {type(exc).__name__}", stage=stage) from exc


async def fetch(
    client: httpx.AsyncClient, method: str, url: str, *, stage: str, max_bytes: int = MAX_BODY_BYTES, **kwargs: Any
) -> tuple[httpx.Response, bytes]:
    """One HTTP exchange, not retried: the answer and its body; anything but a whole 2xx raised typed.

    At most `max_bytes` of an answer are read: a 500 MB body is refused, never buffered.
    """
    async with _exchange(client, method, url, stage=stage, **kwargs) as response:
        ok = response.status_code < 300
        raw, whole = await read_bounded(response, max_bytes if ok else MAX_ERROR_BODY_BYTES)
    if not ok:
        raise error_from_response(response, stage, raw)
    if not whole:
        raise ApiError(response.status_code, "TOO_LARGE", f"answer exceeds {max_bytes} bytes", stage=stage)
    return response, raw


async def status_only(client: httpx.AsyncClient, method: str, url: str, *, stage: str, **kwargs: Any) -> httpx.Response:
    """One exchange whose 2xx body is never read (the connection is closed instead); a refusal raised typed.

    For answers whose body is of no use or should not be held: a readiness probe's `/due`, the
    master key a vault check answers with.
    """
    async with _exchange(client, method, url, stage=stage, **kwargs) as response:
        if response.status_code >= 300:
            raw, _ = await read_bounded(response, MAX_ERROR_BODY_BYTES)
            raise error_from_response(response, stage, raw)
    return response


def parse_json(raw: bytes, status: int, stage: str) -> Any:
    """A 2xx body as JSON, or the typed error that says it is not (bad UTF-8 and deep nesting too)."""
    try:
        return decode_json(raw)
    except ValueError as exc:
        raise ApiError(status, "BAD_BODY", f"answer is not JSON ({exc})"[:200], stage=stage) from None


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    stage: str,
    policy: RetryPolicy,
    max_bytes: int = MAX_BODY_BYTES,
    **kwargs: Any,
) -> Any:
    """One logical call: retried by the policy, 2xx JSON returned, anything else raised typed."""

    async def attempt() -> Any:
        response, raw = await fetch(client, method, url, stage=stage, max_bytes=max_bytes, **kwargs)
        return parse_json(raw, response.status_code, stage)

    return await policy.run(attempt)


async def read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that was all of it."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True
