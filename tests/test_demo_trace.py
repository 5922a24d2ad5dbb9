"""After ``saga demo``, any order's story is one command away."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


def saga(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga", *args],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_json_has_a_timeline_per_outcome_and_trace_works_on_its_databases(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "my demo"  # the printed commands quote the path
    result = saga(
        "demo", "--orders", "10", "--deadline", "4", "--directory", str(directory), "--json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    timelines = report["timelines"]
    assert set(timelines) == set(report["outcomes"])
    for outcome, trace in timelines.items():
        assert trace["terminal"] is True
        assert trace["missing_hops"] == []
        assert trace["status"] == ("COMPLETED" if outcome == "completed" else "COMPENSATED")
        assert trace["timeline"][0]["event"] == "OrderPlaced"
    refunded = timelines["rejected: shipment impossible"]
    assert [(e["step"], e["outcome"]) for e in refunded["timeline"] if e["compensation"]] == [
        ("create_shipment", "FAILED"),
        ("charge_payment", "COMPENSATED"),
        ("reserve_stock", "COMPENSATED"),
    ]
    assert timelines["rejected: deadline passed"]["reason"] == "deadline passed"
    # The deadline message is traced when it was due (4 s on), not when it was written
    # with the first event; there it starts the compensation.
    late = timelines["rejected: deadline passed"]["timeline"]
    (fired,) = [i for i, e in enumerate(late) if e["event"].startswith("DeadlineReached(due ")]
    assert late[fired]["delta_ms"] >= 4000
    assert (late[fired + 1]["service"], late[fired + 1]["compensation"]) == ("order", True)
    assert all(
        e["delta_ms"] >= 4000 for t in timelines.values() for e in t["timeline"]
        if e["event"].startswith("DeadlineReached")
    )  # fmt: skip
    assert shlex.split(report["trace_command"]) == [
        "saga", "trace", "order-00008", "--database-url", f"sqlite:///{directory / 'order.db'}"
    ]  # fmt: skip

    # The command the demo printed works on the order service's own database...
    from_order = saga(*shlex.split(report["trace_command"])[1:])
    assert from_order.returncode == 0, from_order.stderr
    assert "from the service database" in from_order.stdout
    assert "COMPENSATED: step create_shipment (shipping) failed" in from_order.stdout
    # ... and on the saga log the demo kept, with every message.
    from_log = saga(
        "trace", "order-00008", "--format", "json",
        "--database-url", f"sqlite:///{directory / 'saga_log.db'}",
    )  # fmt: skip
    assert from_log.returncode == 0, from_log.stderr
    assert json.loads(from_log.stdout) == refunded
    unknown = saga("trace", "order-99999", "--database-url", f"sqlite:///{directory / 'order.db'}")
    assert unknown.returncode == 1
    assert "no saga 'order-99999'" in unknown.stderr
