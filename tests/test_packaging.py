"""The Dockerfile's own steps, replayed without Docker: its COPY lines build the context,
its pip RUN lines install into a fresh virtualenv, its CMD starts the runner, and its
HEALTHCHECK must pass against it. If the image would not build or start, this fails."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from procs import ROOT, RunnerProcess, free_port, runner_env, start_runner, start_sandbox


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    steps = _instructions()
    keywords = [k for k, _ in steps]
    assert steps[0][0] == "FROM" and "slim" in steps[0][1]
    assert "USER" in keywords and dict(steps)["USER"] != "root"
    assert any(k == "HEALTHCHECK" and "/health" in v for k, v in steps)
    assert any(k == "VOLUME" for k in keywords)
    assert json.loads(dict(steps)["CMD"]) == ["python", "-m", "runner"]
    runs = [v for k, v in steps if k == "RUN" and "pip install" in v]
    assert any("-r requirements.lock" in r for r in runs), "dependencies must come from the lock"


def test_dockerfile_install_and_start_in_a_fresh_venv(tmp_path: Path) -> None:
    steps = _instructions()
    app = tmp_path / "app"
    app.mkdir()
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "COPY":
            *sources, dest = shlex.split(rest)
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, app / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    (app / dest).mkdir(parents=True, exist_ok=True)  # file sources all go into a directory
                    shutil.copy2(src, app / dest / Path(source).name)
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for keyword, rest in steps:
        if keyword == "RUN" and rest.startswith("pip install"):
            command = [python, "-m", *shlex.split(rest)]
            done = subprocess.run(command, cwd=app, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{rest}\n{done.stderr[-3000:]}"

    sandbox = start_sandbox(tmp_path, seed_secret="docker-seed-secret", service_key="docker-service-key")
    try:
        environment = runner_env(sandbox, tmp_path / "data" / "runner.db")
        # The image's /app is this test's app directory.
        environment.update(
            {k: re.sub(r"^/app/", f"{app}/", v) for k, v in env.items() if k not in ("RUNNER_STATE_PATH", "PORT")}
        )
        cmd = tuple(json.loads(dict(steps)["CMD"]))
        assert cmd[:3] == ("python", "-m", "runner")
        runner, health = _healthy(environment, tmp_path / "runner.log", cmd[3:], python, tmp_path)
        try:
            assert health["status"] == "ok"
            healthcheck = json.loads(dict(steps)["HEALTHCHECK"].split("CMD", 1)[1])
            probe = subprocess.run([python, *healthcheck[1:]], env=environment, capture_output=True, timeout=30)
            assert probe.returncode == 0, probe.stderr
            assert runner.terminate(timeout=60) == 0
        finally:
            if runner.proc.poll() is None:
                runner.kill()
        # The installed package, not the checkout, served the runner: it ran from outside the repo.
        assert "runner started" in runner.logs()
    finally:
        sandbox.stop()


def _healthy(
    environment: dict[str, str], log: Path, args: tuple[str, ...], python: str, cwd: Path
) -> tuple[RunnerProcess, dict[str, Any]]:
    """The runner up and healthy; started again on another port when the one free_port() chose was
    taken before the runner bound it (the other test worker may take it in between)."""
    for _ in range(3):
        runner = start_runner(environment, log, args=args, python=python, cwd=cwd)
        try:
            return runner, runner.wait_healthy(timeout=60)
        except RuntimeError as exc:
            if "Address already in use" not in str(exc):
                raise
        environment["PORT"] = str(free_port())
    raise RuntimeError("no free port for the runner after 3 tries")


@pytest.mark.parametrize("path", ["compose.yaml", "compose.replicas.yaml", "config/runner.env.example"])
def test_local_use_files_exist_and_name_only_settings_the_runner_reads(path: str) -> None:
    from runner.settings import Settings

    text = (ROOT / path).read_text(encoding="utf-8")
    # A misspelt variable is silently ignored by the runner; catch it here instead.
    prefixes = ("MANA_", "RUNNER_", "PERSONA_", "LLM_", "TICK_", "SCRIPTED_", "ANTHROPIC_", "OUTBOX_", "LOG_")
    named = set(re.findall(r"^[#\s]*([A-Z][A-Z0-9_]+)\s*[:=]", text, flags=re.M))
    unknown = {n for n in named if n.startswith(prefixes) and n.lower() not in Settings.model_fields}
    assert not unknown - {"RUNNER_DB_PASSWORD"}, unknown  # the compose file's own variable, not the runner's
    if path == "compose.replicas.yaml":
        assert text.count("RUNNER_STATE_URL: postgresql+asyncpg://") == 1  # one anchor shared by both runners
        assert '"3070:3070"' in text and '"3071:3070"' in text and "condition: service_healthy" in text
