"""The fault suite's short version: every kind of fault, real processes, real signals.

The reference shop runs as separate processes (two order relays, two payment
instances in one group, an embedded broker) on PostgreSQL while 40 orders are
placed and every kind of fault of :mod:`.faults` is injected once, except
the PostgreSQL restart, which would break other clients of a shared server
(the soak, ``python -m tests.faults.run --pg-restart``, does it). Then nothing
may be lost, applied twice, reordered, or left unended.
"""

from __future__ import annotations

import pytest

from .faults import KINDS
from .harness import Options, run

SHORT = Options(
    seed=11,
    orders=40,
    faults=len(KINDS),
    rate=4.0,
    deadline=15.0,
    authorization_delay=17.0,
    broker_pause=(3.0, 4.0),
    long_transaction=5.0,
    heal_bound=60.0,
)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_fault_kind_loses_nothing_applies_nothing_twice_and_every_saga_ends() -> None:
    report = await run(SHORT)
    print(report.table())

    assert set(report.faults) == {*KINDS, "long_transaction"}, report.faults_not_fired
    assert report.lost == 0, report.violations
    assert report.duplicates_applied == 0, report.violations
    assert report.order_violations == 0, report.violations
    assert report.not_ended == [], report.suspended
    assert report.heal_seconds is not None
    assert report.heal_seconds <= SHORT.heal_bound
    assert report.violations == []
    assert sum(report.outcomes.values()) == SHORT.orders
