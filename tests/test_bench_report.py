"""bench/report_bench.py cannot rot: its --tiny mode seeds a SQLite and a PostgreSQL journal through the
seal's read-model writer, runs the report command on each and passes its own checks (totals add up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from procs import ROOT


def test_tiny_report_bench_runs_and_its_checks_pass(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/report_bench.py", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("sqlite", "postgresql"):
        result = json.loads((tmp_path / f"report-{kind}.json").read_text())
        assert result["ok"] is True and all(result["checks"].values()), result
        assert (result["personas"], result["days"], result["ticks"]) == (20, 3, 60)
        assert result["findings"] > 0 and result["command_s"] > result["build_s"] > 0
        assert result["command_peak_rss_mb"] > 0
