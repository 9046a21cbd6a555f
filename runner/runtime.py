"""The runner's long-lived wiring: journal, Mana clients, outbox and what a tick needs, from the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from runner import tracing
from runner.agent.providers.scripted import ScriptedProvider
from runner.journal import Budget, Journal
from runner.log import register_secret
from runner.mana.auth import AuthClient, LoginLimiter
from runner.mana.errors import RetryPolicy
from runner.mana.http import shared_client
from runner.mana.personas_api import DueLimits, PersonasApi
from runner.outbox import Outbox, OutboxPolicy
from runner.session import SessionConfig
from runner.settings import Settings
from runner.tick import ProviderFactory, TickConfig, TickDeps


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    journal: Journal
    api: PersonasApi
    outbox: Outbox
    tick_deps: TickDeps


def scripted_factory(settings: Settings) -> ProviderFactory:
    """The offline player: no model, no cost (LLM_PROVIDER=scripted, and BUDGET_EXHAUSTED=scripted)."""
    seed, latency_ms = settings.scripted_seed, settings.scripted_latency_ms
    return lambda p, tid: ScriptedProvider(f"{seed}:{tid}", p.module_mix, latency_ms)


@asynccontextmanager
async def provider_factory(settings: Settings) -> AsyncIterator[ProviderFactory]:
    """The model the settings choose, one provider per tick; Claude's client lives as long as the block."""
    if settings.llm_provider == "scripted":
        yield scripted_factory(settings)
        return
    # Imported only here: the Anthropic SDK's models take seconds to import, and the scripted player,
    # the tests that bring their own provider and every command but serve/once/demo never use them.
    from anthropic import AsyncAnthropic

    from runner.agent.providers.anthropic import AnthropicProvider, Warmup

    price = settings.model_price
    client = AsyncAnthropic(
        api_key=settings.anthropic_api_key.get_secret_value() or None,
        base_url=settings.anthropic_base_url,
        max_retries=settings.anthropic_max_retries,
        timeout=120.0,
    )
    # One for the process: every tick's first request learns whether the shared tool prefix is cached.
    warmup = Warmup()
    try:
        # Each tick's model calls carry its id as the conversation id of their spans (when traced).
        yield lambda p, tid: AnthropicProvider(
            client.with_options(open_telemetry={"conversation_id": tid}),
            settings.anthropic_model,
            settings.llm_max_tokens,
            settings.persona_language,
            price,
            warmup,
        )
    finally:
        await client.close()


@asynccontextmanager
async def open_runtime(settings: Settings, make_provider: ProviderFactory) -> AsyncIterator[Runtime]:
    """Every long-lived resource, opened once and closed in reverse order; ticks play with `make_provider`."""
    # Whoever builds a runtime gets redaction of its secrets in everything it logs, stores or serves.
    for secret in settings.secrets():
        register_secret(secret)
    tracing.configure(settings.otel_exporter_otlp_endpoint, settings.otel_service_name)
    journal = await Journal.open(settings.journal_location, lease_s=settings.runner_lease_s)
    policy = RetryPolicy(attempts=settings.mana_retry_attempts, base_s=settings.mana_retry_base_s)
    try:
        async with shared_client() as auth_http, shared_client() as api_http:
            auth = auth_client(settings, auth_http, policy)
            api = PersonasApi(
                api_http,
                settings.mana_api_url,
                settings.mana_service_key.get_secret_value(),
                policy,
                settings.mana_personas_path,
                DueLimits(settings.due_max_bytes, settings.due_max_rows, settings.persona_prompt_max_chars),
            )
            deps = TickDeps(config=tick_config(settings), auth=auth, journal=journal, make_provider=make_provider)
            outbox_policy = OutboxPolicy(
                retry_base_s=settings.outbox_retry_base_s,
                retry_max_s=settings.outbox_retry_max_s,
                park_after=settings.outbox_park_after,
                parked_retry_s=settings.outbox_parked_retry_s,
            )
            yield Runtime(settings, journal, api, Outbox(journal, api, outbox_policy), deps)
    finally:
        await journal.close()
        tracing.shutdown()


def auth_client(settings: Settings, http: httpx.AsyncClient, policy: RetryPolicy) -> AuthClient:
    """mana-auth for every persona of the process: one limiter for every sign-in, as Mana counts them per client IP."""
    return AuthClient(
        http, settings.mana_auth_url, policy, LoginLimiter(*settings.login_rate), origin=settings.mana_auth_origin
    )


def budget_of(settings: Settings) -> Budget:
    """The daily budgets a tick's claim and model calls are held to, and `status` shows."""
    return Budget(
        fleet_usd=settings.budget_usd_per_day,
        persona_usd=settings.persona_budget_usd_per_day,
        tick_default_usd=settings.budget_tick_default_usd,
    )


def tick_config(settings: Settings) -> TickConfig:
    """What a tick needs from the settings; the daemon and the persona commands build it alike."""
    return TickConfig(
        session=SessionConfig(
            seed_secret=settings.persona_seed_secret.get_secret_value(),
            space_recheck_s=settings.mana_space_recheck_h * 3600,
            vault_init=settings.persona_vault_init,
        ),
        mcp_url=settings.mana_mcp_url,
        max_turns=settings.persona_max_turns,
        timeout_s=settings.persona_tick_timeout_s,
        max_attempts=settings.persona_max_attempts,
        retry_base_s=settings.persona_retry_base_s,
        language=settings.persona_language,
        budget=budget_of(settings),
        policy=settings.tool_policy,
        space_modules=settings.space_modules,
        shared_share=settings.persona_shared_space_share,
        scope_probe=settings.persona_scope_probe,
    )
