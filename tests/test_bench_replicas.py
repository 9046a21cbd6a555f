"""bench/replicas.py cannot rot: its --tiny mode runs 1 and 2 replicas on a real PostgreSQL and passes
its own checks (one tick per persona, rows journaled == rows landed, every call has its row, clean exits)."""

from __future__ import annotations

import json
from pathlib import Path

from procs import run_tiny_bench


def test_tiny_replica_bench_runs_and_its_checks_pass(tmp_path: Path) -> None:
    done = run_tiny_bench("replicas.py", tmp_path, "t")
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "replicas-t.json").read_text())
    assert (tmp_path / "replicas-t.md").read_text().count("| ok |") == 2
    results = document["results"]
    assert [r["replicas"] for r in results] == [1, 2]
    for r in results:
        assert r["ok"] is True and r["checks"] and all(r["checks"].values()), r["checks"]
        assert r["personas"] == r["ticks"] == r["claims_won"] == 6
        assert r["outcomes"] == {"ok": 6}
        assert sum(p["ticks"] for p in r["per_replica"]) == 6 and len(r["per_replica"]) == r["replicas"]
        for p in r["per_replica"]:
            assert p["exit"] == 0 and p["errors"] == 0 and 0 < (p["startup_cpu_s"] or 0) < p["cpu_s"], p
        assert r["rows_journaled"] == r["rows_landed"] and r["rows"] == sum(r["rows_landed"].values()) > 6
        assert r["tool_calls"] > 0 and r["rows_per_s"] > 0 and r["claims_per_s"] > 0
        # The measures hang together: the work fits between its lower bound and the whole run.
        assert 0 < r["ideal_s"] <= r["span_s"] <= r["makespan_s"]
        assert r["longest_tick_s"] <= r["ideal_s"] and r["claim_attempts"] >= r["claims_won"]
        assert r["cpu_s"]["postgres"] > 0 and r["cpu_s"]["sandbox"] > 0
        # Busy slot-seconds over R x C slots while personas waited: above 1 would mean more ticks at once than slots.
        assert 0 < r["slot_use_while_claiming"] <= 1.001
