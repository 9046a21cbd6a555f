"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fake_anthropic import FakeAnthropic


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """A local Messages API on a free port; point the SDK at ``fake_anthropic.base_url``."""
    async with FakeAnthropic() as fake:
        yield fake


# --- The sandbox in-process, and settings pointing the runner at it ---------------------------

import dataclasses  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
from procs import MCP_SURFACE  # noqa: E402

from runner.daemon import serve  # noqa: E402
from runner.runtime import Runtime, open_runtime, provider_factory  # noqa: E402
from runner.sandbox import Sandbox, SandboxConfig  # noqa: E402
from runner.settings import Settings, load_settings  # noqa: E402
from runner.tick import ProviderFactory  # noqa: E402

# A Wednesday: `weekdays` personas are due, whatever day the suite runs on.
WEEKDAY = "2026-11-25T09:30:00+00:00"
SEED_SECRET = "contract-seed-secret"
SERVICE_KEY = "contract-service-key"


@asynccontextmanager
async def open_runner(settings: Settings, make_provider: ProviderFactory | None = None) -> AsyncIterator[Runtime]:
    """The runtime as `once` and the daemon wire it (the model the settings choose), or with the test's own player."""
    async with provider_factory(settings) as chosen, open_runtime(settings, make_provider or chosen) as runtime:
        yield runtime


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The daemon in this process, as `python -m runner` wires it; yields its URL, drains when the block ends.

    Checks that block (a sync HTTP call to a sandbox process) belong in a thread: here they would stall the daemon.
    """
    stop = asyncio.Event()
    async with open_runner(settings) as runtime:
        task = asyncio.create_task(serve(runtime, stop))
        try:
            while True:  # up when its HTTP face answers, as a probe would see it
                if task.done():
                    task.result()  # raises what stopped it
                    raise RuntimeError("the daemon ended before it was told to stop")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", settings.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                break
            yield f"http://{settings.http_host}:{settings.port}"
        finally:
            stop.set()
            await task


@dataclasses.dataclass
class Mana:
    sandbox: Sandbox
    config: SandboxConfig
    control: httpx.AsyncClient

    async def get(self, what: str) -> Any:
        response = await self.control.get(f"/__sandbox/{what}")
        response.raise_for_status()
        return response.json()

    async def post(self, what: str, body: dict[str, Any]) -> Any:
        response = await self.control.post(f"/__sandbox/{what}", json=body)
        response.raise_for_status()
        return response.json()

    async def add_persona(self, name: str, **options: Any) -> dict[str, Any]:
        spec = {
            "name": name,
            "archetype": "test-archetype",
            "systemPrompt": "Du bist eine Testperson.",
            "moduleMix": {"todo": 0.5, "journal": 0.3, "calendar": 0.2},
            "tickCadence": "daily",
            "options": options,
        }
        return dict(await self.post("personas", spec))

    def settings(self, tmp_path: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            mana_api_url=self.sandbox.api_url,
            mana_auth_url=self.sandbox.auth_url,
            mana_mcp_url=self.sandbox.mcp_url,
            mana_service_key=self.config.service_key,
            persona_seed_secret=self.config.seed_secret,
            llm_provider="scripted",
            runner_env="development",
            node_env=None,
            runner_state_path=tmp_path / "runner.db",
            mana_retry_base_s=0.01,
            # The sandbox limits sign-ins only when asked (test_auth.py proves the pacing); unpaced here.
            mana_login_rate="1000/1s",
            persona_retry_base_s=0.05,
            # A failed batch is due again at once: these tests re-run `once` right after a failure.
            outbox_retry_base_s=0,
            log_format="json",
        )
        values.update(overrides)
        return load_settings(**values)


@asynccontextmanager
async def open_mana(tmp_path: Path, **config: Any) -> AsyncIterator[Mana]:
    """The sandbox on loopback (its config's defaults overridden by `config`), clock on a weekday,
    plus a client for its inspection routes."""
    settings = SandboxConfig(
        **{
            "db_path": str(tmp_path / "sandbox.db"),
            "seed_secret": SEED_SECRET,
            "service_key": SERVICE_KEY,
            "mcp_surface": MCP_SURFACE,
            **config,
        }
    )
    async with Sandbox(settings) as sandbox, httpx.AsyncClient(base_url=sandbox.api_url, timeout=30) as control:
        world = Mana(sandbox, settings, control)
        await world.post("clock", {"now": WEEKDAY})
        yield world


@pytest.fixture
async def mana(tmp_path: Path) -> AsyncIterator[Mana]:
    async with open_mana(tmp_path) as world:
        yield world


# --- A real PostgreSQL server (tests/pg.py), started only when a test asks for it -------------

import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from pg import PgServer, start_postgres  # noqa: E402


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """One server for the whole session. If it cannot start, every test using it errors: never a skip.

    Its base directory is a fresh one in the system temp dir, not pytest's: pytest makes its own
    basetemp owner-only at each session start, which, as root, would lock the server's own account
    (see tests/pg.py) out of a data directory that a concurrent session is still using.
    """
    base_dir = Path(tempfile.mkdtemp(prefix="persona-pg-"))
    try:
        server = start_postgres(base_dir)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def pg_url(pg: PgServer) -> str:
    """A fresh empty database on the session's server, as a ``postgresql+asyncpg://`` URL."""
    return pg.create_database()


# --- Anna and Ben with a family space (tests/family.py), for the shared-space tests -----------

from family import isolated_plan, plan  # noqa: E402, F401
