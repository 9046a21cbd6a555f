"""One persona's tick, start to end: login, MCP session, role-play, rating, seal.

Everything the persona does is journaled before the next step starts; the tick ends by
sealing its rows into the outbox, whatever happened (success, failure, timeout,
shutdown). The one exception is a failure *before any tool call* that may pass: nothing
happened in Mana, so the tick is deferred and run again, with the same tick id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from opentelemetry import trace

from runner import metrics, tracing
from runner.agent.loop import ModelUnavailable, Play, Provider, ToolCall, ToolDef, ToolResult, Usage, play
from runner.agent.policy import Decision, SpaceScope, ToolPolicy, summary
from runner.agent.prompts import Language, SharedPlace, liked_modules, rating_prompt, system_prompt
from runner.agent.rating import RATING_TOOL, parse_failure_row, parse_ratings
from runner.journal import Budget, Claim, Journal
from runner.log import get_logger
from runner.mana.auth import AuthClient
from runner.mana.errors import ApiError, ManaError, PermanentError, TransportError
from runner.mana.mcp import McpGateway, SpaceRefused, ToolOutcome, ToolSpec, error_message
from runner.persona import PROBE_TOOL, TICK_ROW, ActionRow, DuePersona, input_hash, module_of, tick_id
from runner.probe import Probe, Verdict
from runner.session import PersonaSession, SessionConfig
from runner.spaces import SpaceModules, draw, shared_spaces

log = get_logger("runner.tick")

Outcome = Literal["ok", "failed", "timeout", "interrupted", "deferred"]
# The action row of a tick a budget ended early (result ok: the day happened, only shorter).
BUDGET_ROW = "__budget"
ProviderFactory = Callable[[DuePersona, str], Provider]


@dataclass(frozen=True, slots=True)
class TickConfig:
    session: SessionConfig
    mcp_url: str
    max_turns: int
    timeout_s: float
    max_attempts: int
    retry_base_s: float
    language: Language
    call_timeout_s: float = 60.0
    # The daily budgets every model call is checked against (runner/journal/budget.py); none by default.
    budget: Budget = field(default_factory=Budget)
    policy: ToolPolicy = field(default_factory=ToolPolicy)
    # One TLS context for every MCP session of the process, built once.
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)
    # Shared spaces (issue 15): the allowlist per space type (None: every tick plays in the personal
    # space), the share of windows played in a shared space, and a scope probe once per window.
    space_modules: SpaceModules | None = None
    shared_share: float = 0.0
    scope_probe: bool = False


@dataclass(frozen=True, slots=True)
class TickDeps:
    config: TickConfig
    auth: AuthClient
    journal: Journal
    make_provider: ProviderFactory


class NoToolsOffered(Exception):
    """The policy withheld every served tool: the persona could do nothing, which is not a quiet day."""


@dataclass(slots=True)
class _Progress:
    stage: str = "login"
    play: Play = field(default_factory=Play)
    calls: _JournaledCalls | None = None
    session: PersonaSession | None = None
    gateway: McpGateway | None = None
    deadline: asyncio.Timeout | None = None
    budget_stop: str | None = None  # why a budget ended the day early, for its `__budget` row

    @asynccontextmanager
    async def login_wait(self) -> AsyncIterator[None]:
        """Stop the tick's clock while it queues for a login slot: waiting in line is not the tick being slow."""
        deadline = self.deadline
        when = deadline.when() if deadline is not None else None
        if deadline is None or when is None:
            yield
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline.reschedule(None)
        try:
            yield
        finally:
            # A tick cancelled while it waited has no deadline left to move.
            with contextlib.suppress(RuntimeError):
                deadline.reschedule(when + (loop.time() - started))


async def run_tick(deps: TickDeps, persona: DuePersona, claim: Claim, window: str = "") -> Outcome:
    """Run one claimed tick to its sealed (or deferred) end. Cancellation seals it as interrupted.

    The tick is one trace when tracing is on (runner/tracing.py): its span is current while it runs.
    """
    with tracing.tick_span(persona, claim.tick_id, window) as span:
        outcome = await _run_tick(deps, persona, claim)
        tracing.ended(span, outcome)
        return outcome


async def _run_tick(deps: TickDeps, persona: DuePersona, claim: Claim) -> Outcome:
    structlog.contextvars.bind_contextvars(persona=persona.email, tick_id=claim.tick_id, stage="login")
    progress = _Progress()
    started = time.monotonic()
    metrics.IN_FLIGHT.inc()
    try:
        async with asyncio.timeout(deps.config.timeout_s) as deadline:
            progress.deadline = deadline
            modules = await _play_day(deps, persona, claim, progress)
        _stage(progress, "seal")
        # A quiet day still leaves a row: without one the persona stays due and runs at every poll.
        tick_row = None if progress.play.calls else ActionRow(TICK_ROW, "ok")
        if progress.budget_stop is not None:
            tick_row = ActionRow(BUDGET_ROW, "ok", error_message=progress.budget_stop)
        if not await deps.journal.seal(claim.tick_id, "ok", tick_row):
            return _lease_lost(claim, started)
        log.info("tick done", calls=progress.play.calls, modules=modules)
        return _finish("ok", started)
    except TimeoutError:
        reason = f"timeout: tick exceeded {deps.config.timeout_s:g}s during {progress.stage}"
        if progress.calls is not None:
            await progress.calls.abandon("outcome unknown: the tick timed out during the call")
        return await _fail(deps, claim, progress, "timeout", reason, started)
    except asyncio.CancelledError:
        if not _shutting_down():
            # Nobody cancelled this task: the MCP SDK's task group did, because its connection
            # dropped. That is a passing failure like any other, not a shutdown (issue 7).
            cause = progress.gateway.closed_with if progress.gateway is not None else None
            dropped = TransportError(
                f"mcp: connection to mana-mcp dropped during {progress.stage}" + (f" ({cause})" if cause else ""),
                stage="mcp",
            )
            if progress.calls is not None:
                await progress.calls.abandon("outcome unknown: the connection to mana-mcp dropped during the call")
            return await _failed(deps, claim, progress, dropped, started)
        # Shutdown cut the tick: keep what was done and say why, then let the cancel go on.
        await asyncio.shield(_interrupted(deps, claim, progress, started))
        raise
    except Exception as exc:  # noqa: BLE001 - one persona failing must never stop the others
        if isinstance(exc, SpaceRefused) and progress.session is not None:
            # A fresh JWT refused at the gateway: the remembered space may be wrong; look it up next time.
            # Only a hint: failing to write it must not keep the tick from being sealed below.
            with contextlib.suppress(Exception):
                await progress.session.forget_space()
        return await _failed(deps, claim, progress, exc, started)
    finally:
        metrics.IN_FLIGHT.dec()
        structlog.contextvars.unbind_contextvars("persona", "tick_id", "stage")


async def _failed(deps: TickDeps, claim: Claim, progress: _Progress, exc: Exception, started: float) -> Outcome:
    """Any failure but a timeout or a shutdown: deferred when it may pass and nothing reached Mana."""
    metrics.ERRORS.labels(stage=progress.stage).inc()
    known = isinstance(exc, (ManaError, NoToolsOffered))
    reason = str(exc) if known else f"{progress.stage}: {type(exc).__name__}: {exc}"
    may_pass = (isinstance(exc, ManaError) and exc.retryable) or isinstance(exc, ModelUnavailable)
    # Only a tick that has not touched Mana yet may run again: a replayed day would double its content.
    if may_pass and progress.play.calls == 0 and claim.attempt < deps.config.max_attempts:
        retry_in = deps.config.retry_base_s * 2 ** (claim.attempt - 1)
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            retry_in = max(retry_in, exc.retry_after)  # a 429's Retry-After: come back no sooner
        await deps.journal.defer(claim.tick_id, reason, retry_in)
        log.warning("tick deferred", error=reason, attempt=claim.attempt, retry_in_s=retry_in)
        return _finish("deferred", started)
    return await _fail(deps, claim, progress, "failed", reason, started)


async def _interrupted(deps: TickDeps, claim: Claim, progress: _Progress, started: float) -> Outcome:
    if progress.calls is not None:
        await progress.calls.abandon("outcome unknown: runner stopped during the call")
    return await _fail(deps, claim, progress, "interrupted", "interrupted: runner shut down during this tick", started)


def _shutting_down() -> bool:
    """True when someone cancelled this task (drain, Ctrl-C), as opposed to an SDK-internal cancel scope."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _session(
    deps: TickDeps, email: str, user_id: str | None = None, progress: _Progress | None = None
) -> PersonaSession:
    if progress is None:
        return PersonaSession(deps.config.session, deps.auth, deps.journal, email, user_id)
    return PersonaSession(
        deps.config.session,
        deps.auth,
        deps.journal,
        email,
        user_id,
        waiting=progress.login_wait,
        stage=lambda stage: _stage(progress, stage),
    )


def _gateway(config: TickConfig, session: PersonaSession, space_id: str | None = None) -> McpGateway:
    """An MCP session in the persona's personal space, or in `space_id` (the space is fixed per session)."""
    # Renewal through the session: a new sign-in that never spends a lockout attempt twice.
    space = space_id or session.space.id
    return McpGateway(config.mcp_url, space, session.jwt, session.renew, config.call_timeout_s, config.tls)


@dataclass(frozen=True, slots=True)
class _Where:
    """The space a tick plays in: how it was known, its type, and for a shared one its scope and members."""

    space_id: str
    via: str
    type: str = "personal"
    scope: SpaceScope | None = None
    place: SharedPlace | None = None


async def _where(config: TickConfig, session: PersonaSession, tick_id: str) -> _Where:
    """The personal space, or for PERSONA_SHARED_SPACE_SHARE of windows one of the persona's shared spaces.

    Both draws depend on the tick id alone, so a retried or resumed tick plays where it played before.
    Only a window drawn for a shared space asks for the space list (on today's Mana one more sign-in).
    """
    personal = _Where(session.space.id, session.space.via)
    modules = config.space_modules
    if modules is None or draw(tick_id, "shared") >= config.shared_share:
        return personal
    shared = shared_spaces(await session.spaces(), modules)
    if not shared:
        return personal
    space = shared[int(draw(tick_id, "which") * len(shared))]
    assert space.type is not None  # shared_spaces keeps only known types
    others = [m.name or m.email for m in await session.members(space.id) if m.email.lower() != session.email.lower()]
    scope = SpaceScope(space.type, modules.allowlist[space.type])
    return _Where(space.id, "list", space.type, scope, SharedPlace(space.name, space.type, others))


def _decide(policy: ToolPolicy, specs: list[ToolSpec], scope: SpaceScope | None = None) -> list[Decision]:
    """The policy's decisions for this tick, counted in metrics and logged once."""
    decisions = policy.decide(specs, scope)
    for d in decisions:
        metrics.TOOL_DECISIONS.labels(
            tool=metrics.tool_label(d.name), decision="offered" if d.offered else "withheld", rule=d.rule
        ).inc()
    offered = sum(1 for d in decisions if d.offered)
    withheld = len(decisions) - offered
    log.info("tools decided", served=len(decisions), offered=offered, withheld=withheld, by_rule=summary(decisions))
    return decisions


async def sign_in(deps: TickDeps, email: str) -> PersonaSession:
    """An open session for a persona known by its email alone (the `login` and `tools` commands,
    /diag/login), under the same lockout rule as ticks."""
    session = _session(deps, email)
    await session.open()
    return session


async def served_tools(deps: TickDeps, email: str) -> list[Decision]:
    """What `python -m runner tools EMAIL` shows: the served list with the policy's decision per tool."""
    session = await sign_in(deps, email)
    async with _gateway(deps.config, session) as gateway:
        return deps.config.policy.decide(await gateway.tools())


async def _play_day(deps: TickDeps, persona: DuePersona, claim: Claim, progress: _Progress) -> list[str]:
    """The persona's day; returns the modules it used (empty for a quiet day)."""
    config = deps.config
    session = progress.session = _session(deps, persona.email, persona.user_id, progress)
    await session.open(vault=True)
    where = await _where(config, session, claim.tick_id)
    await deps.journal.record_tick_space(claim.tick_id, persona.user_id, where.space_id, where.via, where.type)
    span = trace.get_current_span()
    span.set_attribute("mana.space.id", where.space_id)
    span.set_attribute("mana.space.type", where.type)
    first_seq = 0
    if config.scope_probe:
        first_seq, _ = await _probe(deps, claim, progress, session)

    _stage(progress, "mcp")
    progress.gateway = _gateway(config, session, where.space_id)
    async with progress.gateway as gateway:
        specs = await gateway.tools()
        _stage(progress, "tools")
        # For the report's coverage: what was served, and what the persona would have liked to use.
        await deps.journal.record_offer(claim.tick_id, [s.name for s in specs], persona.module_mix)
        decisions = _decide(config.policy, specs, where.scope)
        offered_names = {d.name for d in decisions if d.offered}
        if not offered_names:
            why = ", ".join(f"{rule}: {n}" for rule, n in summary(decisions).items())
            log.warning("no tools offered: check PERSONA_TOOLS_ALLOW / PERSONA_TOOLS_DENY", served=len(specs), why=why)
            if not specs:
                raise NoToolsOffered("no tools offered: mana-mcp served none")
            raise NoToolsOffered(f"no tools offered: all {len(specs)} withheld by policy ({why})")
        offered = [s for s in specs if s.name in offered_names]
        tools = [ToolDef(s.name, s.description, s.input_schema) for s in offered]
        modules = liked_modules(persona.module_mix, {module_of(s.name) for s in offered})
        today = datetime.now(UTC).date()
        system = system_prompt(persona.system_prompt, modules, today, config.language, where.place)
        provider = deps.make_provider(persona, claim.tick_id)
        call_tool = _JournaledCalls(deps.journal, claim.tick_id, gateway, offered_names, first_seq)
        progress.calls = call_tool

        async def on_usage(usage: Usage) -> bool:
            # Journaled as the answer arrives, so a tick cut later still has every call it paid for.
            stop = await deps.journal.record_model_call(claim.tick_id, persona.user_id, usage, config.budget)
            if stop is not None:
                progress.budget_stop = stop
                log.warning("budget stops the day after this turn", reason=stop)
            return stop is None

        _stage(progress, "play")
        await play(
            provider, system, tools, call_tool, max_turns=config.max_turns, state=progress.play, on_usage=on_usage
        )
        metrics_usage(progress.play)
    # The session is closed before the rating: it needs only the transcript, and a connection
    # dropping meanwhile must not cost the persona its ratings.
    progress.calls = None

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
        # The rating is the day's last call: recorded, but it never stops anything (the day is over).
        await deps.journal.record_model_call(claim.tick_id, persona.user_id, reply.usage)
        rows = parse_ratings(reply.payload, used)
        feedback = rows if rows is not None else [parse_failure_row(reply.raw)]
    except Exception as exc:  # noqa: BLE001 - the day happened; a failed rating must not lose it
        metrics.ERRORS.labels(stage="rate").inc()
        feedback = [parse_failure_row(f"rating failed: {type(exc).__name__}: {exc}")]
    await deps.journal.save_ratings(claim.tick_id, feedback)
    return used


async def _probe(
    deps: TickDeps, claim: Claim, progress: _Progress, session: PersonaSession
) -> tuple[int, Verdict | None]:
    """A scope probe (runner/probe.py) for a persona with a shared space: its calls are the tick's first rows,
    its verdict one more (`__probe`). Returns the next call number and the verdict (None: no shared space)."""
    config = deps.config
    modules = config.space_modules
    shared = shared_spaces(await session.spaces(), modules) if modules is not None else []
    if modules is None or not shared:
        return 0, None
    _stage(progress, "probe")
    seq = 0

    async def call(gateway: McpGateway, name: str, args: dict[str, Any]) -> ToolOutcome:
        nonlocal seq
        progress.calls = _JournaledCalls(deps.journal, claim.tick_id, gateway, {name}, seq)
        result = await progress.calls(ToolCall(f"probe-{seq}", name, args))
        seq, progress.calls = progress.calls.next_seq, None
        progress.play.calls += 1  # Mana was touched: the tick is never replayed from here
        return ToolOutcome(not result.is_error, result.text)

    members: dict[str, PersonaSession] = {}

    async def member(email: str) -> PersonaSession:
        if email not in members:
            members[email] = _session(deps, email, None, progress)
            await members[email].open(vault=True)
        return members[email]

    def open_gateway(who: PersonaSession, space_id: str) -> McpGateway:
        return _gateway(config, who, space_id)

    verdict = await Probe(session, claim.tick_id, call, open_gateway, member, config.policy).run(shared, modules)
    await deps.journal.begin_call(claim.tick_id, seq, PROBE_TOOL, None)
    await deps.journal.end_call(claim.tick_id, seq, verdict.ok, verdict.message, 0)
    progress.play.calls += 1
    return seq + 1, verdict


async def probe_now(deps: TickDeps, email: str) -> Verdict | None:
    """`python -m runner probe`: one probe outside the schedule, in a tick of its own whose rows are sealed and
    delivered like any other. None, and no tick, when the persona has no shared space."""
    session = _session(deps, email)
    await session.open(vault=True)
    modules = deps.config.space_modules
    if modules is None or not shared_spaces(await session.spaces(), modules):
        return None
    # Day first, like every window: the report files a tick under its window's first ten characters.
    window = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%S}-probe"
    claim = await deps.journal.claim(session.user_id, window, tick_id(session.user_id, window))
    if claim is None:
        raise PermanentError(f"probe: {email} was probed this second already", stage="probe")
    progress = _Progress(session=session)
    try:
        _, verdict = await _probe(deps, claim, progress, session)
    except BaseException as exc:
        if progress.calls is not None:
            await asyncio.shield(progress.calls.abandon("outcome unknown: the probe stopped during the call"))
        why = f"probe: {type(exc).__name__}: {exc}" if not isinstance(exc, ManaError) else str(exc)
        await asyncio.shield(
            deps.journal.seal(claim.tick_id, "failed", ActionRow(TICK_ROW, "error", error_message=why))
        )
        raise
    await deps.journal.seal(claim.tick_id, "ok", None)
    return verdict


class _JournaledCalls:
    """The tick's `call_tool`: journal the intent, call MCP, journal the outcome.

    Only names the policy offered are sent: a withheld tool or a name the model made up is
    an error row that never reaches Mana. So is an input that is not a JSON object (tools
    take objects): it is refused here rather than replaced by `{}`, which would be a call
    the model never asked for; its row hashes the input as the model gave it.
    """

    def __init__(
        self, journal: Journal, tick_id: str, gateway: McpGateway, offered: set[str], first_seq: int = 0
    ) -> None:
        self._journal = journal
        self._tick_id = tick_id
        self._gateway = gateway
        self._offered = offered
        self._seq = first_seq  # after the calls a probe made earlier in the tick
        self._in_flight: _InFlight | None = None
        self.used: list[str] = []

    async def __call__(self, call: ToolCall) -> ToolResult:
        seq = self._seq
        self._seq += 1
        try:
            digest: str | None = input_hash(call.input)
        except TypeError:
            digest = None
        sent = call.name in self._offered and isinstance(call.input, dict)
        started = time.monotonic()
        # Kept until the outcome is journaled: a timeout or a dropped connection can cut the
        # journal writes too, and `abandon` then closes the row with what is known.
        self._in_flight = _InFlight(seq, started) if sent else None
        await self._journal.begin_call(self._tick_id, seq, call.name, digest)
        if call.name not in self._offered:
            ok, text = False, f"Unknown tool {call.name}: not available to you"
        elif not isinstance(call.input, dict):
            got = _json_type(call.input)
            ok, text = False, f"Invalid arguments for tool {call.name}: expected an object, got {got}; not sent"
        else:
            try:
                outcome = await self._gateway.call(call.name, call.input)
            except ManaError as exc:  # the session is gone (refused space, failed renewal): the tick ends
                await self._end(seq, False, str(exc), started)
                raise
            ok, text = outcome.ok, outcome.text
            self.used.append(call.name)
            if self._in_flight is not None:
                self._in_flight.outcome = (ok, text)
        latency_ms = await self._end(seq, ok, text, started)
        label = metrics.tool_label(call.name) if call.name in self._offered else "__unknown"
        metrics.TOOL_CALLS.labels(tool=label, result="ok" if ok else "error").inc()
        metrics.TOOL_LATENCY.labels(tool=label).observe(latency_ms / 1000)
        log.info("tool call", tool=call.name, ok=ok, latency_ms=latency_ms)
        return ToolResult(call.id, text, not ok)

    @property
    def next_seq(self) -> int:
        return self._seq

    async def _end(self, seq: int, ok: bool, text: str, started: float) -> int:
        latency_ms = round((time.monotonic() - started) * 1000)
        await self._journal.end_call(self._tick_id, seq, ok, None if ok else error_message(text), latency_ms)
        self._in_flight = None
        return latency_ms

    async def abandon(self, reason: str) -> None:
        """Close the call that was under way when the tick was cut, with its outcome if known, else `reason`."""
        if self._in_flight is not None:
            pending, self._in_flight = self._in_flight, None
            ok, text = pending.outcome or (False, reason)
            await self._end(pending.seq, ok, text, pending.started)


@dataclass(slots=True)
class _InFlight:
    seq: int
    started: float
    outcome: tuple[bool, str] | None = None  # (ok, text) once mana-mcp answered


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


async def _fail(
    deps: TickDeps, claim: Claim, progress: _Progress, outcome: Outcome, reason: str, started: float
) -> Outcome:
    metrics_usage(progress.play)
    row = ActionRow(TICK_ROW, "error", error_message=error_message(reason))
    if not await deps.journal.seal(claim.tick_id, outcome, row, stage=progress.stage):
        return _lease_lost(claim, started)
    log.warning("tick ended with an error", outcome=outcome, error=reason, calls=progress.play.calls)
    return _finish(outcome, started)


def _lease_lost(claim: Claim, started: float) -> Outcome:
    # This replica stalled past its lease and another one sealed the tick as interrupted, with
    # every call journaled until then: nothing is lost, and this replica adds nothing more.
    log.warning("tick taken over: its lease ran out and another replica sealed it", tick_id=claim.tick_id)
    return _finish("interrupted", started)


def _finish(outcome: Outcome, started: float) -> Outcome:
    metrics.TICKS.labels(outcome=outcome).inc()
    metrics.TICK_DURATION.observe(time.monotonic() - started)
    return outcome


def metrics_usage(state: Play) -> None:
    for kind, count in state.usage.by_kind().items():
        if count:
            metrics.LLM_TOKENS.labels(kind=kind).inc(count)
    if state.usage.cost_usd:
        metrics.LLM_COST.labels(model=state.usage.model).inc(state.usage.cost_usd)
    state.usage = type(state.usage)()  # counted once, even when a failure path reports again


def _stage(progress: _Progress, stage: str) -> None:
    progress.stage = stage
    structlog.contextvars.bind_contextvars(stage=stage)
