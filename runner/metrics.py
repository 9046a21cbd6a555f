"""Every Prometheus metric the runner exports, defined once. Labels never carry secrets or emails."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

TICKS = Counter("persona_ticks_total", "Ticks by how they ended.", ["outcome"], registry=REGISTRY)
TOOL_CALLS = Counter(
    "persona_tool_calls_total", "MCP tool calls by tool and result.", ["tool", "result"], registry=REGISTRY
)
TOOL_DECISIONS = Counter(
    "persona_tool_decisions_total",
    "Tool-policy decisions per served tool, once per tick: offered or withheld, and by which rule.",
    ["tool", "decision", "rule"],
    registry=REGISTRY,
)
ERRORS = Counter("persona_errors_total", "Failures by the stage they happened in.", ["stage"], registry=REGISTRY)
# At 0 from the start, so rate() and increase() (deploy/'s panels and alerts) see the first one too.
for _outcome in ("ok", "failed", "timeout", "interrupted", "deferred"):
    TICKS.labels(outcome=_outcome)
for _stage in ("login", "spaces"):  # the sign-in stages (session.py), deploy/'s "sign-ins failing"
    ERRORS.labels(stage=_stage)
TICK_DURATION = Histogram(
    "persona_tick_duration_seconds",
    "Wall time of one tick, login to seal.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200),
    registry=REGISTRY,
)
TOOL_LATENCY = Histogram(
    "persona_tool_latency_seconds",
    "Latency of one MCP tool call as the runner saw it.",
    ["tool"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
LLM_TOKENS = Counter("persona_llm_tokens_total", "Model tokens by kind.", ["kind"], registry=REGISTRY)
LLM_COST = Counter(
    "persona_llm_cost_usd_total",
    "What model calls cost, in USD, priced from the price table (MODEL_PRICES_FILE).",
    ["model"],
    registry=REGISTRY,
)
ROWS_DELIVERED = Counter("persona_rows_delivered_total", "Rows the API accepted, by kind.", ["kind"], registry=REGISTRY)
BATCHES_REFUSED = Counter(
    "persona_batches_refused_total",
    "Batches the personas API itself refused (its 400/404 envelope); kept, re-drivable.",
    ["kind"],
    registry=REGISTRY,
)
BATCHES_PARKED = Counter(
    "persona_batches_parked_total",
    "Batches that kept failing and moved to the slow retry.",
    ["kind"],
    registry=REGISTRY,
)
OUTBOX_BATCHES = Gauge(
    "persona_outbox_batches",
    "Batches in the journal by state (pending, parked, refused).",
    ["state"],
    registry=REGISTRY,
)
POLLS = Counter("persona_polls_total", "GET /due polls by result.", ["result"], registry=REGISTRY)
OUTBOX_BACKLOG = Gauge("persona_outbox_backlog", "Batches recorded but not yet accepted by the API.", registry=REGISTRY)
IN_FLIGHT = Gauge("persona_ticks_in_flight", "Ticks running now.", registry=REGISTRY)
PAUSED = Gauge("persona_runner_paused", "1 while new ticks are paused.", registry=REGISTRY)
BUDGET_SPENT = Gauge(
    "persona_budget_spent_usd",
    "Today's (UTC) model spend in USD plus the reservations of ticks still running; scope=fleet is every replica's.",
    ["scope"],
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(
    "persona_budget_limit_usd",
    "The configured daily budget in USD (BUDGET_USD_PER_DAY for scope=fleet); 0 when none is set.",
    ["scope"],
    registry=REGISTRY,
)
BUDGET_EXHAUSTED = Gauge(
    "persona_budget_exhausted", "1 while the fleet's daily budget is spent (until the next UTC day).", registry=REGISTRY
)
MODULE_RATING_RECENT = Gauge(
    "persona_module_rating_recent",
    "Mean rating the personas gave a module in the recent period, from the report's rollup.",
    ["module"],
    registry=REGISTRY,
)
MODULE_RATING_REGRESSION = Gauge(
    "persona_module_rating_regression",
    "1 while the report's rollup flags the module's recent rating as a regression, else 0.",
    ["module"],
    registry=REGISTRY,
)
# Exported from the first scrape, so a dashboard and the budget alerts see "no budget" rather than nothing.
BUDGET_SPENT.labels(scope="fleet").set(0)
BUDGET_LIMIT.labels(scope="fleet").set(0)
BUDGET_EXHAUSTED.set(0)


# A server names its tools and a model invents names: neither may grow the series without end.
# The first MAX_TOOL_LABELS legal names keep their own label for the life of the process.
MAX_TOOL_LABELS = 200
OTHER_TOOL = "__other"
_LABEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_tool_labels: set[str] = set()


def tool_label(name: str) -> str:
    """The label value for a tool name: itself while there is room, else `__other`."""
    if name in _tool_labels:
        return name
    if len(_tool_labels) >= MAX_TOOL_LABELS or not _LABEL_NAME.fullmatch(name):
        return OTHER_TOOL
    _tool_labels.add(name)
    return name
