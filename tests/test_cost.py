"""Pricing one response's usage, and the shipped price table."""

from __future__ import annotations

import pytest
from anthropic.types import Usage

from runner.cost import DEFAULT_PRICES_FILE, cost_usd, load_prices

TABLE = load_prices(DEFAULT_PRICES_FILE)
HAIKU = TABLE.models["claude-haiku-4-5"]


def test_the_shipped_table_holds_the_published_prices_with_its_date() -> None:
    assert str(TABLE.as_of) == "2026-12-01"
    assert (HAIKU.input, HAIKU.cache_write_5m, HAIKU.cache_write_1h, HAIKU.cache_read, HAIKU.output) == (
        1.00,
        1.25,
        2.00,
        0.10,
        5.00,
    )
    sonnet = TABLE.models["claude-sonnet-4-5"]
    assert (sonnet.input, sonnet.cache_read, sonnet.output) == (3.00, 0.30, 15.00)
    assert {m for m in TABLE.models if m.startswith("claude-opus")} == {f"claude-opus-4-{n}" for n in (5, 6, 7, 8)}


def test_a_dated_snapshot_name_is_priced_as_its_model() -> None:
    assert TABLE.price("claude-haiku-4-5-20251001") == HAIKU
    assert TABLE.price("claude-haiku-4-5-preview") is None
    assert TABLE.price("claude-haiku-4") is None


def test_each_kind_of_token_is_priced_at_its_rate() -> None:
    usage = Usage.model_validate(
        {
            "input_tokens": 1_000_000,
            "output_tokens": 1_000_000,
            "cache_creation_input_tokens": 3_000_000,
            "cache_read_input_tokens": 1_000_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1_000_000, "ephemeral_1h_input_tokens": 2_000_000},
        }
    )
    assert cost_usd(usage, HAIKU) == pytest.approx(1.00 + 5.00 + 1.25 + 2 * 2.00 + 0.10)


def test_writes_without_a_breakdown_are_priced_as_five_minute_writes() -> None:
    usage = Usage.model_validate({"input_tokens": 10, "output_tokens": 0, "cache_creation_input_tokens": 1_000_000})
    assert cost_usd(usage, HAIKU) == pytest.approx(1.25 + 10 * 1e-6)
    # Counters the API leaves out (null) cost nothing.
    assert cost_usd(Usage.model_validate({"input_tokens": 0, "output_tokens": 2}), HAIKU) == pytest.approx(1e-5)
