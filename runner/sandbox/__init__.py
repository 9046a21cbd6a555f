"""A local stand-in for the Mana side: mana-auth, the apps/api personas API and mana-mcp.

Three uvicorn servers on three loopback ports in one asyncio process, sharing one SQLite
file, one clock and one fault table, so tests can drive the runner over real HTTP and then
look at exactly what it wrote (GET /__sandbox/* on the api app).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from runner.persona import DEV_SEED_SECRET
from runner.sandbox.auth import AuthService, SignInLimit
from runner.sandbox.control import control_mount, validate_persona_spec
from runner.sandbox.mcp_server import (
    McpOptions,
    McpState,
    PolicyMode,
    SessionJwt,
    Surface,
    ToolFaults,
    build_mcp_app,
)
from runner.sandbox.personas_api import LEGACY_BASE_PATH, PersonasApi
from runner.sandbox.store import EXTRA_SPACES, Clock, Faults, Store
from runner.sandbox.witness import Witness

DEFAULT_PERSONAS_FILE = Path(__file__).with_name("personas.json")  # package data: works installed, too


@dataclass
class SandboxConfig:
    db_path: str
    seed_secret: str = DEV_SEED_SECRET
    service_key: str = "sandbox-service-key"
    personas_file: Path = field(default_factory=lambda: DEFAULT_PERSONAS_FILE)
    host: str = "127.0.0.1"
    auth_port: int = 0  # 0 = pick a free port
    api_port: int = 0
    mcp_port: int = 0
    jwt_ttl_s: int = 900
    # The MCP gateway: the real surface (mana-tools.json, no annotations) or the annotated one with a bait tool.
    mcp_surface: Surface = "real"
    policy_mode: PolicyMode = "log-only"  # POLICY_MODE of services/mana-mcp, same default
    failing_tools: frozenset[str] = frozenset()  # fail in the handler on every call
    session_jwt: SessionJwt = "opening"  # handlers use the JWT that opened the session, as the real gateway
    # The real space list refuses Bearer today; True models a future Mana that takes it.
    spaces_accept_bearer: bool = False
    signin_limit: SignInLimit = field(default_factory=SignInLimit)


class _Server(uvicorn.Server):
    """uvicorn without its signal capture: three servers share one process, the owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def seed_catalog(store: Store, personas_file: Path, clock: Clock) -> int:
    """Create the demo catalog once; a DB that already has personas is left as it is."""
    if store.persona_count() > 0:
        return 0
    specs: list[Any] = json.loads(personas_file.read_text(encoding="utf-8"))
    for index, spec in enumerate(specs):
        if (problem := validate_persona_spec(spec)) is not None:
            raise ValueError(f"{personas_file}: persona {index}: {problem}")
        # Every third has a team space, every third a family space listed before the personal one.
        store.create_persona(spec, spec.get("extraSpace", EXTRA_SPACES[index % 3]), clock.now())
    return len(specs)


class Sandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.auth_url = self.api_url = self.mcp_url = ""
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Store | None = None

    async def __aenter__(self) -> Sandbox:
        cfg = self.config
        store = self._store = Store(cfg.db_path)
        clock, faults = Clock(), Faults()
        seed_catalog(store, cfg.personas_file, clock)
        auth = AuthService(
            store,
            clock,
            faults,
            cfg.seed_secret,
            cfg.jwt_ttl_s,
            spaces_accept_bearer=cfg.spaces_accept_bearer,
            signin_limit=cfg.signin_limit,
        )
        personas = PersonasApi(store, clock, faults, cfg.service_key)
        auth_app = Witness(auth.app([personas.mount(LEGACY_BASE_PATH)]), "auth", store, auth)
        options = McpOptions(cfg.mcp_surface, cfg.policy_mode, frozenset(cfg.failing_tools), cfg.session_jwt)
        mcp = McpState(options, ToolFaults(options.failing_tools))
        api_app = Witness(Starlette(routes=[personas.mount(), control_mount(store, auth, mcp)]), "api", store, auth)
        mcp_app = build_mcp_app(store, clock, faults, auth, cfg.host, mcp)
        try:
            self.auth_url = await self._serve(auth_app, cfg.auth_port)
            auth.issuer = self.auth_url  # the JWT's `iss` is mana-auth's base URL
            self.api_url = await self._serve(api_app, cfg.api_port)
            self.mcp_url = await self._serve(mcp_app, cfg.mcp_port)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _serve(self, app: ASGIApp, port: int) -> str:
        """Bind the socket ourselves so port 0 works and the real port is known before serving."""
        sock = socket.socket(
            socket.AF_INET6 if ":" in self.config.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (else ~40 ms per keep-alive request)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, port))
        except OSError:
            sock.close()
            raise
        real_port = sock.getsockname()[1]
        server = _Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=3)
        )
        self._servers.append(server)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"sandbox:{real_port}")
        self._tasks.append(task)
        while not server.started:  # lifespan (the MCP session manager) is up once this flips
            if task.done():
                task.result()  # surfaces the startup error
                raise RuntimeError(f"sandbox server on port {real_port} stopped during startup")
            await asyncio.sleep(0.01)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{real_port}"

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()
        self._tasks.clear()
        if self._store is not None:
            self._store.close()
            self._store = None


__all__ = ["Sandbox", "SandboxConfig", "SignInLimit"]
