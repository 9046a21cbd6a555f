"""What a model call costs: the dated price table and the pricing of one response's usage (pure).

Prices are data (`config/model-prices.json`, overridable with MODEL_PRICES_FILE), because
they change without the code changing; the table says which day it was read.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    # Only the type: the SDK takes seconds to import, and the settings check runs without it.
    from anthropic.types import Usage

# The table shipped with the runner; a checkout and an editable install find it beside the package.
DEFAULT_PRICES_FILE = Path(__file__).resolve().parents[1] / "config" / "model-prices.json"
PER_TOKEN = 1e-6  # the table is in USD per million tokens
# A pinned snapshot name (`claude-haiku-4-5-20251001`) is priced as its model.
_SNAPSHOT = re.compile(r"-\d{8}$")


class PriceFileError(Exception):
    """The price file is missing or malformed; the message is one line."""


class Price(BaseModel):
    """One model's row, USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, allow_inf_nan=False)
    cache_write_5m: float = Field(ge=0, allow_inf_nan=False)
    cache_write_1h: float = Field(ge=0, allow_inf_nan=False)
    cache_read: float = Field(ge=0, allow_inf_nan=False)
    output: float = Field(ge=0, allow_inf_nan=False)


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    as_of: date
    source: str = ""
    unit: str = "USD per million tokens"
    models: dict[str, Price] = Field(min_length=1)

    def price(self, model: str) -> Price | None:
        """The row for `model`, a dated snapshot name included; None when the table has none."""
        return self.models.get(model) or self.models.get(_SNAPSHOT.sub("", model))


def load_prices(path: Path) -> PriceTable:
    """The table in `path`, or PriceFileError saying in one line what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PriceFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # invalid JSON or not UTF-8
        raise PriceFileError(f"{path}: not JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict) or data.get("unit", "USD per million tokens") != "USD per million tokens":
        raise PriceFileError(f'{path}: expected an object in "USD per million tokens" with as_of and models')
    try:
        return PriceTable.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise PriceFileError(f"{path}: {where}: {error['msg']}") from None


def cost_usd(usage: Usage, price: Price) -> float:
    """USD for one response. `input_tokens` is the uncached part only; without the per-TTL
    breakdown every cache write is counted at the 5-minute rate, as the API bills it by default."""
    written = usage.cache_creation_input_tokens or 0
    breakdown = usage.cache_creation
    written_1h = breakdown.ephemeral_1h_input_tokens if breakdown is not None else 0
    written_5m = breakdown.ephemeral_5m_input_tokens if breakdown is not None else written
    return PER_TOKEN * (
        usage.input_tokens * price.input
        + written_5m * price.cache_write_5m
        + written_1h * price.cache_write_1h
        + (usage.cache_read_input_tokens or 0) * price.cache_read
        + usage.output_tokens * price.output
    )
