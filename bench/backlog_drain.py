"""Backlog drain: a relay publishing 100,000 outbox rows to Kafka, against a raw aiokafka loop.

Run it from the project root::

    python bench/backlog_drain.py                       # 100,000 rows, PostgreSQL, embedded broker
    python bench/backlog_drain.py --rows 20000 --relays 2

The rows (200-byte values, 16 keys, 2 headers, 8 partitions) are written to a
fresh outbox first (writer transactions of 5,000 rows, timed apart), as after
an outage of the relay or a burst of writes. Then a relay is started and timed
until every row is marked published. The baseline sends the same messages with
a raw ``AIOKafkaProducer`` (the relay's producer settings) pipelined in rounds
of the relay's batch size, one wait for the acknowledgements per round; it is
run right before the relay, on a fresh topic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from common import (  # the script's directory is on sys.path when run as a script
    DEFAULT_POSTGRES_URL,
    Progress,
    Topics,
    kafka_broker,
    machine_facts,
    rate,
    table,
)
from relay_throughput import (
    PARTITIONS,
    SHARDS,
    Database,
    insert_rows,
    make_records,
    outbox_messages,
    produce_pipelined,
)

from outbox import KafkaPublisher, Relay, RelaySettings

TIMEOUT_SECONDS = 900.0


async def run(args: argparse.Namespace) -> None:
    """Fill the outbox, drain it, and print the table."""
    records = make_records(args.rows, seed=3)
    progress = Progress(3)
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as workdir:
        async with contextlib.AsyncExitStack() as stack:
            settings, broker = await stack.enter_async_context(kafka_broker(args.bootstrap_servers))
            topics = await stack.enter_async_context(Topics(settings, PARTITIONS))
            db = await stack.enter_async_context(
                Database(args.database, args.database_url, Path(workdir))
            )
            producer = settings.producer_kwargs()
            print(
                machine_facts(
                    "choreosaga backlog drain",
                    broker=broker,
                    postgres_url=args.database_url if args.database == "postgresql" else None,
                    extra=[
                        ("database", db.description),
                        (
                            "producer",
                            f"acks={producer['acks']}, linger_ms={producer['linger_ms']}, "
                            f"idempotence={'on' if producer['enable_idempotence'] else 'off'}",
                        ),
                        (
                            "workload",
                            f"{args.rows:,} rows of 200 B, 16 keys, 2 headers, "
                            f"{PARTITIONS} partitions, relay shards {SHARDS}, "
                            f"batch {args.batch_size}, {args.relays} relay(s)",
                        ),
                    ],
                ),
                flush=True,
            )
            print(flush=True)
            async with topics.fresh("drain-baseline") as topic:
                baseline = await produce_pipelined(settings, topic, records, args.batch_size)
            progress.step(f"baseline: {rate(args.rows, baseline.wall):,.0f}/s")
            async with topics.fresh("drain") as topic, db.fresh_outbox() as outbox:
                messages = outbox_messages(topic, records)
                insert_seconds = await insert_rows(outbox.store(), messages, args.insert_chunk)
                progress.step(f"outbox filled: {rate(args.rows, insert_seconds):,.0f} rows/s")
                store = outbox.store()
                started = time.perf_counter()
                async with contextlib.AsyncExitStack() as relays:
                    for n in range(args.relays):
                        await relays.enter_async_context(
                            Relay(
                                outbox.store(),
                                KafkaPublisher(settings),
                                RelaySettings(batch_size=args.batch_size),
                                name=f"drain-{n}-{uuid.uuid4().hex[:6]}",
                            )
                        )
                    deadline = started + TIMEOUT_SECONDS
                    while True:
                        stats = await store.stats()
                        if stats.published == args.rows:
                            break
                        if time.perf_counter() > deadline:
                            raise RuntimeError(f"the relay did not drain the outbox: {stats}")
                        await asyncio.sleep(0.05)
                    drained = time.perf_counter() - started
                    if stats.pending or stats.parked:
                        raise RuntimeError(f"relay left the outbox inconsistent: {stats}")
            progress.step(f"relay: {rate(args.rows, drained):,.0f}/s")
    relay_rate, base_rate = rate(args.rows, drained), rate(args.rows, baseline.wall)
    print(
        "\n".join(
            [
                f"Backlog drain: {args.rows:,} rows (time from relay start until every row is "
                "marked;",
                "baseline: the same messages from a raw aiokafka producer, pipelined in rounds "
                f"of {args.batch_size})",
                table(
                    ["path", "seconds", "rows/s", "ratio"],
                    [
                        ["raw aiokafka", f"{baseline.wall:.2f}", f"{base_rate:,.0f}", "1.00"],
                        [
                            f"relay x{args.relays} [{args.database}]",
                            f"{drained:.2f}",
                            f"{relay_rate:,.0f}",
                            f"{relay_rate / base_rate:.2f}",
                        ],
                    ],
                ),
                f"  (outbox filled beforehand at {rate(args.rows, insert_seconds):,.0f} rows/s, "
                f"in transactions of {args.insert_chunk} rows; not part of the drain)",
            ]
        ),
        flush=True,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="outbox rows to drain")
    parser.add_argument("--batch-size", type=int, default=500, help="relay batch size")
    parser.add_argument("--relays", type=int, default=1, help="relays draining the outbox")
    parser.add_argument(
        "--database", choices=["postgresql", "sqlite"], default="postgresql", help="outbox database"
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_POSTGRES_URL,
        help="PostgreSQL server on which a scratch database is created and dropped",
    )
    parser.add_argument(
        "--insert-chunk", type=int, default=5_000, help="outbox rows per writer transaction"
    )
    parser.add_argument(
        "--bootstrap-servers", help="use this Kafka instead of starting an embedded broker"
    )
    args = parser.parse_args(argv)
    if min(args.rows, args.batch_size, args.relays, args.insert_chunk) < 1:
        parser.error("--rows, --batch-size, --relays and --insert-chunk must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
