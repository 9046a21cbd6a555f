"""The report's read model, kept as ticks are sealed: the daily rollup, the findings, the catalogue.

`record_sealed` runs inside the transaction that seals a tick (ticks.py), so the rollup and the
findings never disagree with the rows, and pruning the rows later takes nothing from them. Every
count is added with an upsert (`x = x + excluded.x`), so replicas sealing at once add up rather
than overwrite; the findings a seal touches are written in id order, so two seals on PostgreSQL
always lock them in the same order and cannot deadlock.

What makes two errors one finding is `finding_key`: the tool (or tick stage) and the error text
with ids, UUIDs, numbers and quoted values taken out (`normalise`). Both are pure, so the same
problem has the same id in every journal, whatever order it was seen in.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from runner.journal.store import Store, insert
from runner.persona import LEAK_PREFIX, PARSE_MODULE, PROBE_TOOL, TICK_ROW, module_of
from runner.schema import LATENCY_BUCKETS, catalogue, finding_days, findings, persona_last, rollup, ticks

# Tick-level failures are findings of the stage the tick was in: `__tick:login`, `__tick:play`.
STAGE_PREFIX = f"{TICK_ROW}:"
CAUSE_MAX = 300

_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'|`[^`]*`|“[^”]*”|„[^“”]*[“”]|«[^»]*»")
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
# Opaque ids: long tokens that mix letters and digits (`HWItnb7UXVoiKyH9EgP9FTXXR4osEPfe`, hex digests).
_OPAQUE = re.compile(r"\b(?=[A-Za-z_-]*\d)(?=[0-9_-]*[A-Za-z])[A-Za-z0-9_-]{8,}\b")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SPACE = re.compile(r"\s+")


def normalise(error: str) -> str:
    """The cause of an error with everything that varies between occurrences of one defect taken out.

    Quoted values first (they may hold anything, ids and numbers included), then UUIDs, opaque
    ids and numbers, each replaced by a placeholder so the sentence keeps its shape.
    """
    text = _QUOTED.sub("<value>", error)
    text = _UUID.sub("<id>", text)
    text = _OPAQUE.sub("<id>", text)
    text = _NUMBER.sub("<n>", text)
    return _SPACE.sub(" ", text).strip()[:CAUSE_MAX]


# Rules are tried in order; the first whose words appear in the lower-cased error decides.
_CLASS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("schema", ("invalid arguments for tool",)),
    ("model", ("unknown tool", "expected an object", "rating failed", "not a json object")),
    ("policy", (" not allowed", "destructive-not-allowed", "rate-limit-exceeded", "no tools offered")),
    (
        "session",
        (
            "unauthorized",
            "token is expired",
            "forbidden",
            "session",
            "invalid email or password",
            "account_locked",
            "login",
            "sign-in",
            "space",
        ),
    ),
    ("transport", ("timeout", "timed out", "connection", "outcome unknown", "interrupted", "transport", "unreachable")),
)


def cause_class(tool: str, error: str) -> str:
    """One of schema.CAUSES: which kind of problem an error is (`scope`: a probe found a leak)."""
    if tool == PARSE_MODULE:
        return "model"
    if tool == PROBE_TOOL:
        # A canary that came back is a leak; a shared space its members cannot read is the module failing.
        return "scope" if error.startswith(LEAK_PREFIX) else "handler"
    low = error.lower()
    for name, words in _CLASS_RULES:
        if any(word in low for word in words):
            return name
    # What is left is a tool's own failure (`Tool X failed: …`), or a stage's that names no known cause.
    return "handler"


def finding_key(tool: str, error: str) -> tuple[str, str, str]:
    """(id, normalised cause, cause class) of one error: the one rule for what makes two errors one finding."""
    cause = normalise(error)
    digest = hashlib.sha256(f"{tool}\n{cause}".encode()).hexdigest()[:16]
    return digest, cause, cause_class(tool, error)


def latency_bucket(ms: int) -> int:
    """Half-octave buckets: 0 is under 1 ms, k covers [2^((k-1)/2), 2^(k/2)) ms; the last is open-ended."""
    if ms < 1:
        return 0
    return min(LATENCY_BUCKETS - 1, int(2 * math.log2(ms)) + 1)


def bucket_value(k: int) -> float:
    """The value a bucket stands for in a quantile: its geometric middle (within 19 % of any member)."""
    return 0.5 if k == 0 else 2 ** ((k - 0.5) / 2)


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of merged bucket counts, or None when there is nothing to measure."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for k, n in enumerate(counts):
        seen += n
        if seen >= rank and n:
            return bucket_value(k)
    return bucket_value(len(counts) - 1)


@dataclass(frozen=True, slots=True)
class SealedCall:
    tool: str
    ok: bool
    error: str | None
    latency_ms: int | None
    input_hash: str | None


@dataclass(frozen=True, slots=True)
class SealedTick:
    """What the read model needs of a tick at its seal: the rows exactly as they were frozen."""

    tick_id: str
    persona_id: str
    window: str
    outcome: str
    stage: str
    calls: list[SealedCall]
    ratings: list[tuple[str, int]]
    # A rating answer that could not be read (the `__parse` row's notes), or None.
    parse_failure: str | None
    # The tick's own error row (a failure before or around the tools), or None.
    tick_error: str | None
    space_id: str | None
    now: float

    @property
    def day(self) -> str:
        return self.window[:10]


async def _add(conn: AsyncConnection, table: sa.Table, rows: list[dict[str, Any]], counters: Sequence[str]) -> None:
    """Insert the rows, or add their counters to the rows already there: one statement for them all.

    The rows of one call have distinct keys (PostgreSQL refuses to update one row twice in a statement).
    """
    if not rows:
        return
    keys = [c.name for c in table.primary_key.columns]
    stmt = insert(conn.dialect.name, table).values(rows)
    await conn.execute(
        stmt.on_conflict_do_update(index_elements=keys, set_={c: table.c[c] + stmt.excluded[c] for c in counters})
    )


_ROLLUP_COUNTERS = tuple(c.name for c in rollup.columns if not c.primary_key)


def _zero_rollup(tick: SealedTick, module: str, tool: str) -> dict[str, Any]:
    row: dict[str, Any] = {"day": tick.day, "persona_id": tick.persona_id, "module": module, "tool": tool}
    row.update({c: 0 for c in _ROLLUP_COUNTERS})
    row["ticks"] = 1
    return row


@dataclass(frozen=True, slots=True)
class _Failure:
    """One failure of the tick with its finding: a failed call (`index` is its place), or the tick's own."""

    tool: str
    error: str
    input_hash: str | None
    index: int | None
    id: str
    cause: str
    cause_class: str


def _failures(tick: SealedTick) -> list[_Failure]:
    """Every failure of the tick, in the order it happened, each keyed once (`finding_key`)."""
    failed: list[tuple[str, str, str | None, int | None]] = [
        (c.tool, c.error or "error", c.input_hash, i) for i, c in enumerate(tick.calls) if not c.ok
    ]
    if tick.parse_failure is not None:
        failed.append((PARSE_MODULE, tick.parse_failure, None, None))
    if tick.tick_error is not None:
        failed.append((STAGE_PREFIX + tick.stage, tick.tick_error, None, None))
    return [_Failure(tool, error, digest, i, *finding_key(tool, error)) for tool, error, digest, i in failed]


def _rollup_rows(tick: SealedTick, failures: list[_Failure]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(module: str, tool: str) -> dict[str, Any]:
        return rows.setdefault((module, tool), _zero_rollup(tick, module, tool))

    row(TICK_ROW, "")["errors"] = int(tick.outcome != "ok")
    for call in tick.calls:
        row(module_of(call.tool), "")
        r = row(module_of(call.tool), call.tool)
        r["calls"] += 1
        if call.latency_ms is not None:
            r[f"lat_{latency_bucket(call.latency_ms):02d}"] += 1
    for module, rating in tick.ratings:
        r = row(module, "")
        r["rating_sum"] += rating
        r["rating_n"] += 1
    for failure in failures:
        if failure.index is None:  # the tick's own failure, or an unreadable rating: a row of its own
            r = row(PARSE_MODULE if failure.tool == PARSE_MODULE else TICK_ROW, failure.tool)
            r["calls"] += 1
        else:
            r = row(module_of(failure.tool), failure.tool)
        r["errors"] += 1
        r[f"err_{failure.cause_class}"] += 1
    # Sorted: two seals of one persona's day (hourly ticks on two replicas) lock its rows in one order.
    return [rows[key] for key in sorted(rows)]


@dataclass(slots=True)
class _Seen:
    """One finding as this tick saw it."""

    first: _Failure  # the example
    last: _Failure
    calls: int = 0
    ok_after: int = 0  # the tool's successes after the finding's last failure in the tick


def _seen(tick: SealedTick, failures: list[_Failure]) -> tuple[dict[str, _Seen], Counter[str]]:
    """The findings this tick saw, and per tool (or stage, or `__parse`) the successes toward `gone`.

    A finding seen in this tick counts only the successes after its last failure (`ok_after`);
    the Counter applies to the findings not seen here.
    """
    seen: dict[str, _Seen] = {}
    last_failure: dict[str, int] = {}
    for failure in failures:
        entry = seen.setdefault(failure.id, _Seen(failure, failure))
        entry.calls += 1
        entry.last = failure
        if failure.index is not None:
            last_failure[failure.id] = failure.index
    ok: Counter[str] = Counter()
    for index, call in enumerate(tick.calls):
        if call.ok:
            ok[call.tool] += 1
            for fid, at in last_failure.items():
                if seen[fid].first.tool == call.tool and index > at:
                    seen[fid].ok_after += 1
    if tick.ratings and tick.parse_failure is None:
        ok[PARSE_MODULE] += 1
    if tick.outcome == "ok":
        ok[STAGE_PREFIX] += 1  # an ok tick passed every stage
    return seen, ok


async def record_sealed(conn: AsyncConnection, tick: SealedTick) -> None:
    """Add one sealed tick to the rollup, the findings and its persona's last tick (in the seal's transaction)."""
    failures = _failures(tick)
    await _add(conn, rollup, _rollup_rows(tick, failures), _ROLLUP_COUNTERS)
    seen, ok = _seen(tick, failures)
    await _record_findings(conn, tick, seen, ok)
    modules = sorted({module_of(c.tool) for c in tick.calls})
    values = {
        "persona_id": tick.persona_id,
        "tick_id": tick.tick_id,
        "window": tick.window,
        "outcome": tick.outcome,
        "calls": len(tick.calls),
        "modules": ",".join(modules),
        "space_id": tick.space_id,
        "sealed_at": tick.now,
    }
    stmt = insert(conn.dialect.name, persona_last).values(**values)
    # Ticks of one persona may be sealed out of order (a recovery after a later window): the latest window wins.
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["persona_id"],
            set_={k: stmt.excluded[k] for k in values if k != "persona_id"},
            where=stmt.excluded.window >= persona_last.c.window,
        )
    )


async def _record_findings(conn: AsyncConnection, tick: SealedTick, seen: dict[str, _Seen], ok: Counter[str]) -> None:
    tools = [t for t in ok if t != STAGE_PREFIX]
    helped = sa.or_(
        findings.c.tool.in_(tools),
        findings.c.tool.startswith(STAGE_PREFIX, autoescape=True) if ok[STAGE_PREFIX] else sa.false(),
    )
    others = (await conn.execute(sa.select(findings.c.id, findings.c.tool).where(helped))).all()
    successes = {fid: ok[STAGE_PREFIX if tool.startswith(STAGE_PREFIX) else tool] for fid, tool in others}
    # One order for every seal's row locks (PostgreSQL): by finding id.
    for fid in sorted(set(successes) | set(seen)):
        entry = seen.get(fid)
        if entry is None:
            await conn.execute(
                findings.update().where(findings.c.id == fid).values(ok_since=findings.c.ok_since + successes[fid])
            )
            continue
        first = entry.first
        stmt = insert(conn.dialect.name, findings).values(
            id=fid,
            tool=first.tool,
            cause_class=first.cause_class,
            cause=first.cause,
            first_day=tick.day,
            last_day=tick.day,
            last_at=tick.now,
            calls=entry.calls,
            ticks=1,
            ok_since=entry.ok_after,
            example_error=first.error[:2000],
            example_input_hash=first.input_hash,
            last_error=entry.last.error[:2000],
        )
        new = stmt.excluded
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["id"],
                set_={
                    "calls": findings.c.calls + new.calls,
                    "ticks": findings.c.ticks + 1,
                    "first_day": sa.case(
                        (new.first_day < findings.c.first_day, new.first_day), else_=findings.c.first_day
                    ),
                    "last_day": sa.case((new.last_day > findings.c.last_day, new.last_day), else_=findings.c.last_day),
                    "last_at": new.last_at,
                    "ok_since": new.ok_since,
                    "last_error": new.last_error,
                },
            )
        )
    days = [
        {"finding_id": fid, "day": tick.day, "persona_id": tick.persona_id, "calls": s.calls, "ticks": 1}
        for fid, s in sorted(seen.items())
    ]
    await _add(conn, finding_days, days, ("calls", "ticks"))


class ReadModel(Store):
    """The part of the read model written outside a seal: what a tick was offered and asked for."""

    async def record_offer(self, tick_id: str, served: Iterable[str], asked: Iterable[str]) -> None:
        """The tools mana-mcp served this tick and the modules its persona's moduleMix asks for, on the tick's day."""
        rows = [("served", name) for name in set(served)] + [("asked", name) for name in set(asked)]
        async with self._write() as conn:
            window = await conn.scalar(sa.select(ticks.c.window).where(ticks.c.tick_id == tick_id))
            if window is None or not rows:
                return
            values = [{"day": str(window)[:10], "kind": kind, "name": name[:255]} for kind, name in sorted(rows)]
            await conn.execute(self._insert(catalogue).values(values).on_conflict_do_nothing())
            # Served tools are listed right before the persona plays: its last journaled step.
            await conn.execute(ticks.update().where(ticks.c.tick_id == tick_id).values(stage="play"))
