"""The rating turn's shape and how its answer becomes feedback rows."""

from __future__ import annotations

import json
import math
from typing import Any

from runner.persona import PARSE_MODULE, FeedbackRow

RATING_TOOL = "submit_ratings"
MAX_NOTES_CHARS = 500


def rating_schema(modules: list[str]) -> dict[str, Any]:
    """The rating tool's input: a structured answer, not prose to parse. `modules` are the values a
    rating may name (the Anthropic provider lists every module offered, so the schema is the same
    for every persona and stays in the shared cached prefix)."""
    return {
        "type": "object",
        "properties": {
            "ratings": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "module": {"type": "string", "enum": modules},
                        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                        "notes": {"type": "string", "description": "one or two sentences, in character"},
                    },
                    "required": ["module", "rating", "notes"],
                },
            }
        },
        "required": ["ratings"],
    }


def parse_ratings(payload: Any, modules: list[str]) -> list[FeedbackRow] | None:
    """Rows for the modules used this tick; None when the payload is not a rating at all.

    Ratings are clamped to 1..5, modules not used this tick are dropped (noise), and the
    first rating per module wins (the API keeps one per module per tick anyway).
    """
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return None
    items = payload.get("ratings") if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        return None
    rows: dict[str, FeedbackRow] = {}
    understood = False
    for item in items:
        if not isinstance(item, dict):
            continue
        rating = _number(item.get("rating"))
        module = item.get("module")
        if rating is None or not isinstance(module, str):
            continue
        understood = True
        if module in modules and module not in rows:
            notes = item.get("notes")
            text = notes.strip()[:MAX_NOTES_CHARS] if isinstance(notes, str) and notes.strip() else None
            rows[module] = FeedbackRow(module=module, rating=min(5, max(1, round(rating))), notes=text)
    return list(rows.values()) if understood else None


def parse_failure_row(raw: str) -> FeedbackRow:
    """What the reference runner writes when the rating cannot be read, so an operator sees it."""
    return FeedbackRow(module=PARSE_MODULE, rating=3, notes=(raw.strip() or "(empty answer)")[:MAX_NOTES_CHARS])


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
