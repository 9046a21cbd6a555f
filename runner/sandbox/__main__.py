"""`python -m runner.sandbox --db PATH`: serve the Mana stand-in until SIGTERM/SIGINT.

Once all three servers listen, prints one JSON line {"auth_url","api_url","mcp_url"} to stdout
(tests start this as a subprocess and read that line), then stays quiet on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from runner.persona import DEV_SEED_SECRET
from runner.sandbox import Sandbox, SandboxConfig, SignInLimit
from runner.sandbox.mana_tools import load_tools
from runner.sandbox.mcp_server import POLICY_MODES, SURFACES
from runner.settings import parse_rate


def _parse(argv: list[str] | None) -> SandboxConfig:
    parser = argparse.ArgumentParser(prog="python -m runner.sandbox", description=__doc__)
    parser.add_argument("--db", required=True, help="SQLite file (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--auth-port", type=int, default=3001)
    parser.add_argument("--api-port", type=int, default=3060)
    parser.add_argument("--mcp-port", type=int, default=3069)
    parser.add_argument("--seed-secret", default=os.environ.get("PERSONA_SEED_SECRET") or DEV_SEED_SECRET)
    parser.add_argument("--service-key", default=os.environ.get("MANA_SERVICE_KEY") or "sandbox-service-key")
    parser.add_argument("--jwt-ttl-s", type=int, default=900)
    parser.add_argument(
        "--mcp-surface",
        choices=SURFACES,
        default="real",
        help="real: the gateway's tools as served (no annotations); annotated: with annotations and a bait tool",
    )
    parser.add_argument("--policy-mode", choices=POLICY_MODES, default=os.environ.get("POLICY_MODE") or "log-only")
    parser.add_argument("--failing-tools", default="", help="comma-separated tool names whose handler always fails")
    parser.add_argument(
        "--spaces-accept-bearer",
        action="store_true",
        help="let the space list take Bearer JWTs (a future Mana); by default only the session cookie, as today",
    )
    parser.add_argument(
        "--signin-rate-limit",
        choices=("auto", "on", "off"),
        default="auto",
        help="Better Auth's sign-in limit: auto = only requests with X-Forwarded-For (production behind a proxy)",
    )
    parser.add_argument("--signin-rate", default="3/10s", help="sign-ins per window and client IP, e.g. 3/10s")
    parser.add_argument("--personas-file", type=Path, default=None, help="the cast to seed a new database with (JSON)")
    args = parser.parse_args(argv)
    failing = frozenset(t.strip() for t in args.failing_tools.split(",") if t.strip())
    known = {t["name"] for t in load_tools()[0]}
    if unknown := sorted(failing - known):
        parser.error(f"--failing-tools: unknown tool(s): {', '.join(unknown)}")
    if args.policy_mode not in POLICY_MODES:
        parser.error("POLICY_MODE must be off|log-only|enforce")
    try:
        count, window = parse_rate(args.signin_rate)
    except ValueError as exc:
        parser.error(f"--signin-rate: {exc}")
    return SandboxConfig(
        db_path=args.db,
        seed_secret=args.seed_secret,
        service_key=args.service_key,
        host=args.host,
        auth_port=args.auth_port,
        api_port=args.api_port,
        mcp_port=args.mcp_port,
        jwt_ttl_s=args.jwt_ttl_s,
        mcp_surface=args.mcp_surface,
        policy_mode=args.policy_mode,
        failing_tools=failing,
        spaces_accept_bearer=args.spaces_accept_bearer,
        signin_limit=SignInLimit(args.signin_rate_limit, count, window),
        **({"personas_file": args.personas_file} if args.personas_file is not None else {}),
    )


async def _run(config: SandboxConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Sandbox(config) as sandbox:
        urls = {"auth_url": sandbox.auth_url, "api_url": sandbox.api_url, "mcp_url": sandbox.mcp_url}
        print(json.dumps(urls), flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    config = _parse(argv)
    try:
        asyncio.run(_run(config))
    except OSError as exc:  # typically a port already in use
        print(f"sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
