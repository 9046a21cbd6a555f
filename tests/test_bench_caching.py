"""bench/caching.py cannot rot: its --tiny run plays real ticks at concurrency 1, 4 and 8 against the
caching stand-in and meets the targets it reports on (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

from procs import run_tiny_bench


def test_tiny_caching_bench_runs_and_meets_its_targets(tmp_path: Path) -> None:
    done = run_tiny_bench("caching.py", tmp_path, "t")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "caching-t.json").read_text())["results"]
    assert [r["concurrency"] for r in results] == [1, 4, 8]
    assert (tmp_path / "caching-t.md").read_text().count("\n| ") == 4  # header + three rows
    for r in results:
        assert r["ticks"] == 6 and r["outcomes"] == {"ok": 6} and r["backlog"] == 0
        assert r["requests"] >= 3 * r["ticks"]  # turns and a rating per tick
        assert r["shared_prefix_writes"] == 1 and r["unread_writes"] == 0, r
        assert r["hit_share_turns_2_plus"] >= 0.95
        assert 0 < r["cost_per_tick_usd"] < r["uncached_per_tick_usd"]
        assert abs(r["cost_vs_first"]) <= 0.03
