"""Rows scheduled for later cost the relay's fetch nothing until they are due.

Saga deadlines are outbox rows due hours ahead; a busy service keeps many of
them. The fetch must reach the due rows without reading past the scheduled
ones. What the database does is read from its own plan: on PostgreSQL the
rows each node of ``EXPLAIN ANALYZE`` touched, on SQLite the indexes and
constraints of ``EXPLAIN QUERY PLAN``. The figures are in
``bench/scheduled_rows.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import outbox
from outbox import OutboxMessage, OutboxTables, SqlOutboxStore

SCHEDULED = 20_000
DUE = 10
PASSED = 5
SHARDS = 16


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlOutboxStore]:
    """An outbox holding many rows due tomorrow and a few due now, scheduled or not."""
    engine = outbox.create_engine(database_url)
    tables = OutboxTables()
    await tables.create_all(engine)
    store = SqlOutboxStore(engine, tables, shards=SHARDS)
    later = timedelta(days=1)
    # Deadlines that have already passed: scheduled, and due now.
    passed = [
        OutboxMessage(
            topic="saga.deadlines",
            key=f"d{i}".encode(),
            value=b"d",
            deliver_at=datetime.now(UTC) - timedelta(minutes=1),
        )
        for i in range(PASSED)
    ]
    async with engine.begin() as conn:
        await store.add(conn, passed)
    for start in range(0, SCHEDULED, 5000):
        chunk = [
            OutboxMessage(
                topic="saga.orders", key=f"o{start + i}".encode(), value=b"d", delay=later
            )
            for i in range(5000)
        ]
        async with engine.begin() as conn:
            await store.add(conn, chunk)
    ready = [OutboxMessage(topic="orders", key=f"k{i}".encode(), value=b"v") for i in range(DUE)]
    async with engine.begin() as conn:
        await store.add(conn, ready)
        await conn.execute(text("ANALYZE"))
    yield store
    await engine.dispose()


def _explain(engine: AsyncEngine, store: SqlOutboxStore, prefix: str) -> tuple[str, Any]:
    """The relay's fetch statement behind ``prefix`` (EXPLAIN ...), with its parameters."""
    compiled = store._fetch.compile(dialect=engine.dialect)
    params = {"shards": list(range(SHARDS)), "limit": 100, "exclude": []}
    state = compiled.construct_expanded_state(params)
    if state.positiontup is not None:
        return f"{prefix} {state.statement}", tuple(state.positional_parameters)
    return f"{prefix} {state.statement}", state.parameters


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def test_fetch_due_reads_only_due_rows_however_many_are_scheduled(
    store: SqlOutboxStore,
) -> None:
    fetched = await store.fetch_due(set(range(SHARDS)), 100)
    assert sorted(m.topic for m in fetched) == ["orders"] * DUE + ["saga.deadlines"] * PASSED
    assert [m.id for m in fetched] == sorted(m.id for m in fetched)

    engine = store.engine
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql, params = _explain(engine, store, "EXPLAIN (ANALYZE, FORMAT JSON)")
            explained = (await conn.exec_driver_sql(sql, params)).scalar()
            plan = (explained if isinstance(explained, list) else json.loads(explained))[0]["Plan"]
            outbox_scans = [n for n in _nodes(plan) if n.get("Relation Name") == "outbox"]
            touched = sum(
                (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
                for n in outbox_scans
            )
            # The due rows, and a few index entries around them: not the scheduled ones.
            assert touched < 10 * (DUE + PASSED), json.dumps(plan, indent=1)
        else:
            sql, params = _explain(engine, store, "EXPLAIN QUERY PLAN")
            rows = (await conn.exec_driver_sql(sql, params)).all()
            details = [str(row[-1]) for row in rows]
            outbox_reads = [d for d in details if " outbox " in f"{d} " and "parked" not in d]
            # Every read of the outbox goes through an index that leaves the
            # scheduled rows out: the ready rows' index, or the due times'
            # index searched up to now.
            assert outbox_reads, details
            for read in outbox_reads:
                assert "ix_outbox_ready" in read or (
                    "ix_outbox_scheduled (due_at_ms" in read and "due_at_ms<" in read
                ), details
