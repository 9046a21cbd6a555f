"""Traces: one per tick when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; nothing at all when it is not.

The tick span (`invoke_agent`, GenAI semantic conventions) is the only span the runner makes.
Under it sit the SDKs' own spans, which both make through the global tracer provider: the
anthropic SDK's span per Messages call and the mcp SDK's `MCP send tools/call …` span per tool
call, whose W3C `traceparent` the mcp SDK puts into the request's `params._meta`, so mana-mcp can
continue the trace. A second instrumentation of either would only duplicate those spans.

Unset, no SDK is imported and no provider is installed: OpenTelemetry's API then hands out
non-recording spans, which cost a function call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from runner.log import get_logger
from runner.persona import DuePersona

log = get_logger("runner.tracing")
_tracer = trace.get_tracer("persona-runner")
_installed = False  # a process has one global tracer provider; OpenTelemetry refuses a second


def configure(endpoint: str | None, service_name: str = "persona-runner") -> None:
    """Install the SDK's provider with an OTLP/HTTP exporter to `endpoint`, once per process."""
    global _installed
    if not endpoint or _installed:
        return
    # Imported only here: unset, tracing must cost nothing, not even the SDK's import.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    # The generic variable names the collector's origin; the traces path is appended, as the spec says.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
    trace.set_tracer_provider(provider)
    _installed = True
    log.info("traces exported over OTLP/HTTP", endpoint=endpoint)


def shutdown() -> None:
    """Flush what is buffered (a drained daemon's last ticks) before the process ends."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "shutdown", None)
    if _installed and callable(flush):
        flush()


@contextmanager
def tick_span(persona: DuePersona, tick_id: str, window: str) -> Iterator[Span]:
    """The tick's span: the root of its trace, current while the tick runs (so the SDKs' spans nest under it)."""
    attributes = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "persona",
        "gen_ai.conversation.id": tick_id,
        "persona.id": persona.user_id,
        "persona.archetype": persona.archetype,
        "persona.tick_id": tick_id,
        "persona.window": window,
    }
    # A new trace per tick, whatever was current (a poll's context must not make ticks one trace).
    with _tracer.start_as_current_span(
        "invoke_agent persona",
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        context=trace.set_span_in_context(trace.INVALID_SPAN),
    ) as span:
        yield span


def ended(span: Span, outcome: str) -> None:
    """The tick's outcome on its span; anything but ok is an error."""
    span.set_attribute("persona.outcome", outcome)
    if outcome != "ok":
        span.set_status(Status(StatusCode.ERROR, outcome))
