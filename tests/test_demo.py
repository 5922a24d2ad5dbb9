"""``saga demo``, run as a newcomer would: a real process on the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_saga_demo_json_on_the_embedded_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saga", "demo", "--orders", "50", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["orders"] == 50
    assert report["outcomes"] == {
        "completed": 30,
        "rejected: deadline passed": 5,
        "rejected: out of stock": 5,
        "rejected: payment declined": 5,
        "rejected: shipment impossible": 5,
    }
    assert [c["ok"] for c in report["checks"]] == [True] * 6
    assert report["sagas_per_second"] > 0


@pytest.mark.slow
def test_saga_demo_keeps_its_directory_and_mentions_deadlines_only_when_reached(
    tmp_path: Path,
) -> None:
    kept = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "saga", "demo", "--orders", "9", "--directory", str(kept)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"SQLite in {kept}" in lines[0]
    assert "removed" not in lines[0]
    (closing,) = [line for line in lines if line.strip().startswith("all 9 ended in")]
    assert "deadline" not in closing  # none of the nine orders waits for its deadline
    assert sorted(p.name for p in kept.glob("*.db")) == [
        "inventory.db",
        "order.db",
        "payment.db",
        "saga_log.db",  # the demo's saga log, for saga trace and saga status
        "shipping.db",
    ]
