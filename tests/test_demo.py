"""``saga demo``, run as a newcomer would: a real process on the embedded default."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from saga import SagaStatus, Stamp, StepOutcome, StepRecord
from services.shop import _stamps_tell_the_story


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

    # It runs again in the directory it kept (as its closing hint suggests), on a
    # fresh shop: the earlier run's orders do not collide with the new ones.
    again = subprocess.run(
        [sys.executable, "-m", "saga", "demo", "--orders", "3", "--directory", str(kept)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "all checks passed" in again.stdout
    assert any(line.strip().startswith("all 3 ended in") for line in again.stdout.splitlines())


def test_saga_demo_leaves_a_database_it_did_not_make_alone(tmp_path: Path) -> None:
    from saga import ConfigurationError
    from services.demo import fresh_sqlite_files

    mine = tmp_path / "order.db"
    with contextlib.closing(sqlite3.connect(mine)) as conn:
        conn.execute("CREATE TABLE orders (id TEXT)")
        conn.execute("INSERT INTO orders VALUES ('precious')")
        conn.commit()
    with pytest.raises(ConfigurationError, match=r"refusing to remove order\.db"):
        fresh_sqlite_files(tmp_path, ["saga_log", "order", "payment"])
    with contextlib.closing(sqlite3.connect(mine)) as conn:
        assert conn.execute("SELECT id FROM orders").fetchall() == [("precious",)]
    assert not (tmp_path / "saga_log.db").exists()  # nothing was touched


@pytest.mark.parametrize("name", ["run#2", "what?"])
def test_saga_demo_runs_again_in_a_directory_whose_name_has_uri_characters(
    tmp_path: Path, name: str
) -> None:
    """`--directory` is a path, not a URI: the demo's own files there are its own on the
    next run (it refused them, as files it did not make), and nothing is made outside it
    (the check opened "run", read-write, next to "run#2")."""
    from services.demo import fresh_sqlite_files

    directory = tmp_path / name
    directory.mkdir()
    fresh_sqlite_files(directory, ["saga_log", "order"])
    fresh_sqlite_files(directory, ["saga_log", "order"])  # the demo run again there
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_saga_demo_refusing_a_wal_database_leaves_its_directory_as_it_was(tmp_path: Path) -> None:
    """A database of the user's in WAL mode (as the services' are), closed cleanly: the
    demo refuses it, and leaves the directory as it found it (its read-only check made
    order.db-wal and order.db-shm next to it, and left them)."""
    from saga import ConfigurationError
    from services.demo import fresh_sqlite_files

    mine = tmp_path / "order.db"
    with contextlib.closing(sqlite3.connect(mine)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE orders (id TEXT)")
        conn.commit()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["order.db"]
    with pytest.raises(ConfigurationError, match=r"refusing to remove order\.db"):
        fresh_sqlite_files(tmp_path, ["saga_log", "order"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _rejected_stamp(
    done: list[tuple[str, str, float]], undone: list[tuple[str, str, float]]
) -> Stamp:
    """A compensated saga whose deadline passed at +10 s: (service, step, seconds) each."""
    start = datetime(2026, 12, 1, tzinfo=UTC)

    def record(service: str, name: str, seconds: float, outcome: StepOutcome) -> StepRecord:
        return StepRecord(
            name=name, service=service, outcome=outcome, at=start + timedelta(seconds=seconds)
        )

    return Stamp(
        saga_name="place_order",
        saga_id="order-9",
        status=SagaStatus.COMPENSATED,
        correlation_id="c",
        started_at=start,
        deadline=start + timedelta(seconds=10),
        reason="deadline passed",
        steps=tuple(record(*step, StepOutcome.DONE) for step in done)
        + tuple(record(*step, StepOutcome.COMPENSATED) for step in undone),
    )


def test_the_demo_check_takes_compensations_in_the_order_they_ran() -> None:
    """Under load, a view merges compensations of parallel chains in the order it hears of them.

    Here the deadline passed after reserve_stock; charge_payment and
    create_shipment reported in later and were undone as the initiator saw
    them (the rule of saga.choreography), while the chain undid reserve_stock.
    The order service heard of charge_payment's undo before reserve_stock's,
    although reserve_stock was undone first: a saga compensated by the rule.
    Undoing the steps done before the deadline out of reverse order is not.
    """
    done = [
        ("inventory", "reserve_stock", 3.3),
        ("payment", "charge_payment", 21.5),
        ("shipping", "create_shipment", 21.6),
    ]
    heard_late = _rejected_stamp(
        done,
        [
            ("payment", "charge_payment", 26.3),
            ("inventory", "reserve_stock", 25.4),
            ("shipping", "create_shipment", 26.9),
        ],
    )
    check = _stamps_tell_the_story({"order-9": ("rejected", None)}, {"order-9": heard_late})
    assert check.ok, check.detail

    both_early = [("inventory", "reserve_stock", 3.3), ("payment", "charge_payment", 5.0)]
    wrong_order = _rejected_stamp(
        both_early,
        [("inventory", "reserve_stock", 12.0), ("payment", "charge_payment", 13.0)],
    )
    check = _stamps_tell_the_story({"order-9": ("rejected", None)}, {"order-9": wrong_order})
    assert not check.ok
    assert "order-9" in check.detail
