"""Crash points kill the armed process at the named point only, and only when enabled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from outbox.crashpoints import CRASH_POINTS_VARIABLE

# Passes "a" then "b", reporting each, after waiting for the test to arm it.
PROGRAM = """
import sys
from outbox.crashpoints import crash_point
print("ready", flush=True)
sys.stdin.readline()
for name in ("a", "b"):
    crash_point(name)
    print("passed", name, flush=True)
"""


def run(env: dict[str, str], arm: str | None, directory: Path) -> tuple[int, list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout is not None
    assert process.stdin is not None
    assert process.stdout.readline().strip() == "ready"
    if arm is not None:
        (directory / f"{arm}.{process.pid}").touch()
    out, _ = process.communicate("go\n", timeout=30)
    return process.returncode, out.split("\n")


def test_an_armed_process_dies_by_sigkill_at_its_point_and_not_before(tmp_path: Path) -> None:
    env = {**os.environ, CRASH_POINTS_VARIABLE: str(tmp_path)}
    status, lines = run(env, "b", tmp_path)
    assert status == -signal.SIGKILL
    assert "passed a" in lines
    assert "passed b" not in lines
    assert list(tmp_path.iterdir()) == []  # the arming file is used up


def test_without_the_variable_an_armed_file_changes_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != CRASH_POINTS_VARIABLE}
    status, lines = run(env, "a", tmp_path)
    assert status == 0
    assert "passed a" in lines
    assert "passed b" in lines
