"""The journal's tables, and the numbered migrations that build them, for SQLite and PostgreSQL.

One definition serves both the queries (runner/journal/) and the migrations: every table and
column says in `info["since"]` which schema version added it. Migration N creates the tables,
columns and indexes marked `since=N`; so the DDL of a step is derived from the same objects
the queries use, and both dialects get their own types (REAL/DOUBLE, BLOB/BYTEA, SERIAL).

Steps are applied at start-up in one transaction, recorded in `schema_migrations`, and never
changed once released: a change to the schema is a new step. Several replicas starting at once
on PostgreSQL queue on a transaction-scoped advisory lock, so exactly one applies each step and
the others find it done (PostgreSQL's DDL is transactional). A journal written by a newer runner
(a version above the last step) is refused, because this code would misread it.

Version 1 is the schema of the last release before versioning. Applied to such a journal (tables
present, no `schema_migrations`), it only adds what that release's stopgap added at open.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

_meta = sa.MetaData()
# Version of each table and column: the step that added it.
_V1 = {"since": 1}
_V2 = {"since": 2}
_V3 = {"since": 3}
_V4 = {"since": 4}
_V5 = {"since": 5}
_V6 = {"since": 6}

ticks = sa.Table(
    "ticks",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("persona_id", sa.String(255), nullable=False, index=True),
    sa.Column("window", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # running | retry | sealed
    sa.Column("outcome", sa.String(32)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # The replica running the tick and until when its lease holds (database clock, epoch seconds).
    sa.Column("owner", sa.String(128), info=_V2),
    sa.Column("lease_until", sa.Float, info=_V2),
    # The last step the tick journaled (login, mcp, play, seal), for `python -m runner status`.
    sa.Column("stage", sa.String(16), info=_V4),
    # USD this tick reserved of the fleet's daily budget at claim (and extensions since); 0 when none.
    sa.Column("reserved_usd", sa.Float, info=_V6),
    info=_V1,
)
# A claim is the insert of this row: the database, not a process, says who got the window.
sa.Index("ux_ticks_persona_window", ticks.c.persona_id, ticks.c.window, unique=True, info=_V2)
sa.Index("ix_ticks_state_lease", ticks.c.state, ticks.c.lease_until, info=_V2)
calls = sa.Table(
    "calls",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("tool_name", sa.String(255), nullable=False),
    sa.Column("input_hash", sa.String(16)),
    sa.Column("status", sa.String(16), nullable=False),  # pending | ok | error
    sa.Column("error_message", sa.Text),
    sa.Column("latency_ms", sa.Integer),
    info=_V1,
)
ratings = sa.Table(
    "ratings",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("module", sa.String(255), primary_key=True),
    sa.Column("rating", sa.Integer, nullable=False),
    sa.Column("notes", sa.Text),
    info=_V1,
)
# A persona whose password was refused is not tried again with the same secret: every
# INVALID_CREDENTIALS counts toward Mana's lockout, and a wrong secret would otherwise
# spend one attempt per window until the account locks. A new secret lifts the block.
login_blocks = sa.Table(
    "login_blocks",
    _meta,
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("secret_fingerprint", sa.String(32), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # /diag/login knows only an email; it must see (and record) the same blocks as ticks.
    sa.Column("email", sa.String(320)),
    info=_V1,
)
# A persona's personal space id never changes (contract §3): remembering it saves the space
# lookup, which on the real mana-auth costs a second, rate-limited sign-in per tick.
personal_spaces = sa.Table(
    "personal_spaces",
    _meta,
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("space_id", sa.String(255), nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=False),
    info=_V1,
)
# A persona known to have an encryption vault (contract §9): found, or created by the runner at
# first contact. A vault is never removed, so once known it is not asked about again.
persona_vaults = sa.Table(
    "persona_vaults",
    _meta,
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("how", sa.String(16), nullable=False),  # found | created
    sa.Column("at", sa.Float, nullable=False),
    info=_V3,
)
# The space each tick played in, and how it was known (journal | bearer | cookie; list: a shared space).
tick_spaces = sa.Table(
    "tick_spaces",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("persona_id", sa.String(255), nullable=False),
    sa.Column("space_id", sa.String(255), nullable=False),
    sa.Column("via", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    # personal | family | team | …: which kind of space the tick played in (NULL: before issue 15).
    sa.Column("space_type", sa.String(16), info=_V5),
    info=_V1,
)
batches = sa.Table(
    "batches",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tick_id", sa.String(64), nullable=False, index=True),
    sa.Column("persona_id", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # actions | feedback
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),  # see journal.BatchState
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
    # Per-batch backoff: a failing batch waits on its own, the others go on.
    sa.Column("next_attempt_at", sa.Float),
    # The replica sending the batch and until when: one sender per batch across replicas.
    sa.Column("lease_owner", sa.String(128), info=_V2),
    sa.Column("lease_until", sa.Float, info=_V2),
    info=_V1,
)
# --- The report's read model (step 4): written in the transaction that seals a tick, never pruned ---
# Latency is kept as counts in fixed log-scale buckets (runner/journal/rollup.py owns the edges), so
# rows of any days, personas and replicas merge by plain SUM and p50/p95 come out of the sums.
LATENCY_BUCKETS = 32
# Error cause classes, one counter column each (runner/journal/rollup.py decides the class).
CAUSES: tuple[str, ...] = ("schema", "handler", "policy", "session", "transport", "model", "scope")
# One row per day (the tick's window), persona, module and tool: a year of a 1,000-persona fleet is
# about 365 x 1,000 x 8 rows. `tool` is '' on a module's own row (its ticks and ratings); the tick
# itself is module '__tick' (its failures before any tool under tool '__tick:<stage>').
rollup = sa.Table(
    "rollup",
    _meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("module", sa.String(255), primary_key=True),
    sa.Column("tool", sa.String(255), primary_key=True),
    sa.Column("ticks", sa.Integer, nullable=False),
    sa.Column("calls", sa.Integer, nullable=False),
    sa.Column("errors", sa.Integer, nullable=False),
    *(sa.Column(f"err_{cause}", sa.Integer, nullable=False) for cause in CAUSES),
    *(sa.Column(f"lat_{k:02d}", sa.Integer, nullable=False) for k in range(LATENCY_BUCKETS)),
    sa.Column("rating_sum", sa.Integer, nullable=False),
    sa.Column("rating_n", sa.Integer, nullable=False),
    info=_V4,
    # Stored in its key's order (day first) on SQLite: no second copy of the key in an index, and a
    # period is one range of the table.
    sqlite_with_rowid=False,
)
# One distinct problem: a tool (or a tick stage) and a normalised cause; `id` is a hash of both, so
# the same problem has the same id on every replica and after every prune.
findings = sa.Table(
    "findings",
    _meta,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("tool", sa.String(255), nullable=False, index=True),
    sa.Column("cause_class", sa.String(16), nullable=False),
    sa.Column("cause", sa.Text, nullable=False),
    sa.Column("first_day", sa.String(10), nullable=False),
    sa.Column("last_day", sa.String(10), nullable=False),
    sa.Column("last_at", sa.Float, nullable=False),
    sa.Column("calls", sa.Integer, nullable=False),
    sa.Column("ticks", sa.Integer, nullable=False),
    # Successful calls of the tool (ok ticks, for a stage) since the finding was last seen: `gone` after N.
    sa.Column("ok_since", sa.Integer, nullable=False),
    sa.Column("example_error", sa.Text, nullable=False),
    sa.Column("example_input_hash", sa.String(16)),
    sa.Column("last_error", sa.Text, nullable=False),
    info=_V4,
)
# A finding's calls and ticks per day and persona: the period's counts and the personas it touched.
finding_days = sa.Table(
    "finding_days",
    _meta,
    sa.Column("finding_id", sa.String(16), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("calls", sa.Integer, nullable=False),
    sa.Column("ticks", sa.Integer, nullable=False),
    info=_V4,
    sqlite_with_rowid=False,
)
sa.Index("ix_finding_days_day", finding_days.c.day, info=_V4)
# What a day offered and asked for: the tools mana-mcp served (`served`) and the modules the
# personas' moduleMix named (`asked`), for coverage and demand without a tool.
catalogue = sa.Table(
    "catalogue",
    _meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("kind", sa.String(8), primary_key=True),  # served | asked
    sa.Column("name", sa.String(255), primary_key=True),
    info=_V4,
)
# Each replica's last poll, so that `python -m runner status` sees every replica (and whether it is paused).
polls = sa.Table(
    "polls",
    _meta,
    sa.Column("replica", sa.String(128), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("result", sa.String(16), nullable=False),  # ok | error | paused
    sa.Column("due", sa.Integer),
    sa.Column("started", sa.Integer),
    sa.Column("error", sa.Text),
    info=_V4,
)
# Each persona's last sealed tick, for the report's personas section (the ticks table is pruned).
persona_last = sa.Table(
    "persona_last",
    _meta,
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("tick_id", sa.String(64), nullable=False),
    sa.Column("window", sa.String(32), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("calls", sa.Integer, nullable=False),
    sa.Column("modules", sa.Text, nullable=False),
    sa.Column("space_id", sa.String(255)),
    sa.Column("sealed_at", sa.Float, nullable=False),
    info=_V4,
)
# --- Cost (step 5): every model call's usage, priced; written as the call's answer arrives ---
USAGE_TOKENS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
)


def _usage_columns() -> list[sa.Column[Any]]:
    """What one call, or a day's calls, used: each kind of token (as priced) and the cost in USD."""
    return [
        *(sa.Column(name, sa.Integer, nullable=False) for name in USAGE_TOKENS),
        sa.Column("cost_usd", sa.Float, nullable=False),
    ]


# A row per model call of a tick (day turns and the rating), so a tick's cost is the sum of its own
# rows and nothing counted is lost when a tick is cut; pruned with the tick.
model_calls = sa.Table(
    "model_calls",
    _meta,
    sa.Column("tick_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("persona_id", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    *_usage_columns(),
    sa.Column("at", sa.Float, nullable=False),  # database clock: which UTC day the money was spent on
    info=_V6,
)
# Today's spend is summed over this index's range (the budget check at every claim and model call).
sa.Index("ix_model_calls_at", model_calls.c.at, info=_V6)
sa.Index("ix_model_calls_persona_at", model_calls.c.persona_id, model_calls.c.at, info=_V6)
# Cost per UTC day, persona and model, upserted with each call: outlives the pruning of raw ticks.
cost_days = sa.Table(
    "cost_days",
    _meta,
    sa.Column("day", sa.String(10), primary_key=True),
    sa.Column("persona_id", sa.String(255), primary_key=True),
    sa.Column("model", sa.String(255), primary_key=True),
    sa.Column("calls", sa.Integer, nullable=False),
    *_usage_columns(),
    info=_V6,
    sqlite_with_rowid=False,
)
# /ready's write probe: opening a read-only file succeeds; only a write tells.
ready_probe = sa.Table("ready_probe", _meta, sa.Column("at", sa.Float), info=_V1)
migrations = sa.Table(
    "schema_migrations",
    _meta,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
    info={"since": 0},
)

# Step names, in order; the schema version is the number of steps applied.
STEPS: tuple[str, ...] = (
    "baseline: the tables of the last unversioned release",
    "replicas: claim by unique (persona, window), tick and batch leases",
    "vaults: personas known to have an encryption vault",
    "report: daily rollup, findings, catalogue, last ticks, polls, tick stage",
    "space types: the type of the space each tick played in",
    "budgets: model calls with their cost, daily cost per persona and model, tick reservations",
)
SCHEMA_VERSION = len(STEPS)
# Columns the unversioned releases added at open with ALTER TABLE; an old journal may lack them.
_LEGACY_ADDED = {("batches", "next_attempt_at"), ("login_blocks", "email")}
# Any fixed number: the advisory lock every replica's migration queues on (PostgreSQL).
_MIGRATION_LOCK = 0x70657273  # "pers"


class SchemaError(Exception):
    """The database is not a journal this runner can use; one line."""


def _since(item: sa.Table | sa.Column[Any] | sa.Index) -> int:
    return int(item.info.get("since", 1))


def _create_table(conn: sa.Connection, table: sa.Table, version: int) -> None:
    """CREATE TABLE with only the columns that existed at `version`; later steps add the rest."""
    columns = [c._copy() for c in table.columns if _since(c) <= version]
    conn.execute(sa.schema.CreateTable(sa.Table(table.name, sa.MetaData(), *columns, **table.dialect_kwargs)))


def _add_column(conn: sa.Connection, table: sa.Table, column: sa.Column[Any]) -> None:
    spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE {conn.dialect.identifier_preparer.format_table(table)} ADD COLUMN {spec}"))


def _columns(conn: sa.Connection, table: sa.Table) -> set[str]:
    return {c["name"] for c in sa.inspect(conn).get_columns(table.name)}


def _apply(conn: sa.Connection, version: int, present: set[str]) -> None:
    """Bring the schema to `version`: its new tables, its new columns, then its new indexes."""
    for table in _meta.sorted_tables:
        if table is migrations or _since(table) > version:
            continue
        if table.name not in present:
            _create_table(conn, table, version)
            present.add(table.name)
        else:
            have = _columns(conn, table)
            for column in table.columns:
                # Version 1 also completes an unversioned journal with what its release added at open.
                added = _since(column) == version or (version == 1 and (table.name, column.name) in _LEGACY_ADDED)
                if added and column.name not in have:
                    _add_column(conn, table, column)
        for index in table.indexes:
            if _since(index) == version:
                index.create(conn, checkfirst=True)


def upgrade(conn: sa.Connection) -> tuple[int, int]:
    """Apply every step this journal lacks; returns (version found, version now). Raises SchemaError."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
    present = set(sa.inspect(conn).get_table_names())
    own = {t.name for t in _meta.tables.values()}
    if present and not present & own:
        foreign = ", ".join(sorted(present)[:5])
        raise SchemaError(f"not a runner journal (it holds other tables: {foreign})")
    if migrations.name not in present:
        migrations.create(conn)
        found = 0
    else:
        found = int(conn.scalar(sa.select(sa.func.coalesce(sa.func.max(migrations.c.version), 0))) or 0)
    _not_newer(found)
    if found == 0 and present:
        # An unversioned journal: every column but the stopgap's must already be there.
        for table in _meta.sorted_tables:
            if table.name in present and _since(table) == 1:
                have = _columns(conn, table)
                missing = [
                    c.name
                    for c in table.columns
                    if _since(c) == 1 and c.name not in have and (table.name, c.name) not in _LEGACY_ADDED
                ]
                if missing:
                    raise SchemaError(f"foreign schema: table {table.name} has no column {missing[0]}")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        _apply(conn, version, present)
        if version == 1:
            # The pre-0.2 name of a refused batch.
            conn.execute(batches.update().where(batches.c.state == "dead").values(state="refused"))
        conn.execute(migrations.insert().values(version=version, name=STEPS[version - 1][:64], applied_at=_epoch(conn)))
    return found, SCHEMA_VERSION


def _not_newer(found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaError(
            f"written by a newer runner (schema version {found}; this runner knows up to {SCHEMA_VERSION}); "
            "upgrade the runner or point it at another journal"
        )


def check(conn: sa.Connection) -> int:
    """The version of a journal that is only to be read (the report): nothing is created or migrated.

    Raises SchemaError unless it is a runner journal at exactly this code's version.
    """
    if migrations.name not in set(sa.inspect(conn).get_table_names()):
        raise SchemaError("not a runner journal (no schema_migrations table)")
    found = int(conn.scalar(sa.select(sa.func.coalesce(sa.func.max(migrations.c.version), 0))) or 0)
    _not_newer(found)
    if found < SCHEMA_VERSION:
        raise SchemaError(f"schema version {found}: start the runner once to migrate it to {SCHEMA_VERSION}")
    return found


def clock(dialect: str) -> sa.ColumnElement[float]:
    """The database's own time, epoch seconds: every replica judges leases and retry times by it."""
    if dialect == "postgresql":
        # clock_timestamp, not now(): now() is frozen at the start of the transaction.
        return sa.literal_column("extract(epoch from clock_timestamp())::float8", sa.Float)
    return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)


def _epoch(conn: sa.Connection) -> float:
    return float(conn.scalar(sa.select(clock(conn.dialect.name))) or 0.0)
