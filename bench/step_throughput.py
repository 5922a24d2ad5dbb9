"""Handler step throughput: the library's batched consumer against the physical baselines.

One step is what a service does with one incoming message: consume it from the broker,
record it in the inbox, upsert the service's state, write the emitted event to the
outbox, commit, and only then commit the Kafka offset. Three ways of doing it are
measured side by side in one run, on the same PostgreSQL server and broker, at several
batch sizes (messages per database transaction):

* **library**: a :class:`saga.Service` with one plain handler (``@service.subscribe``)
  that upserts a row of its own ``stock`` table and emits one event, with
  ``ServiceSettings.batch_max_records = batch``. The messages are produced to a
  one-partition topic before the service starts; the time runs from the start of the
  first batch to the end of the last (group join excluded; fetching included). The
  relay is off: publishing is measured by ``relay_throughput.py``.
* **raw SQL**: a plain psycopg loop doing the same transaction on the same tables, with
  the same rows: per message an inbox insert (``ON CONFLICT DO NOTHING RETURNING``), the
  state upsert and an outbox insert; ``batch`` messages per commit. No broker, no
  decoding: the physical floor of the database work.
* **dual write** (unsafe): an aiokafka consumer and psycopg: per batch, one transaction
  with the inbox insert and the state upsert, commit, then produce the emitted events
  directly with aiokafka, wait for their acknowledgements, commit the offset. A crash
  between the commit and the produce loses the events: what the outbox protects against.

Run from the project root::

    .venv/bin/python bench/step_throughput.py              # 4,000 messages, batches 1 10 50 200
    .venv/bin/python bench/step_throughput.py --messages 1000 --batch-size 200
    .venv/bin/python bench/step_throughput.py --profile    # cProfile of the library, largest batch

The target: the library at batch 200 at least 0.50 of the raw SQL loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import io
import json
import logging
import pstats
import statistics
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_POSTGRES_URL,
    Progress,
    Topics,
    kafka_broker,
    machine_facts,
    rate,
    scratch_database,
    table,
)

from outbox import KafkaSettings, OutboxTables, RelaySettings, create_engine
from saga import AvroCodec, MessageContext, SchemaRegistry, Service, ServiceSettings
from saga.envelope import Envelope, EnvelopeCodec

IN_TYPE = "choreosaga.shop.OrderPlaced"
OUT_TYPE = "choreosaga.shop.StockReserved"
KEYS = 100
"""Distinct state rows (skus) the messages update."""
SHARDS = 16
CONSUMER = "bench-step"


def codec() -> AvroCodec:
    return AvroCodec(SchemaRegistry.default())


def order(index: int) -> dict[str, Any]:
    return {
        "order_id": f"order-{index}",
        "customer": f"customer-{index % 997}",
        "sku": f"sku-{index % KEYS}",
        "quantity": 1 + index % 3,
        "amount_cents": 1000 + index,
        "card": "tok_visa_4242",
        "address": "1 Main Street, Springfield",
    }


def reserved(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "order_id": data["order_id"],
        "reservation_id": f"r-{data['order_id']}",
        "amount_cents": data["amount_cents"],
        "card": data["card"],
        "address": data["address"],
    }


def stock_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "stock",
        metadata,
        sa.Column("sku", sa.String(50), primary_key=True),
        sa.Column("reserved", sa.Integer, nullable=False),
    )


@dataclass
class Run:
    steps: int
    seconds: float
    commits: int
    statements: int = 0
    """SQL statements sent through SQLAlchemy (library only: its event counts them; a batch's
    ``SAVEPOINT`` goes to psycopg directly and is not among them)."""

    @property
    def per_second(self) -> float:
        return rate(self.steps, self.seconds)


async def produce(
    settings: KafkaSettings, topic: str, records: Sequence[tuple[bytes | None, bytes, Any]]
) -> None:
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send(topic, value, key=key, headers=list(headers), partition=0)
        await producer.flush()
    finally:
        await producer.stop()


# -- the library -------------------------------------------------------------------------


async def run_library(
    kafka: KafkaSettings,
    topics: Topics,
    server: str,
    messages: int,
    batch: int,
    profile: cProfile.Profile | None = None,
) -> Run:
    envelopes = EnvelopeCodec(codec())
    async with (
        scratch_database(server) as db,
        topics.fresh("step-in") as topic_in,
        topics.fresh("step-out") as topic_out,
    ):
        engine = create_engine(db.url, pool_size=4)
        metadata = sa.MetaData()
        stock = stock_table(metadata)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        service = Service(
            CONSUMER,
            engine=engine,
            kafka=kafka,
            codec=envelopes.codec,
            tables=OutboxTables(sa.MetaData()),
            settings=ServiceSettings(
                shards=SHARDS,
                run_relay=False,
                batch_max_records=batch,
                max_buffered_records=max(1000, 2 * batch),
                group_prefix=f"bench-{uuid.uuid4().hex[:8]}-",
                relay=RelaySettings(),
            ),
        )
        upsert = (
            sa.dialects.postgresql.insert(stock)
            .values(sku=sa.bindparam("sku"), reserved=sa.bindparam("quantity"))
            .on_conflict_do_update(
                index_elements=[stock.c.sku],
                set_={"reserved": stock.c.reserved + sa.literal_column("excluded.reserved")},
            )
        )

        @service.subscribe(topic_in, IN_TYPE)
        async def reserve(ctx: MessageContext) -> None:
            data = ctx.data
            await ctx.session.execute(upsert, {"sku": data["sku"], "quantity": data["quantity"]})
            ctx.emit(OUT_TYPE, reserved(data), topic=topic_out)

        await service.create_tables()
        # The shard rows a relay writes when it first starts: a deployment has them (without
        # them, every outbox write checks the shard count again).
        leases = service.tables.leases
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(leases),
                [
                    {"shard": shard, "owner": None, "expires_at_ms": 0, "epoch": 0}
                    for shard in range(SHARDS)
                ],
            )
        records = [
            envelopes.encode(
                Envelope(type=IN_TYPE, data=order(i), source="/bench", key=f"order-{i}".encode())
            )
            for i in range(messages)
        ]
        await produce(kafka, topic_in, records)

        commits = 0

        def count_commit(*_: Any) -> None:
            nonlocal commits
            commits += 1

        sa.event.listen(engine.sync_engine, "commit", count_commit)
        statements: dict[str, int] = {}

        def count_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if first is not None:
                verb = statement.split(None, 1)[0].upper()
                statements[verb] = statements.get(verb, 0) + 1

        sa.event.listen(engine.sync_engine, "before_cursor_execute", count_statement)
        first: float | None = None
        last = 0.0
        finished = asyncio.Event()
        processor = service.processor
        inner = processor.process_batch

        async def timed(batch_records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
            nonlocal first, last
            if first is None:
                first = time.perf_counter()
                if profile is not None:
                    profile.enable()
            await inner(batch_records)
            last = time.perf_counter()
            if service.stats.processed >= messages:
                if profile is not None:
                    profile.disable()
                finished.set()

        processor.process_batch = timed  # type: ignore[method-assign]
        async with service:
            await asyncio.wait_for(finished.wait(), timeout=max(60.0, messages / 50))
        await engine.dispose()
        assert first is not None
        if service.stats.processed != messages:
            raise RuntimeError(f"library processed {service.stats.processed} of {messages}")
        if profile is not None:
            print(f"statements by verb at batch {batch}: {statements}", file=sys.stderr)
        return Run(
            steps=messages,
            seconds=last - first,
            commits=commits,
            statements=sum(statements.values()),
        )


# -- raw SQL -------------------------------------------------------------------------------

_INBOX = (
    "INSERT INTO inbox (consumer, source, message_id, received_at_ms) VALUES "
    "(%s, %s, %s, CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)) "
    "ON CONFLICT (consumer, source, message_id) DO NOTHING RETURNING message_id"
)
_STATE = (
    "INSERT INTO stock (sku, reserved) VALUES (%s, %s) "
    "ON CONFLICT (sku) DO UPDATE SET reserved = stock.reserved + excluded.reserved"
)
_OUTBOX = (
    "INSERT INTO outbox (message_id, topic, key, value, headers, shard, created_at_ms, "
    "due_at_ms, attempts) VALUES (%s, %s, %s, %s, %s, %s, "
    "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT), NULL, 0)"
)


@dataclass(frozen=True)
class Step:
    """What one step writes, computed before the clock starts."""

    message_id: str
    sku: str
    quantity: int
    out_id: str
    out_key: bytes
    out_value: bytes
    out_headers: str
    shard: int


def prepared_steps(messages: int, topic_out: str) -> list[Step]:
    envelopes = EnvelopeCodec(codec())
    steps = []
    for i in range(messages):
        data = order(i)
        out = Envelope(
            type=OUT_TYPE, data=reserved(data), source="/bench", key=data["order_id"].encode()
        )
        key, value, headers = envelopes.encode(out)
        stored = json.dumps([[n, base64.b64encode(v).decode("ascii")] for n, v in headers])
        steps.append(
            Step(
                message_id=f"in-{i}",
                sku=data["sku"],
                quantity=data["quantity"],
                out_id=out.id,
                out_key=key or b"",
                out_value=value,
                out_headers=stored,
                shard=zlib.crc32(key or b"") % SHARDS,
            )
        )
    return steps


async def library_tables(db_url: Any) -> None:
    """The library's own tables (same columns and indexes) and the state table."""
    engine = create_engine(db_url)
    metadata = sa.MetaData()
    stock_table(metadata)
    tables = OutboxTables(metadata)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    del tables
    await engine.dispose()


async def run_raw_sql(server: str, messages: int, batch: int) -> Run:
    async with scratch_database(server) as db:
        await library_tables(db.url)
        steps = prepared_steps(messages, "bench-out")
        commits = 0
        async with await psycopg.AsyncConnection.connect(db.libpq) as conn:
            started = time.perf_counter()
            for start in range(0, messages, batch):
                async with conn.transaction(), conn.cursor() as cur:
                    for step in steps[start : start + batch]:
                        await cur.execute(_INBOX, (CONSUMER, "/bench", step.message_id))
                        if await cur.fetchone() is None:
                            continue
                        await cur.execute(_STATE, (step.sku, step.quantity))
                        await cur.execute(
                            _OUTBOX,
                            (
                                step.out_id,
                                "bench-out",
                                step.out_key,
                                step.out_value,
                                step.out_headers,
                                step.shard,
                            ),
                        )
                commits += 1
            seconds = time.perf_counter() - started
        return Run(steps=messages, seconds=seconds, commits=commits)


# -- dual write (unsafe) ------------------------------------------------------------------


async def run_dual_write(
    kafka: KafkaSettings, topics: Topics, server: str, messages: int, batch: int
) -> Run:
    envelopes = EnvelopeCodec(codec())
    async with (
        scratch_database(server) as db,
        topics.fresh("dual-in") as topic_in,
        topics.fresh("dual-out") as topic_out,
    ):
        await library_tables(db.url)
        records = [
            envelopes.encode(
                Envelope(type=IN_TYPE, data=order(i), source="/bench", key=f"order-{i}".encode())
            )
            for i in range(messages)
        ]
        await produce(kafka, topic_in, records)
        consumer = AIOKafkaConsumer(
            topic_in, **kafka.consumer_kwargs(f"bench-dual-{uuid.uuid4().hex[:8]}")
        )
        producer = AIOKafkaProducer(**kafka.producer_kwargs())
        await consumer.start()
        await producer.start()
        commits = 0
        done = 0
        started: float | None = None
        try:
            async with await psycopg.AsyncConnection.connect(db.libpq) as conn:
                while done < messages:
                    fetched = await consumer.getmany(timeout_ms=200, max_records=batch)
                    for tp, part in fetched.items():
                        if started is None:
                            started = time.perf_counter()
                        out: list[Envelope] = []
                        async with conn.transaction(), conn.cursor() as cur:
                            for record in part:
                                incoming = envelopes.decode(
                                    record.key, record.value, record.headers
                                )
                                await cur.execute(_INBOX, (CONSUMER, incoming.source, incoming.id))
                                if await cur.fetchone() is None:
                                    continue
                                data = incoming.data
                                await cur.execute(_STATE, (data["sku"], data["quantity"]))
                                out.append(
                                    Envelope(
                                        type=OUT_TYPE,
                                        data=reserved(data),
                                        source="/bench",
                                        key=record.key,
                                    )
                                )
                        commits += 1
                        acks = []
                        for envelope in out:
                            key, value, headers = envelopes.encode(envelope)
                            sent = await producer.send(
                                topic_out, value, key=key, headers=list(headers)
                            )
                            acks.append(sent)
                        await asyncio.gather(*acks)
                        await consumer.commit({tp: part[-1].offset + 1})
                        done += len(part)
            assert started is not None
            seconds = time.perf_counter() - started
        finally:
            await consumer.stop()
            await producer.stop()
        return Run(steps=messages, seconds=seconds, commits=commits)


# -- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="steps per run (default 4000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[1, 10, 50, 200],
        help="messages per transaction",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure (median)")
    parser.add_argument("--database-url", default=DEFAULT_POSTGRES_URL, help="PostgreSQL server")
    parser.add_argument("--bootstrap-servers", default=None, help="an external Kafka")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a cProfile of the library at the largest batch",
    )
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = sorted(args.batch_size)
    broker_context = kafka_broker(args.bootstrap_servers, fetch_max_wait_ms=10, linger_ms=5)
    async with broker_context as (kafka, broker):
        print(
            machine_facts(
                "Handler step throughput: library (batched consumer) vs raw SQL vs dual write",
                broker=broker,
                postgres_url=args.database_url,
                extra=[
                    (
                        "workload",
                        f"{args.messages} messages per run, one partition, {KEYS} state rows, "
                        "Avro OrderPlaced in, StockReserved out, median of "
                        f"{args.repeat} run(s)",
                    ),
                ],
            )
        )
        print()
        progress = Progress(len(sizes) * 3 * args.repeat)
        figures: dict[tuple[str, int], list[Run]] = {}
        profile = cProfile.Profile() if args.profile else None
        async with Topics(kafka, partitions=1) as topics:
            for batch in sizes:
                # Batch 1 is slow: fewer messages keep the run short, the rate is the same.
                count = args.messages if batch > 1 else max(200, args.messages // 5)
                for _ in range(args.repeat):
                    runs: list[tuple[str, Awaitable[Run]]] = [
                        ("raw", run_raw_sql(args.database_url, count, batch)),
                        (
                            "library",
                            run_library(
                                kafka,
                                topics,
                                args.database_url,
                                count,
                                batch,
                                profile if batch == sizes[-1] else None,
                            ),
                        ),
                        ("dual", run_dual_write(kafka, topics, args.database_url, count, batch)),
                    ]
                    for name, measure in runs:
                        result = await measure
                        figures.setdefault((name, batch), []).append(result)
                        progress.step(f"{name} batch {batch}: {result.per_second:,.0f} steps/s")

    def median(name: str, batch: int) -> float:
        return statistics.median(r.per_second for r in figures[(name, batch)])

    def commits(name: str, batch: int) -> str:
        run = figures[(name, batch)][0]
        return f"{run.commits:,}/{run.steps:,}"

    rows = []
    for batch in sizes:
        library, raw, dual = median("library", batch), median("raw", batch), median("dual", batch)
        rows.append(
            [
                str(batch),
                f"{library:,.0f}",
                f"{raw:,.0f}",
                f"{library / raw:.2f}",
                f"{dual:,.0f}",
                f"{library / dual:.2f}",
                commits("library", batch),
            ]
        )
    print("Steps per second (consume + inbox + state + outbox + commit)")
    print(
        table(
            [
                "batch",
                "library",
                "raw SQL",
                "library/raw",
                "dual write",
                "library/dual",
                "library commits/steps",
            ],
            rows,
        )
    )
    largest = sizes[-1]
    ratio = median("library", largest) / median("raw", largest)
    print()
    verdict = "met" if ratio >= 0.5 else "missed"
    print(f"target: library >= 0.50 of raw SQL at batch {largest}: {ratio:.2f} ({verdict})")
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
        print()
        print(f"cProfile of the library at batch {largest} (own time, top 30):")
        print(out.getvalue())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
