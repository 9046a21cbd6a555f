"""One persona's tick, start to end: login, MCP session, role-play, rating, seal.

Everything the persona does is journaled before the next step starts; the tick ends by
sealing its rows into the outbox, whatever happened (success, failure, timeout,
shutdown). The one exception is a failure *before any tool call* that may pass: nothing
happened in Mana, so the tick is deferred and run again, with the same tick id.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import structlog

from runner import metrics
from runner.agent.loop import ModelUnavailable, Play, Provider, ToolCall, ToolDef, ToolResult, play
from runner.agent.prompts import Language, liked_modules, rating_prompt, system_prompt
from runner.agent.rating import RATING_TOOL, parse_failure_row, parse_ratings
from runner.journal import Claim, Journal
from runner.log import get_logger, register_secret
from runner.mana.auth import AuthClient
from runner.mana.errors import ApiError, ManaError, PermanentError
from runner.mana.mcp import McpGateway, ToolSpec
from runner.persona import TICK_ROW, ActionRow, DuePersona, derive_password, input_hash, module_of

log = get_logger("runner.tick")

Outcome = Literal["ok", "failed", "timeout", "interrupted", "deferred"]
ProviderFactory = Callable[[DuePersona, str], Provider]


@dataclass(frozen=True, slots=True)
class TickConfig:
    seed_secret: str
    mcp_url: str
    max_turns: int
    timeout_s: float
    max_attempts: int
    retry_base_s: float
    language: Language
    call_timeout_s: float = 60.0
    # One TLS context for every MCP session of the process, built once.
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)

    @property
    def secret_fingerprint(self) -> str:
        """Names the seed secret in the journal without storing it."""
        return hashlib.sha256(b"persona-runner/" + self.seed_secret.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class TickDeps:
    config: TickConfig
    auth: AuthClient
    journal: Journal
    make_provider: ProviderFactory


@dataclass(slots=True)
class _Progress:
    stage: str = "login"
    play: Play = field(default_factory=Play)


async def run_tick(deps: TickDeps, persona: DuePersona, claim: Claim) -> Outcome:
    """Run one claimed tick to its sealed (or deferred) end. Cancellation seals it as interrupted."""
    structlog.contextvars.bind_contextvars(persona=persona.email, tick_id=claim.tick_id, stage="login")
    progress = _Progress()
    started = time.monotonic()
    metrics.IN_FLIGHT.inc()
    try:
        async with asyncio.timeout(deps.config.timeout_s):
            modules = await _play_day(deps, persona, claim, progress)
        _stage(progress, "seal")
        # A quiet day still leaves a row: without one the persona stays due and runs at every poll.
        tick_row = None if progress.play.calls else ActionRow(TICK_ROW, "ok")
        await deps.journal.seal(claim.tick_id, "ok", tick_row, time.time())
        log.info("tick done", calls=progress.play.calls, modules=modules)
        return _finish("ok", started)
    except TimeoutError:
        reason = f"timeout: tick exceeded {deps.config.timeout_s:g}s during {progress.stage}"
        return await _fail(deps, claim, progress, "timeout", reason, started)
    except asyncio.CancelledError:
        # Shutdown cut the tick: keep what was done and say why, then let the cancel go on.
        await asyncio.shield(
            _fail(deps, claim, progress, "interrupted", "interrupted: runner shut down during this tick", started)
        )
        raise
    except Exception as exc:  # noqa: BLE001 - one persona failing must never stop the others
        metrics.ERRORS.labels(stage=progress.stage).inc()
        reason = str(exc) if isinstance(exc, ManaError) else f"{progress.stage}: {type(exc).__name__}: {exc}"
        may_pass = (isinstance(exc, ManaError) and exc.retryable) or isinstance(exc, ModelUnavailable)
        # Only a tick that has not touched Mana yet may run again: a replayed day would double its content.
        if may_pass and progress.play.calls == 0 and claim.attempt < deps.config.max_attempts:
            retry_in = deps.config.retry_base_s * 2 ** (claim.attempt - 1)
            if isinstance(exc, ApiError) and exc.retry_after is not None:
                retry_in = max(retry_in, exc.retry_after)  # a 429's Retry-After: come back no sooner
            await deps.journal.defer(claim.tick_id, reason, time.time() + retry_in, time.time())
            log.warning("tick deferred", error=reason, attempt=claim.attempt, retry_in_s=retry_in)
            return _finish("deferred", started)
        return await _fail(deps, claim, progress, "failed", reason, started)
    finally:
        metrics.IN_FLIGHT.dec()
        structlog.contextvars.unbind_contextvars("persona", "tick_id", "stage")


async def _play_day(deps: TickDeps, persona: DuePersona, claim: Claim, progress: _Progress) -> list[str]:
    """The persona's day; returns the modules it used (empty for a quiet day)."""
    config = deps.config
    blocked = await deps.journal.login_block(persona.user_id, config.secret_fingerprint, persona.email)
    if blocked:
        raise PermanentError(f"login: not attempted, refused before with this seed secret ({blocked})", stage="login")
    password = derive_password(config.seed_secret, persona.email)
    register_secret(password)
    try:
        login = await deps.auth.login(persona.email, password)
    except ApiError as exc:
        if exc.code == "INVALID_CREDENTIALS":
            await deps.journal.block_login(
                persona.user_id, config.secret_fingerprint, str(exc), time.time(), email=persona.email
            )
        raise
    _stage(progress, "spaces")
    space_id = await deps.auth.personal_space(login.access_token)

    async def fresh_token() -> str:
        # Re-login rather than refresh: the derived password always works and needs no session state.
        return (await deps.auth.login(persona.email, password)).access_token

    _stage(progress, "mcp")
    gateway = McpGateway(config.mcp_url, space_id, login.access_token, fresh_token, config.call_timeout_s, config.tls)
    async with gateway:
        specs = await gateway.tools()
        offered = [s for s in specs if not s.destructive]  # never hand the model a destructive tool
        tools = [ToolDef(s.name, s.description, s.input_schema) for s in offered]
        modules = liked_modules(persona.module_mix, {module_of(s.name) for s in offered})
        system = system_prompt(persona.system_prompt, modules, datetime.now(UTC).date(), config.language)
        provider = deps.make_provider(persona, claim.tick_id)
        call_tool = _JournaledCalls(deps.journal, claim.tick_id, gateway, offered)

        _stage(progress, "play")
        await play(provider, system, tools, call_tool, max_turns=config.max_turns, state=progress.play)
        metrics_usage(progress.play)

        used = sorted({module_of(name) for name in call_tool.used})
        if not used:
            return []
        _stage(progress, "rate")
        try:
            reply = await provider.rate(
                system, tools, progress.play.transcript, rating_prompt(used, RATING_TOOL, config.language), used
            )
            progress.play.usage.add(reply.usage)
            metrics_usage(progress.play)
            rows = parse_ratings(reply.payload, used)
            feedback = rows if rows is not None else [parse_failure_row(reply.raw)]
        except Exception as exc:  # noqa: BLE001 - the day happened; a failed rating must not lose it
            metrics.ERRORS.labels(stage="rate").inc()
            feedback = [parse_failure_row(f"rating failed: {type(exc).__name__}: {exc}")]
        await deps.journal.save_ratings(claim.tick_id, feedback)
        return used


class _JournaledCalls:
    """The tick's `call_tool`: journal the intent, call MCP, journal the outcome."""

    def __init__(self, journal: Journal, tick_id: str, gateway: McpGateway, offered: list[ToolSpec]) -> None:
        self._journal = journal
        self._tick_id = tick_id
        self._gateway = gateway
        self._offered = {s.name for s in offered}
        self._seq = 0
        self.used: list[str] = []

    async def __call__(self, call: ToolCall) -> ToolResult:
        seq = self._seq
        self._seq += 1
        try:
            digest: str | None = input_hash(call.input)
        except TypeError:
            digest = None
        await self._journal.begin_call(self._tick_id, seq, call.name, digest)
        started = time.monotonic()
        if call.name not in self._offered:
            # A name the model made up, or a tool we withheld: it never reaches Mana.
            ok, text = False, f"Unknown tool {call.name}: not available to you"
        else:
            arguments = call.input if isinstance(call.input, dict) else {}
            outcome = await self._gateway.call(call.name, arguments)
            ok, text = outcome.ok, outcome.text
            self.used.append(call.name)
        latency_ms = round((time.monotonic() - started) * 1000)
        await self._journal.end_call(self._tick_id, seq, ok, None if ok else _short(text), latency_ms)
        # Only real tool names become label values: a model's invention must not grow the series.
        label = call.name if call.name in self._offered else "__unknown"
        metrics.TOOL_CALLS.labels(tool=label, result="ok" if ok else "error").inc()
        metrics.TOOL_LATENCY.labels(tool=label).observe(latency_ms / 1000)
        log.info("tool call", tool=call.name, ok=ok, latency_ms=latency_ms)
        return ToolResult(call.id, text, not ok)


async def _fail(
    deps: TickDeps, claim: Claim, progress: _Progress, outcome: Outcome, reason: str, started: float
) -> Outcome:
    metrics_usage(progress.play)
    await deps.journal.seal(
        claim.tick_id, outcome, ActionRow(TICK_ROW, "error", error_message=reason[:500]), time.time()
    )
    log.warning("tick ended with an error", outcome=outcome, error=reason, calls=progress.play.calls)
    return _finish(outcome, started)


def _finish(outcome: Outcome, started: float) -> Outcome:
    metrics.TICKS.labels(outcome=outcome).inc()
    metrics.TICK_DURATION.observe(time.monotonic() - started)
    return outcome


def metrics_usage(state: Play) -> None:
    for kind, count in state.usage.by_kind().items():
        if count:
            metrics.LLM_TOKENS.labels(kind=kind).inc(count)
    state.usage = type(state.usage)()  # counted once, even when a failure path reports again


def _stage(progress: _Progress, stage: str) -> None:
    progress.stage = stage
    structlog.contextvars.bind_contextvars(stage=stage)


def _short(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "error"
