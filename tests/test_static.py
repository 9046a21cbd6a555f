"""The code stays as typed and tidy as the style guide says: ruff and mypy --strict, from the lock."""

from __future__ import annotations

import subprocess
import sys

from procs import ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_strict_finds_nothing() -> None:
    done = _run("mypy", "runner")
    assert done.returncode == 0, done.stdout[-4000:]
