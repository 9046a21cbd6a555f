"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fake_anthropic import FakeAnthropic


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """A local Messages API on a free port; point the SDK at ``fake_anthropic.base_url``."""
    async with FakeAnthropic() as fake:
        yield fake
