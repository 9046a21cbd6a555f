"""Command line: serve (default) | once | demo | login EMAIL | tools EMAIL | password EMAIL | outbox [--retry]
| spaces [--apply] | probe [EMAIL] | report [--since 7d] [--json] [--html FILE] | status | sandbox.

Exit codes: 0 done, 1 the run could not be made (Mana unreachable, login refused),
2 bad configuration or usage, including a journal that cannot be used (corrupt, not a
journal, unwritable, or owned by another running process). Errors are one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import log
from runner.mana.errors import ManaError
from runner.persona import DEV_SEED_SECRET, derive_password
from runner.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from rich.console import Console

    from runner.journal import Journal
    from runner.tick import TickDeps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner", description="Mana persona runner")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run as a daemon (default)")
    sub.add_parser("once", help="one poll: tick every due persona, deliver, exit")
    sub.add_parser("demo", help="start the local sandbox and run one round for every persona")
    login = sub.add_parser("login", help="prove login and personal-space resolution for EMAIL")
    login.add_argument("email")
    tools = sub.add_parser("tools", help="list the tools mana-mcp serves EMAIL and what the tool policy decides")
    tools.add_argument("email")
    password = sub.add_parser("password", help="print the derived password for EMAIL")
    password.add_argument("email")
    outbox = sub.add_parser("outbox", help="batches by delivery state; --retry re-sends refused and parked ones")
    outbox.add_argument("--retry", action="store_true", help="put refused and parked batches back in the queue")
    spaces = sub.add_parser("spaces", help="compare PERSONA_SPACES_FILE with mana-auth; --apply makes it so")
    spaces.add_argument(
        "--apply", action="store_true", help="create, invite and accept what is missing (never deletes)"
    )
    probe = sub.add_parser("probe", help="a scope probe now for EMAIL (default: every persona of PERSONA_SPACES_FILE)")
    probe.add_argument("email", nargs="?")
    report = sub.add_parser("report", help="what the personas found: findings, rating trends, tools, coverage")
    report.add_argument("--since", default="7d", help="the period: the last N days (7d) or weeks (2w), today included")
    report.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    report.add_argument("--html", metavar="FILE", help="also write a self-contained page with charts to FILE")
    sub.add_parser("status", help="what the fleet is doing now: replicas' polls, ticks in flight, outbox, today")
    sub.add_parser("sandbox", help="serve the local Mana stand-in on 3001/3060/3069", add_help=False)
    args, rest = parser.parse_known_args(argv)
    command = args.command or "serve"
    if command == "sandbox":
        from runner.sandbox.__main__ import main as sandbox_main

        return sandbox_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    try:
        if command == "demo":
            return _run(_demo())
        settings = load_settings()
    except SettingsError as exc:
        _error(exc)
        return 2
    log.configure(settings.log_format, settings.log_level)
    for secret in settings.secrets():
        log.register_secret(secret)
    if command == "password":
        print(derive_password(settings.persona_seed_secret.get_secret_value(), args.email))
        return 0
    if command == "login":
        return _run(_login(settings, args.email))
    if command == "tools":
        return _run(_tools(settings, args.email))
    if command == "once":
        return _run(_once(settings))
    if command == "outbox":
        return _run(_outbox(settings, retry=args.retry))
    if command == "spaces":
        return _run(_spaces(settings, apply=args.apply))
    if command == "probe":
        return _run(_probe(settings, args.email))
    if command == "status":
        return _run(_status(settings))
    if command == "report":
        return _run(_report(settings, args.since, as_json=args.json, html=args.html))
    return _run(_serve(settings))


def _run(coro: Any) -> int:
    # Imported by the commands that use it: SQLAlchemy is most of the start-up of `--help` or a bad setting.
    from runner.journal import JournalError

    try:
        return int(asyncio.run(coro))
    except KeyboardInterrupt:
        return 130
    except JournalError as exc:
        _error(exc)
        return 2
    except (ManaError, _Fatal) as exc:
        _error(exc)
        return 1
    except _Usage as exc:
        _error(exc)
        return 2


def _error(exc: Exception) -> None:
    # One write: print() writes the text and the newline apart, and a log line from a worker thread
    # (aiosqlite's, at LOG_LEVEL=debug) could land between them and glue itself to the error line.
    sys.stderr.write(f"error: {exc}\n")


class _Fatal(Exception):
    """A run that cannot go on, reported as one line."""


class _Usage(Exception):
    """Bad input to a command (an unreadable option, a file that cannot be written or used), found
    before anything changed: one line, exit 2."""


async def _serve(settings: Settings) -> int:
    from runner.daemon import serve
    from runner.dispatch import Dispatcher
    from runner.runtime import open_runtime, provider_factory

    try:
        async with provider_factory(settings) as make_provider, open_runtime(settings, make_provider) as runtime:
            dispatcher = Dispatcher(runtime)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            # TERM and INT drain; no configuration reload exists, so a HUP (a closed terminal, a
            # supervisor's habit) drains too. USR1/USR2 pause and resume polling.
            for stopping in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(stopping, stop.set)
            loop.add_signal_handler(signal.SIGUSR1, dispatcher.set_paused, True)
            loop.add_signal_handler(signal.SIGUSR2, dispatcher.set_paused, False)
            await serve(runtime, stop, dispatcher)
    except OSError as exc:
        raise _Fatal(f"cannot start: {exc.strerror or exc}") from None
    return 0


async def _once(settings: Settings) -> int:
    from runner.dispatch import PollError, run_once
    from runner.runtime import open_runtime, provider_factory

    async with provider_factory(settings) as make_provider, open_runtime(settings, make_provider) as runtime:
        try:
            report = await run_once(runtime)
        except PollError as exc:
            raise _Fatal(f"cannot poll the personas API: {exc}") from None
    if report.backlog:
        log.get_logger().warning("rows not yet accepted stay in the journal", batches=report.backlog)
    return 0


async def _outbox(settings: Settings, *, retry: bool) -> int:
    """The operator's view of delivery, and the re-drive of what the API refused or kept failing.

    It does not own the journal (no lock): it reads counts and flips batch states in one short
    transaction each, which is safe beside a running daemon; the owner sends the re-queued
    batches at its next sweep (the daemon within one poll interval, or the next `once`).
    """
    from runner.journal import Journal

    journal = await Journal.open(settings.journal_location, own=False)
    try:
        if retry:
            requeued = await journal.requeue()
            print(f"re-queued {requeued} batches; the runner sends them at its next sweep")
        counts = await journal.batch_counts()
        print(" ".join(f"{state}={n}" for state, n in counts.items()))
        for batch in await journal.problem_batches():
            print(
                f"  batch {batch.id} {batch.state} {batch.kind} rows={batch.rows} attempts={batch.attempts} "
                f"tick={batch.tick_id}: {batch.last_error or ''}"
            )
    finally:
        await journal.close()
    return 0


async def _report(settings: Settings, since: str, *, as_json: bool, html: str | None) -> int:
    """What the personas found, read from the journal without writing to it (safe beside any number of replicas)."""
    import json

    from runner import report
    from runner.journal import Journal

    try:
        period = report.period_of(report.parse_since(since), datetime.now(UTC).date())
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    thresholds = report.Thresholds.of(settings)
    journal = await Journal.open(settings.journal_location, read_only=True)
    try:
        found = await report.build(journal, period, thresholds)
    finally:
        await journal.close()
    if html is not None:
        from runner.report_page import page

        try:
            Path(html).write_text(page(found), encoding="utf-8")
        except OSError as exc:
            raise _Usage(f"--html {html}: cannot write: {exc.strerror or exc}") from None
    if as_json:
        print(json.dumps(found, ensure_ascii=False, indent=2))
    else:
        report.render(found, _console())
    return 0


def _console() -> Console:
    from rich.console import Console

    # Off a terminal (a pipe, a file) rich would cut the tables to 80 columns: ids and causes must survive.
    return Console(width=None if sys.stdout.isatty() else 240)


async def _status(settings: Settings) -> int:
    """The fleet now, read from the journal (every replica), without writing to it."""
    from runner import report
    from runner.journal import Journal
    from runner.runtime import budget_of

    journal = await Journal.open(settings.journal_location, read_only=True)
    try:
        state = await report.status(journal, datetime.now(UTC).date(), budget_of(settings))
    finally:
        await journal.close()
    # A replica polls every TICK_INTERVAL_MS; three missed polls (and a minute's grace) mean it is gone.
    recent = 3 * settings.tick_interval_ms / 1000 + 60
    state["replicas"] = [r for r in state["replicas"] if r["polled_s_ago"] <= recent]
    if not state["replicas"]:
        print(f"no runner has polled this journal in the last {recent:.0f} s")
        return 0
    report.render_status(state, _console())
    return 0


@asynccontextmanager
async def _as_persona(settings: Settings) -> AsyncIterator[TickDeps]:
    """What the persona commands need: the tick's rules, mana-auth, and the journal's login blocks.

    The journal is opened without owning it (it may belong to a running daemon): these
    commands only read the login blocks and record a refused password, so a persona refused
    before is never tried again (Mana's lockout).
    """
    from runner.journal import Journal
    from runner.mana.errors import RetryPolicy
    from runner.mana.http import shared_client
    from runner.runtime import auth_client, tick_config
    from runner.tick import TickDeps

    journal = await Journal.open(settings.journal_location, own=False)
    try:
        async with shared_client() as http:
            auth = auth_client(settings, http, RetryPolicy(attempts=settings.mana_retry_attempts))
            yield TickDeps(tick_config(settings), auth, journal, _no_player)
    finally:
        await journal.close()


async def _spaces(settings: Settings, *, apply: bool) -> int:
    """The declared spaces against mana-auth: what remains to do, and with --apply, doing it.

    Every declared persona signs in (its own cookie) before anything is looked at or changed: a
    member no persona has is bad input, found while mana-auth is still untouched.
    """
    from runner.mana.auth import is_wrong_password
    from runner.mana.errors import ApiError
    from runner.session import LoginBlocked, PersonaSession
    from runner.spaces import SpacesFileError, load_spaces, remaining, survey
    from runner.spaces import apply as make_so

    try:
        declared = load_spaces(settings.persona_spaces_file, settings.space_modules)
    except SpacesFileError as exc:
        raise _Usage(str(exc)) from None
    async with _as_persona(settings) as deps:
        sessions: dict[str, PersonaSession] = {}

        async def session_of(email: str) -> PersonaSession:
            if email not in sessions:
                sessions[email] = PersonaSession(deps.config.session, deps.auth, deps.journal, email)
            return sessions[email]

        for email in dict.fromkeys(e for space in declared for e in space.members):
            try:
                await (await session_of(email)).spaces()
            except (ApiError, LoginBlocked) as exc:
                if isinstance(exc, LoginBlocked) or is_wrong_password(exc):
                    raise _Usage(
                        f"{settings.persona_spaces_file}: {email}: no persona signs in as it ({exc})"
                    ) from None
                raise
        found = [await survey(space, session_of) for space in declared]
        for item in found:
            for note in item.notes:
                print(f"note: {note}")
        steps = [step for item in found for step in remaining(item)]
        if not apply:
            for step in steps:
                print(f"to do: {step}")
            print(f"{len(declared)} spaces declared, {len(steps)} steps to do" + ("" if steps else ": in place"))
            return 0
        for item in found:
            try:
                await make_so(item, session_of, lambda line: print(f"done: {line}", flush=True))
            except ManaError as exc:
                raise _Fatal(
                    f"spaces: {item.space.slug}: {exc}; `python -m runner spaces` shows what remains"
                ) from None
        print(f"{len(declared)} spaces declared, {len(steps)} steps done")
    return 0


async def _probe(settings: Settings, email: str | None) -> int:
    """Scope probes now, each in a tick of its own; prints one verdict per persona and delivers the rows.

    It owns the journal like `once` (a SQLite journal a daemon holds is refused: exit 2).
    """
    from runner.runtime import open_runtime
    from runner.spaces import SpacesFileError, load_spaces
    from runner.tick import probe_now

    if email is not None:
        emails = [email]
    else:
        try:
            declared = load_spaces(settings.persona_spaces_file, settings.space_modules)
        except SpacesFileError as exc:
            raise _Usage(str(exc)) from None
        emails = list(dict.fromkeys(e for space in declared for e in space.members))
    async with open_runtime(settings, _no_player) as runtime:
        for who in emails:
            verdict = await probe_now(runtime.tick_deps, who)
            if verdict is None:
                print(f"{who}: no shared space, nothing to probe")
            else:
                print(f"{who}: {'ok' if verdict.ok else verdict.message} ({verdict.calls} calls)")
        backlog = await runtime.outbox.flush()
    if backlog:
        log.get_logger().warning("rows not yet accepted stay in the journal", batches=backlog)
    return 0


def _no_player(persona: Any, tick_id: str) -> Any:
    raise RuntimeError("the persona commands play no day")


async def _login(settings: Settings, email: str) -> int:
    from runner.tick import sign_in

    async with _as_persona(settings) as deps:
        session = await sign_in(deps, email)
    # How the space was found tells the operator whether the space list takes Bearer on this Mana.
    space = session.space
    print(f"ok: {email} is user {session.user_id}, personal space {space.id} (space list via {space.via})")
    return 0


async def _tools(settings: Settings, email: str) -> int:
    """Log in as EMAIL (unless its password was refused before), open MCP, print each tool's decision."""
    from runner.tick import served_tools

    async with _as_persona(settings) as deps:
        decisions = await served_tools(deps, email)
    offered = sum(1 for d in decisions if d.offered)
    rows = [(d.name, "offered" if d.offered else "withheld", d.rule, d.reason.split(": ", 1)[-1]) for d in decisions]
    print(_render(("tool", "decision", "rule", "reason"), rows))
    print(f"{len(decisions)} served, {offered} offered, {len(decisions) - offered} withheld")
    return 0


async def _demo() -> int:
    """The README's first command: a sandbox on loopback, one round for every persona, a table.

    On a terminal the round is a live view (personas done, the stage of each running tick), and a
    one-screen report follows the table; its journal is kept so that `report` can show more. Off a
    terminal (CI, a pipe) it logs the round as lines and prints the table alone.
    """
    from runner.dispatch import run_once
    from runner.runtime import open_runtime, provider_factory
    from runner.sandbox import Sandbox, SandboxConfig

    use_claude = bool(os.environ.get("ANTHROPIC_API_KEY"))
    interactive = sys.stdout.isatty()
    with tempfile.TemporaryDirectory(prefix="persona-demo-") as tmp:
        kept = Path(tempfile.mkdtemp(prefix="persona-demo-journal-")) if interactive else Path(tmp)
        config = SandboxConfig(db_path=str(Path(tmp) / "sandbox.db"))
        async with Sandbox(config) as sandbox:
            settings = load_settings(
                mana_api_url=sandbox.api_url,
                mana_auth_url=sandbox.auth_url,
                mana_mcp_url=sandbox.mcp_url,
                mana_service_key=config.service_key,
                persona_seed_secret=DEV_SEED_SECRET,
                llm_provider="anthropic" if use_claude else "scripted",
                runner_env="development",
                node_env=None,
                runner_state_path=kept / "runner.db",
                log_format="console",
                # The live view is the progress on a terminal; only what goes wrong is logged over it.
                log_level="warning" if interactive else "info",
                mana_retry_base_s=0.2,
                # The local sandbox, like a development Mana, does not limit sign-ins: no need to pace them.
                mana_login_rate="100/1s",
            )
            log.configure(settings.log_format, settings.log_level)
            for secret in settings.secrets():
                log.register_secret(secret)
            print(f"sandbox up: auth {sandbox.auth_url}, api {sandbox.api_url}, mcp {sandbox.mcp_url}", file=sys.stderr)
            day = await _weekday_clock(sandbox.api_url)
            print(
                f"provider: {'Claude (' + settings.anthropic_model + ')' if use_claude else 'scripted (offline)'}",
                file=sys.stderr,
            )
            async with provider_factory(settings) as make, open_runtime(settings, make) as runtime:
                round_ = asyncio.create_task(run_once(runtime))
                if interactive:
                    await _live(runtime.journal, round_, sandbox.api_url, day)
                done = await round_
                summaries = await runtime.journal.summaries([t for _, t in done.ticks])
                print(_table([(p.email, summaries.get(t)) for p, t in done.ticks]))
                if interactive:
                    await _summary(runtime.journal, day, settings)
            if done.backlog:
                print(f"{done.backlog} batches were not delivered", file=sys.stderr)
                return 1
    return 0


async def _live(journal: Journal, round_: asyncio.Task[Any], api_url: str, day: date) -> None:
    """Personas done out of the cast, and each running tick's stage, read from the journal as the round goes."""
    import httpx
    from rich.live import Live

    from runner import report

    async with httpx.AsyncClient() as http:
        cast = [p for p in (await http.get(f"{api_url}/__sandbox/personas")).json() if not p["deleted"]]
    emails = {p["userId"]: p["email"] for p in cast}
    with Live(console=_console(), refresh_per_second=8, transient=True) as live:
        while not round_.done():
            live.update(report.progress(await report.status(journal, day), len(cast), emails))
            await asyncio.wait({round_}, timeout=0.25)


async def _summary(journal: Journal, day: date, settings: Settings) -> None:
    """One screen of what the round found, and the command that shows all of it."""
    from runner import report

    found = await report.build(journal, report.period_of(1, day), report.Thresholds.of(settings))
    report.summary(found, _console())
    print(f"see more: RUNNER_STATE_PATH={settings.runner_state_path} python -m runner report --html report.html")


async def _weekday_clock(api_url: str) -> date:
    """`weekdays` personas rest on weekends; the demo moves the sandbox's clock to Monday so all play.

    Returns the day the personas play (their ticks' window).
    """
    import httpx

    now = datetime.now(UTC)
    if now.weekday() < 5:
        return now.date()
    monday = now + timedelta(days=7 - now.weekday())
    async with httpx.AsyncClient() as http:
        (await http.post(f"{api_url}/__sandbox/clock", json={"now": monday.isoformat()})).raise_for_status()
    print(f"weekend: the sandbox's clock is set to {monday.date()} so weekday personas play too", file=sys.stderr)
    return monday.date()


def _table(rows: list[tuple[str, Any]]) -> str:
    lines: list[tuple[str, ...]] = []
    for email, summary in rows:
        if summary is None:
            lines.append((email, "not run", "", "", ""))
            continue
        ratings = ", ".join(f"{m} {r}" for m, r in summary.ratings) or "-"
        lines.append((email, summary.outcome, str(summary.ok), str(summary.errors), ratings))
    return _render(("persona", "outcome", "tools ok", "tools error", "ratings"), lines)


def _render(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


if __name__ == "__main__":
    sys.exit(main())
