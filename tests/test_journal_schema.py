"""The journal's versioned migrations on SQLite: a fresh file, a journal of the last unversioned
release migrated in place with its open work, and a journal newer than the code refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from runner.journal import Journal, JournalError
from runner.schema import SCHEMA_VERSION, STEPS

V0_SCHEMA = (Path(__file__).parent / "journal_v0.sql").read_text()


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [v for (v,) in db.execute("SELECT version FROM schema_migrations ORDER BY version")]


def _columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


async def test_a_fresh_journal_gets_every_step_once(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    for _ in range(2):  # reopening applies nothing twice
        journal = await Journal.open(path)
        await journal.close()
    assert _versions(path) == list(range(1, len(STEPS) + 1)) == list(range(1, SCHEMA_VERSION + 1))
    assert {"owner", "lease_until"} <= _columns(path, "ticks")
    assert {"lease_owner", "lease_until"} <= _columns(path, "batches")
    with sqlite3.connect(path) as db:
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"ux_ticks_persona_window", "ix_ticks_persona_id", "ix_batches_state"} <= indexes


async def test_a_journal_of_the_last_unversioned_release_migrates_in_place_with_its_open_work(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(V0_SCHEMA)
        # A tick the old process left running mid-call, and a sealed tick whose batch waits.
        db.execute("INSERT INTO ticks VALUES ('t-run', 'p-1', '2026-11-30', 'running', NULL, 1, NULL, NULL, 1.0, 1.0)")
        db.execute("INSERT INTO calls VALUES ('t-run', 0, 'todo.create', 'abcd', 'ok', NULL, 12)")
        db.execute("INSERT INTO calls VALUES ('t-run', 1, 'todo.list', 'ef01', 'pending', NULL, NULL)")
        db.execute("INSERT INTO ticks VALUES ('t-old', 'p-2', '2026-11-30', 'sealed', 'ok', 1, NULL, NULL, 1.0, 1.0)")
        db.execute(
            "INSERT INTO batches VALUES (1, 't-old', 'p-2', 'actions', ?, 1, 'pending', 0, NULL, 1.0, NULL, NULL)",
            (b'{"actions":[]}',),
        )
        db.execute(
            "INSERT INTO batches VALUES (2, 't-old', 'p-2', 'feedback', ?, 1, 'dead', 3, 'x', 1.0, NULL, NULL)",
            (b'{"feedback":[]}',),
        )
        db.execute("INSERT INTO login_blocks VALUES ('p-3', 'fp', 'INVALID_CREDENTIALS', 1.0, 'c@x.y')")
    journal = await Journal.open(path)
    try:
        assert _versions(path) == list(range(1, SCHEMA_VERSION + 1))
        assert await journal.batch_counts() == {"pending": 1, "parked": 0, "refused": 1, "delivered": 0}
        assert await journal.login_block("p-3", "fp", "c@x.y") == "INVALID_CREDENTIALS"
        # The old process is gone (this one holds the lock): its tick is closed, the pending call kept.
        assert await journal.recover() == ["t-run"]
        batch = next(b for b in await journal.pending_batches() if b.tick_id == "t-run")
        rows = json.loads(batch.body)["actions"]
        assert [r["toolName"] for r in rows] == ["todo.create", "todo.list", "__tick"]
        assert rows[1]["errorMessage"].startswith("outcome unknown")
        # The window it held stays taken: the day is not replayed.
        assert await journal.claim("p-1", "2026-11-30", "t-run") is None
    finally:
        await journal.close()


async def test_an_unversioned_journal_missing_a_column_its_release_had_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            V0_SCHEMA.replace(
                "\tlast_error TEXT, \n\tcreated_at FLOAT NOT NULL, \n\tupdated_at",
                "\tcreated_at FLOAT NOT NULL, \n\tupdated_at",
                1,
            )
        )
    with pytest.raises(JournalError, match=r"foreign schema: table ticks has no column last_error"):
        await Journal.open(path)


async def test_a_journal_written_by_a_newer_runner_is_refused_in_one_line_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    journal = await Journal.open(path)
    await journal.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 1.0)", (SCHEMA_VERSION + 1,))
    before = path.read_bytes()
    with pytest.raises(JournalError) as refused:
        await Journal.open(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "newer runner" in message
    assert path.read_bytes() == before
