"""Traces (issue 16): one trace per tick, the SDKs' spans under the tick span, the traceparent at mana-mcp.

A real OpenTelemetry SDK provider with its in-memory exporter stands in for a collector; the
model is the local Messages API through the real anthropic SDK, the tools the sandbox through
the real mcp SDK, both of which make their own spans.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mana, open_runner
from fake_anthropic import FakeAnthropic
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from procs import ROOT

from runner.dispatch import run_once

TICK_SPAN = "invoke_agent persona"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    # One global provider per process (OpenTelemetry refuses a second): this file's worker owns it.
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    yield memory
    provider.shutdown()


def _root(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> ReadableSpan:
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
    return span


async def test_each_tick_is_one_trace_with_model_and_tool_spans_under_it(
    exporter: InMemorySpanExporter, mana: Mana, tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    exporter.clear()
    settings = mana.settings(
        tmp_path,
        llm_provider="anthropic",
        anthropic_base_url=fake_anthropic.base_url,
        anthropic_api_key="test-anthropic-key",
        persona_concurrency=4,
    )
    async with open_runner(settings) as runtime:
        report = await run_once(runtime)
    assert report.ticks and report.backlog == 0
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    ticks = {s.attributes["persona.tick_id"]: s for s in spans if s.name == TICK_SPAN}
    assert set(ticks) == {t for _, t in report.ticks}
    assert all(s.parent is None for s in ticks.values())  # each tick is the root of its own trace
    assert len({s.context.trace_id for s in ticks.values()}) == len(ticks)
    for tick in ticks.values():
        assert tick.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert tick.attributes["persona.window"] and tick.attributes["mana.space.id"]

    model = [s for s in spans if s.instrumentation_scope and s.instrumentation_scope.name == "com.anthropic.sdk.python"]
    tools = [s for s in spans if s.name.startswith("MCP send tools/call")]
    assert model and tools
    per_tick: dict[str, list[ReadableSpan]] = defaultdict(list)
    for span in model + tools:
        root = _root(span, by_id)
        assert root.name == TICK_SPAN, f"{span.name} is not under a tick span"
        per_tick[str(root.attributes["persona.tick_id"])].append(span)
    # The model calls of a tick carry its id as their conversation id.
    assert all(
        s.attributes.get("gen_ai.conversation.id") == _root(s, by_id).attributes["persona.tick_id"] for s in model
    )

    # What mana-mcp received: each tool call's traceparent names its tick's trace and the SDK's call span.
    received = [r for r in await mana.get("requests") if r["service"] == "mcp" and r["traceparent"]]
    assert len(received) == len(tools)
    sent = {(f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in tools}
    for r in received:
        version, trace_id, span_id, _flags = r["traceparent"].split("-")
        assert version == "00" and (trace_id, span_id) in sent
    tick_traces = {f"{s.context.trace_id:032x}" for s in ticks.values()}
    assert {r["traceparent"].split("-")[1] for r in received} <= tick_traces


def test_without_an_endpoint_no_tracing_sdk_is_loaded() -> None:
    # Unset, tracing must cost nothing measurable: not even the SDK's import in the runner's process.
    probe = (
        "import sys; from runner import runtime, tick, tracing; tracing.configure(None);"
        " print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
