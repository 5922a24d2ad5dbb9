"""``saga demo``, run as a newcomer would: a real process on the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys

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
