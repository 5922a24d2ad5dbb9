"""The step transaction at volume: its cost with a million rows in the tables against empty ones.

Run it from the project root::

    python bench/volume.py                      # 1,000,000 rows per table, 2,000 steps each
    python bench/volume.py --rows 200000 --steps 500

A service that runs for a year must cost the same per message on day 365 as
on day 1. Two scratch PostgreSQL databases, side by side in one run:

* *empty*: the service's tables (outbox, inbox, saga views) as ``create_tables``
  makes them, nothing in them;
* *full*: the same tables with ``--rows`` rows already in each: inbox ids
  received over the inbox's 7-day retention, saga views (95% terminal, the rest
  running) last changed over the past 40 days, and published outbox rows (the
  relay's history) over its one-hour retention. They are written with
  ``generate_series`` (the measured path never is), then vacuumed and
  analysed, as autovacuum would.

A *step* is the transaction a consumer runs for one saga message, through the
library's own stores in an ``AsyncSession`` as ``saga.processing`` opens it:
``SqlInboxStore.record`` (dedupe), ``SagaStates.load`` (``FOR UPDATE``, and
an advisory lock while the view does not exist), ``merge`` and ``SagaStates.save`` (upsert), and
``SqlOutboxStore.add`` (one 200-byte event with a saga's headers), then the
commit. Each saga gets two steps: the first inserts its view, the second
updates it. Steps run one at a time, in rounds that alternate between the
two databases, so that drift on a shared machine hits both. It prints the
p50/p90/p99 milliseconds per step and the steps per second of each, the
ratios full / empty (the target: within 1.5x), the median time of each part
of the step, and the WAL written per step (from the server's WAL position:
other sessions' writes count too).

Message ids are the library's own (UUID version 7, led by the time), in the
fill as in the timed steps. ``--message-ids random`` uses random version 4
UUIDs instead, as the library did before: what a large inbox costs with
random keys (a full-page image per insert after each checkpoint) shows as
the difference.

Then one bounded purge round of terminal saga views (``SagaStates.purge``,
1,000 views, 30-day retention) is timed on the full table, to show that a
round costs its batch, not the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from common import (
    DEFAULT_POSTGRES_URL,
    Progress,
    ScratchDatabase,
    machine_facts,
    percentile,
    scratch_database,
    table,
)
from psycopg import sql
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox import OutboxMessage, OutboxTables, SqlInboxStore, SqlOutboxStore, create_engine
from outbox.message import encode_headers
from outbox.tables import create_tables
from saga import AvroCodec, SchemaRegistry
from saga.envelope import new_id
from saga.stamp import STAMP_SCHEMA, SagaStatus, Stamp
from saga.state import SagaStates, SagaView, merge

SHARDS = 16
SAGA = "place_order"
CONSUMER = "payment"
SOURCE = "/choreosaga/order"
TOPIC = "saga.place_order"
VALUE = b"v" * 200
FILL_CHUNK = 100_000
WARMUP = 50
DAY_MS = 24 * 3600 * 1000
PURGE_BATCH = 1_000
PHASES = ("inbox.record", "states.load", "merge + states.save", "outbox.add", "commit")


@dataclass
class Side:
    """One database and the library's stores on it."""

    label: str
    engine: AsyncEngine
    inbox: SqlInboxStore
    outbox: SqlOutboxStore
    states: SagaStates
    samples: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    wal_bytes: int = 0
    seconds: float = 0.0


def stamp(saga_id: str, status: SagaStatus, version: int) -> Stamp:
    return Stamp(
        saga_name=SAGA,
        saga_id=saga_id,
        status=status,
        correlation_id=str(uuid.uuid5(uuid.NAMESPACE_OID, saga_id)),
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        version=version,
    )


def headers(codec: AvroCodec, view: Stamp) -> list[tuple[str, bytes]]:
    """Headers the size of a saga event's (CloudEvents, trace context, stamp)."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", str(uuid.uuid4()).encode()),
        ("ce_type", b"example.orders.PaymentCharged"),
        ("ce_source", SOURCE.encode()),
        ("ce_time", b"2026-01-01T00:00:00.000Z"),
        ("content-type", b"avro/binary"),
        ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
        ("correlation_id", view.correlation_id.encode()),
        ("causation_id", str(uuid.uuid4()).encode()),
        ("saga_stamp", codec.encode(STAMP_SCHEMA, view.to_avro())),
    ]


async def open_side(label: str, db: ScratchDatabase, codec: AvroCodec) -> Side:
    engine = create_engine(db.url.render_as_string(hide_password=False))
    tables = OutboxTables(MetaData())
    states = SagaStates(tables.metadata, codec, dialect=engine.dialect.name)
    await create_tables(
        engine, [tables.outbox, tables.inbox, tables.leases, tables.relays, states.table]
    )
    return Side(
        label=label,
        engine=engine,
        inbox=SqlInboxStore(engine, tables),
        outbox=SqlOutboxStore(engine, tables, shards=SHARDS),
        states=states,
    )


def fill(
    db: ScratchDatabase, rows: int, codec: AvroCodec, progress: Progress, *, ordered: bool
) -> None:
    """Write ``rows`` rows into each table of ``db`` with ``generate_series``, then vacuum."""
    view = stamp("saga-0", SagaStatus.COMPLETED, 4)
    raw = codec.encode(STAMP_SCHEMA, view.to_avro())
    stored_headers = json.dumps(encode_headers(headers(codec, view)))
    statements = {
        "saga views": sql.SQL(
            """
            INSERT INTO saga_state
                (saga_id, saga_name, status, version, stamp, ended, updated_at_ms)
            SELECT 'saga-' || g, %(saga)s, s.status, 4, %(stamp)s,
                   CASE WHEN s.status = %(running)s THEN NULL ELSE s.status END,
                   %(now)s - (%(rows)s - g) * %(span)s / %(rows)s
            FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
                 LATERAL (SELECT CASE WHEN g %% 100 < 90 THEN %(completed)s
                                      WHEN g %% 100 < 93 THEN %(compensated)s
                                      WHEN g %% 100 < 95 THEN %(failed)s
                                      ELSE %(running)s END AS status) AS s
            """
        ),
        "inbox": sql.SQL(
            """
            INSERT INTO inbox (consumer, source, message_id, received_at_ms)
            SELECT %(consumer)s, %(source)s,
                   CASE WHEN %(ordered)s
                        THEN substr(lpad(to_hex(t), 12, '0'), 1, 8) || '-'
                             || substr(lpad(to_hex(t), 12, '0'), 9, 4) || '-7'
                             || substr(md5(g::text), 1, 3) || '-8'
                             || substr(md5(g::text), 4, 3) || '-'
                             || substr(md5(g::text), 7, 12)
                        ELSE gen_random_uuid()::text END,
                   t
            FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
                 LATERAL (SELECT %(now)s - (%(rows)s - g) * %(inbox_span)s / %(rows)s AS t) AS c
            """
        ),
        "published outbox rows": sql.SQL(
            """
            INSERT INTO outbox (message_id, topic, key, value, headers, shard, created_at_ms,
                                published_at_ms, attempts)
            SELECT CASE WHEN %(ordered)s
                        THEN substr(lpad(to_hex(t), 12, '0'), 1, 8) || '-'
                             || substr(lpad(to_hex(t), 12, '0'), 9, 4) || '-7'
                             || substr(md5(g::text), 1, 3) || '-8'
                             || substr(md5(g::text), 4, 3) || '-'
                             || substr(md5(g::text), 7, 12)
                        ELSE gen_random_uuid()::text END,
                   %(topic)s, convert_to('saga-' || g, 'UTF8'),
                   %(value)s, %(headers)s::json, g %% 16, t, t + 5, 0
            FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
                 LATERAL (SELECT %(now)s - (%(rows)s - g) * %(outbox_span)s / %(rows)s AS t) AS c
            """
        ),
    }
    now_ms = int(time.time() * 1000)
    params: dict[str, object] = {
        "saga": SAGA,
        "stamp": raw,
        "now": now_ms,
        "rows": rows,
        "span": 40 * DAY_MS,
        "inbox_span": 7 * DAY_MS,
        "outbox_span": 3600 * 1000,
        "consumer": CONSUMER,
        "source": SOURCE,
        "topic": TOPIC,
        "value": VALUE,
        "headers": stored_headers,
        "ordered": ordered,
        **{status.name.lower(): status.value for status in SagaStatus},
    }
    with psycopg.connect(db.libpq, autocommit=True) as conn:
        for label, statement in statements.items():
            for lo in range(1, rows + 1, FILL_CHUNK):
                hi = min(rows, lo + FILL_CHUNK - 1)
                conn.execute(statement, {**params, "lo": lo, "hi": hi})
                progress.step(f"full: {label} {hi:,}/{rows:,}")
        for name in ("saga_state", "inbox", "outbox"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(name)))
        # Flush the fill's writes now, or a checkpoint lands in the timed rounds.
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")
        progress.step("full: vacuumed, analysed, checkpointed")


def analyse(db: ScratchDatabase) -> None:
    with psycopg.connect(db.libpq, autocommit=True) as conn:
        for name in ("saga_state", "inbox", "outbox"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(name)))


def sizes(db: ScratchDatabase) -> str:
    with psycopg.connect(db.libpq, autocommit=True) as conn:
        parts = []
        for name in ("inbox", "saga_state", "outbox"):
            row = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size(%s))", (name,)
            ).fetchone()
            parts.append(f"{name} {row[0] if row else '?'}")
    return ", ".join(parts)


def message_id(ordered: bool) -> str:
    """A message id: the library's own (led by the time), or a random version 4 UUID."""
    if not ordered:
        return str(uuid.uuid4())
    return new_id()


async def step(side: Side, codec: AvroCodec, run: str, number: int, *, ordered: bool) -> float:
    """One saga message's transaction; returns its milliseconds."""
    saga_id = f"live-{run}-{number // 2}"
    first = number % 2 == 0
    incoming = stamp(saga_id, SagaStatus.RUNNING if first else SagaStatus.COMPLETED, 1 + number % 2)
    message = OutboxMessage(
        topic=TOPIC, key=saga_id.encode(), value=VALUE, headers=headers(codec, incoming)
    )
    clock = [time.perf_counter()]
    async with AsyncSession(side.engine, expire_on_commit=False) as session:
        async with session.begin():
            if not await side.inbox.record(session, CONSUMER, message_id(ordered), source=SOURCE):
                raise RuntimeError("a fresh message id was taken as a duplicate")
            clock.append(time.perf_counter())
            before = await side.states.load(session, SAGA, saga_id)
            clock.append(time.perf_counter())
            view = merge(before.stamp if before else None, incoming)
            await side.states.save(session, SagaView(stamp=view))
            clock.append(time.perf_counter())
            await side.outbox.add(session, [message])
            clock.append(time.perf_counter())
        clock.append(time.perf_counter())
    for phase, (start, end) in zip(PHASES, itertools.pairwise(clock), strict=True):
        side.phases.setdefault(phase, []).append((end - start) * 1000)
    return (clock[-1] - clock[0]) * 1000


async def measure(
    sides: Sequence[Side],
    codec: AvroCodec,
    args: argparse.Namespace,
    progress: Progress,
    wal: Callable[[], int],
) -> None:
    steps, rounds, ordered = args.steps, args.rounds, args.message_ids == "library"
    run = uuid.uuid4().hex[:8]
    for side in sides:
        for number in range(WARMUP):
            await step(side, codec, f"warm{run}", number, ordered=ordered)
        side.phases.clear()
    per_round = max(2, steps // rounds // 2 * 2)
    numbers = {side.label: 0 for side in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else list(reversed(sides))
        for side in order:
            started, lsn = time.perf_counter(), wal()
            for _ in range(per_round):
                side.samples.append(
                    await step(side, codec, run, numbers[side.label], ordered=ordered)
                )
                numbers[side.label] += 1
            side.seconds += time.perf_counter() - started
            side.wal_bytes += wal() - lsn
            progress.step(f"round {r + 1}/{rounds}: {side.label}")


async def purge_rounds(side: Side, count: int) -> list[tuple[int, float]]:
    results = []
    for _ in range(count):
        started = time.perf_counter()
        deleted = await side.states.purge(side.engine, timedelta(days=30), PURGE_BATCH)
        results.append((deleted, (time.perf_counter() - started) * 1000))
    return results


async def main(args: argparse.Namespace) -> None:
    registry = SchemaRegistry.default()
    codec = AvroCodec(registry)
    fill_steps = 3 * ((args.rows + FILL_CHUNK - 1) // FILL_CHUNK) + 1
    progress = Progress(fill_steps + 2 * args.rounds + 1)
    async with (
        scratch_database(args.database_url, prefix="bench_empty") as empty_db,
        scratch_database(args.database_url, prefix="bench_full") as full_db,
    ):
        empty = await open_side("empty", empty_db, codec)
        full = await open_side("full", full_db, codec)
        try:
            started = time.perf_counter()
            ordered = args.message_ids == "library"
            await asyncio.to_thread(
                functools.partial(fill, full_db, args.rows, codec, progress, ordered=ordered)
            )
            fill_seconds = time.perf_counter() - started
            await asyncio.to_thread(analyse, empty_db)
            full_sizes = sizes(full_db)
            with psycopg.connect(empty_db.libpq, autocommit=True) as probe:

                def wal() -> int:
                    row = probe.execute(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
                    ).fetchone()
                    return int(row[0]) if row else 0

                await measure([empty, full], codec, args, progress, wal)
            purged = await purge_rounds(full, 5)
            progress.step("purge rounds timed")
        finally:
            await empty.engine.dispose()
            await full.engine.dispose()

    print(
        machine_facts(
            "choreosaga volume benchmark: the step transaction on full tables against empty ones",
            postgres_url=args.database_url,
            extra=[
                (
                    "workload",
                    f"full: {args.rows:,} rows in each of inbox, saga_state, outbox (published), "
                    f"written in {fill_seconds:.0f}s ({full_sizes}); "
                    f"{len(full.samples):,} steps per database, {args.rounds} interleaved rounds; "
                    f"message ids {args.message_ids}",
                ),
                (
                    "step",
                    "inbox.record + states.load (FOR UPDATE; advisory lock for a new view) "
                    "+ merge + states.save + outbox.add (1 event, 200-byte value) + commit",
                ),
            ],
        )
    )
    print()
    rows = []
    for side in (empty, full):
        rows.append(
            [
                side.label,
                f"{statistics.median(side.samples):.2f} ms",
                f"{percentile(side.samples, 0.9):.2f} ms",
                f"{percentile(side.samples, 0.99):.2f} ms",
                f"{len(side.samples) / side.seconds:,.0f}",
            ]
        )
    ratio_p50 = statistics.median(full.samples) / statistics.median(empty.samples)
    ratio_p90 = percentile(full.samples, 0.9) / percentile(empty.samples, 0.9)
    ratio_rate = (len(empty.samples) / empty.seconds) / (len(full.samples) / full.seconds)
    rows.append(
        [
            "full / empty",
            f"{ratio_p50:.2f}x",
            f"{ratio_p90:.2f}x",
            "",
            f"{ratio_rate:.2f}x",
        ]
    )
    print(table(["tables", "step p50", "p90", "p99", "steps/s"], rows))
    print("  (ratios are the full tables' cost over the empty ones': for steps/s, empty / full)")
    print("\n  where a step's time goes (median ms per part):")
    parts = []
    for phase in PHASES:
        before, after = (statistics.median(side.phases[phase]) for side in (empty, full))
        parts.append([phase, f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}x"])
    print(table(["part", "empty", "full", "full / empty"], parts))
    before, after = (side.wal_bytes / len(side.samples) for side in (empty, full))
    print(
        f"\n  WAL written per step: empty {before:,.0f} bytes, full {after:,.0f} bytes "
        f"({after / before:.2f}x; the whole server's WAL while each side ran: other "
        "sessions' writes count too)"
    )
    verdict = "met" if ratio_p50 <= 1.5 and ratio_rate <= 1.5 else "MISSED"
    print(f"\n  target: full within 1.5x of empty (p50 and steps/s): {verdict}")
    print(
        f"\n  purge of terminal saga views on the full table (batch {PURGE_BATCH:,}, "
        "30-day retention), per round: "
        + ", ".join(f"{deleted:,} views in {ms:.0f} ms" for deleted, ms in purged)
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--database-url",
        default=DEFAULT_POSTGRES_URL,
        help="PostgreSQL server on which the two scratch databases are created and dropped",
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="rows already in each table (1,000,000)"
    )
    parser.add_argument("--steps", type=int, default=2_000, help="steps timed per database")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--message-ids",
        choices=("library", "random"),
        default="library",
        help="message ids: the library's UUID version 7, led by the time (default), or random "
        "version 4 UUIDs (to see what random keys cost a large inbox)",
    )
    args = parser.parse_args(argv)
    if args.rows < 1 or args.steps < 2 * args.rounds or args.rounds < 1:
        parser.error("--rows must be positive and --steps at least twice --rounds")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
