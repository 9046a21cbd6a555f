"""One process per journal, and every unusable journal refused in one line with exit 2."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WEEKDAY
from procs import ROOT, SandboxProcess, runner_env, start_runner, start_sandbox

from runner.journal import Journal, JournalError

SEED = "owner-seed-secret-1234"
KEY = "owner-service-key-5678"


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def bare_env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANA_", "PERSONA_", "RUNNER_", "LLM_"))}
    env.update(
        MANA_API_URL="http://127.0.0.1:9",
        MANA_RETRY_ATTEMPTS="1",
        RUNNER_STATE_PATH=str(state),
        LLM_PROVIDER="scripted",
        LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def one_line_exit_2(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    # Structured log lines (JSON) may come first; the error itself is one plain line.
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


async def test_a_second_process_on_the_same_journal_is_refused_until_the_owner_is_gone(tmp_path: Path) -> None:
    sandbox: SandboxProcess = start_sandbox(tmp_path, seed_secret=SEED, service_key=KEY)
    try:
        sandbox.post("clock", {"now": WEEKDAY})
        state = tmp_path / "runner.db"
        daemon = start_runner(runner_env(sandbox, state), tmp_path / "runner.log")
        try:
            daemon.wait_healthy()
            second = run(["once"], runner_env(sandbox, state))
            line = one_line_exit_2(second, str(state), "in use by another runner process", f"pid {daemon.proc.pid}")
            assert line.startswith("error: journal ")
            # A second daemon (an overlapping restart) is refused the same way, before it binds or recovers.
            again = run(["serve"], runner_env(sandbox, state))
            one_line_exit_2(again, "in use by another runner process")
            # The maintenance view does not own the journal and works beside the daemon.
            assert run(["outbox"], runner_env(sandbox, state)).returncode == 0
        finally:
            daemon.kill()  # SIGKILL: the kernel drops the lock with the process
        done = run(["once"], runner_env(sandbox, state))
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        sandbox.stop()


async def test_the_lock_is_per_journal_and_released_on_close(tmp_path: Path) -> None:
    first = await Journal.open(tmp_path / "a.db")
    other = await Journal.open(tmp_path / "b.db")  # a different journal is not affected
    with pytest.raises(JournalError, match="in use by another runner process"):
        await Journal.open(tmp_path / "a.db")
    await first.close()
    reopened = await Journal.open(tmp_path / "a.db")
    await reopened.close()
    await other.close()


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")


def _foreign_schema(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE ticks (id INTEGER PRIMARY KEY, what TEXT)")


def _corrupt(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _truncated(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE ticks (tick_id TEXT PRIMARY KEY, persona_id TEXT)")
        db.executemany("INSERT INTO ticks VALUES (?, ?)", [(f"t{i}", "x" * 200) for i in range(2000)])
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_corrupt, "file is not a database"),
        (_truncated, "malformed"),
        (_foreign, "not a runner journal"),
        (_foreign_schema, "foreign schema: table ticks has no column"),
        (_directory, "is a directory"),
    ],
)
def test_an_unusable_journal_is_one_line_naming_it_and_exit_2(make: object, problem: str, tmp_path: Path) -> None:
    state = tmp_path / "runner.db"
    make(state)  # type: ignore[operator]
    one_line_exit_2(run(["once"], bare_env(state)), f"journal {state}", problem)


def test_dev_null_as_journal_is_refused(tmp_path: Path) -> None:
    one_line_exit_2(run(["once"], bare_env(Path("/dev/null"))), "journal /dev/null", "not a regular file")


def _as_nobody(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        return subprocess.run(
            [sys.executable, "-m", "runner", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    # As root every file is writable: run the CLI as `nobody` to see what an unprivileged runner sees.
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "runner", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory `nobody` can reach (pytest's own tmp tree is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="runner-ro-"))
    os.chmod(path, 0o777)
    yield path
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777)
    shutil.rmtree(path)


def test_a_read_only_journal_is_refused_in_one_line(open_dir: Path) -> None:
    tmp_path = open_dir  # the lock file can be made; the journal itself cannot be written
    state = tmp_path / "runner.db"
    with sqlite3.connect(state) as db:
        db.execute("CREATE TABLE ready_probe (at REAL)")
    os.chmod(state, 0o444)
    one_line_exit_2(_as_nobody(["once"], bare_env(state, HOME=str(tmp_path))), f"journal {state}", "readonly")


def test_a_journal_in_a_read_only_directory_is_refused_in_one_line(open_dir: Path) -> None:
    tmp_path = open_dir
    folder = tmp_path / "ro"
    folder.mkdir()
    state = folder / "runner.db"
    with sqlite3.connect(state) as db:
        db.execute("CREATE TABLE ready_probe (at REAL)")
    os.chmod(folder, 0o555)
    os.chmod(tmp_path, 0o755)
    one_line_exit_2(_as_nobody(["once"], bare_env(state, HOME=str(tmp_path))), f"journal {state}", "lock file")
