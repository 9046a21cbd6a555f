"""`python -m runner spaces [--apply]` against the sandbox as a process: the plan's two spaces with
their members and roles, a second run that changes nothing, a removed member showing up in the
difference, bad input refused before mana-auth changes, and a refusal halfway that leaves what was done."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import ROOT, SandboxProcess, runner_env, start_sandbox
from test_sessions import assert_each_request_carried_one_persona

from runner.persona import derive_password

SEED = "spaces-seed-secret-1234"
KEY = "spaces-service-key-5678"
PLAN = ROOT / "config" / "spaces.toml"
ANNA, BEN, MARCUS, LENA = (f"persona.{n}@mana.test" for n in ("anna", "ben", "marcus", "lena"))
CHANGES = ("/create", "/invite-member", "/accept-invitation")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxProcess]:
    """The default cast plus the plan's Anna, Ben and Marcus (Lena is in it already)."""
    sb = start_sandbox(tmp_path, seed_secret=SEED, service_key=KEY)
    for name in ("anna", "ben", "marcus"):
        spec = {
            "name": name,
            "archetype": "t",
            "systemPrompt": "Du.",
            "moduleMix": {"notes": 1},
            "tickCadence": "daily",
        }
        sb.post("personas", {**spec, "extraSpace": "none"})
    yield sb
    sb.stop()


def spaces(sandbox: SandboxProcess, tmp_path: Path, *args: str, file: Path = PLAN) -> subprocess.CompletedProcess[str]:
    env = runner_env(sandbox, tmp_path / "runner.db", PERSONA_SPACES_FILE=str(file))
    return subprocess.run(
        [sys.executable, "-m", "runner", "spaces", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def changes(sandbox: SandboxProcess) -> list[dict[str, Any]]:
    return [
        r
        for r in sandbox.get("requests")
        if r["method"] == "POST" and r["path"].startswith("/api/auth/organization") and r["path"].endswith(CHANGES)
    ]


def members(sandbox: SandboxProcess, slug: str) -> list[tuple[str, str]]:
    return sorted((p["email"], s["role"]) for p in sandbox.get("personas") for s in p["spaces"] if s["slug"] == slug)


def cookie(sandbox: SandboxProcess, email: str) -> dict[str, str]:
    signed = httpx.post(
        f"{sandbox.auth_url}/api/auth/sign-in/email", json={"email": email, "password": derive_password(SEED, email)}
    )
    return {"Cookie": signed.headers["set-cookie"].split(";", 1)[0], "Origin": sandbox.auth_url}


def test_apply_makes_the_plan_spaces_once_and_a_removed_member_shows_up(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    shown = spaces(sandbox, tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "to do: familie-schmidt: create family space 'Familie Schmidt' as persona.anna@mana.test" in shown.stdout
    assert f"to do: team-marcus-lena: add {LENA} as member (invite, accept)" in shown.stdout
    assert "4 steps to do" in shown.stdout and changes(sandbox) == []  # showing changes nothing

    applied = spaces(sandbox, tmp_path, "--apply")
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert members(sandbox, "familie-schmidt") == [(ANNA, "owner"), (BEN, "member")]
    assert members(sandbox, "team-marcus-lena") == [(LENA, "member"), (MARCUS, "owner")]
    made = changes(sandbox)
    assert [r["path"].rsplit("/", 1)[1] for r in made] == ["create", "invite-member", "accept-invitation"] * 2
    # Each change was made by the persona it belongs to: the owner creates and invites, the member accepts.
    owners = [r["owners"] for r in made]
    ids = {p["email"]: p["userId"] for p in sandbox.get("personas")}
    assert owners[:3] == [[ids[ANNA]], [ids[ANNA]], [ids[BEN]]] and owners[3:] == [[ids[MARCUS]]] * 2 + [[ids[LENA]]]
    assert_each_request_carried_one_persona(sandbox.get("requests"), sandbox.auth_url)

    again = spaces(sandbox, tmp_path, "--apply")
    assert again.returncode == 0 and "0 steps done" in again.stdout, again.stderr[-2000:]
    assert len(changes(sandbox)) == 6  # nothing more was created, invited or accepted
    assert "0 steps to do: in place" in spaces(sandbox, tmp_path).stdout

    space_id = next(s["id"] for p in sandbox.get("personas") for s in p["spaces"] if s["slug"] == "familie-schmidt")
    removed = httpx.post(
        f"{sandbox.auth_url}/api/auth/organization/remove-member",
        json={"memberIdOrEmail": BEN, "organizationId": space_id},
        headers=cookie(sandbox, ANNA),
    )
    assert removed.status_code == 200, removed.text
    after = spaces(sandbox, tmp_path)
    assert after.returncode == 0 and f"to do: familie-schmidt: add {BEN} as member" in after.stdout
    assert "1 steps to do" in after.stdout


BAD = {
    "malformed TOML": ("[[space]\nname = 'x'", "not TOML"),
    "unknown space type": ("type = 'household'", "type 'household' is not a shared space type"),
    "personal type": ("type = 'personal'", "type 'personal' is not a shared space type"),
    "member no persona has": ("members = ['persona.anna@mana.test', 'persona.nobody@mana.test']", "persona.nobody"),
    "owner not a persona": ("members = ['anna@example.com', 'persona.ben@mana.test']", "owner 'anna@example.com'"),
    "duplicate slug": ("DUP", "slug 'familie-schmidt' is declared twice"),
}


def bad_file(tmp_path: Path, case: str) -> Path:
    change, _ = BAD[case]
    plan = PLAN.read_text(encoding="utf-8")
    if change.startswith("[["):
        text = change
    elif change == "DUP":
        text = plan.replace('slug = "team-marcus-lena"', 'slug = "familie-schmidt"')
    else:
        key = change.split(" = ", 1)[0]
        lines = plan.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        lines[first] = change
        text = "\n".join(lines)
    path = tmp_path / f"{case.replace(' ', '-')}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_two_and_changes_nothing(sandbox: SandboxProcess, tmp_path: Path, case: str) -> None:
    done = spaces(sandbox, tmp_path, "--apply", file=bad_file(tmp_path, case))
    assert done.returncode == 2, (done.stdout, done.stderr[-2000:])
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD[case][1] in lines[0], done.stderr
    assert "Traceback" not in done.stderr and SEED not in done.stderr + done.stdout
    assert changes(sandbox) == [] and "familie-schmidt" not in str(sandbox.get("personas"))


def test_a_refusal_halfway_leaves_what_was_done_and_shows_what_remains(sandbox: SandboxProcess, tmp_path: Path) -> None:
    taken = httpx.post(
        f"{sandbox.auth_url}/api/auth/organization/create",
        json={"name": "Fremd", "slug": "team-marcus-lena", "metadata": {"type": "team"}},
        headers=cookie(sandbox, "persona.tim@mana.test"),
    )
    assert taken.status_code == 200, taken.text
    done = spaces(sandbox, tmp_path, "--apply")
    assert done.returncode == 1
    last = [line for line in done.stderr.strip().splitlines() if not line.startswith("{")][-1]
    assert last.startswith("error: spaces: team-marcus-lena:") and "ORGANIZATION_ALREADY_EXISTS" in last
    assert members(sandbox, "familie-schmidt") == [(ANNA, "owner"), (BEN, "member")]  # done before the refusal
    shown = spaces(sandbox, tmp_path)
    assert "to do: team-marcus-lena: create team space" in shown.stdout and "familie-schmidt" not in shown.stdout


def test_probe_command_probes_every_declared_persona_and_delivers_the_rows(
    sandbox: SandboxProcess, tmp_path: Path
) -> None:
    assert spaces(sandbox, tmp_path, "--apply").returncode == 0
    env = runner_env(sandbox, tmp_path / "runner.db", PERSONA_SPACES_FILE=str(PLAN))
    done = subprocess.run(
        [sys.executable, "-m", "runner", "probe"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [ANNA, BEN, MARCUS, LENA]
    assert all(": scope leak: " in line for line in lines), lines
    verdicts = [r for r in sandbox.get("actions") if r["toolName"] == "__probe"]
    assert len(verdicts) == 4 and all(r["errorMessage"].startswith("scope leak:") for r in verdicts)
