"""Our relay against the relay of ``faststream-outbox`` (PyPI), on the same PostgreSQL and broker.

Run it from the project root, after ``pip install -e '.[embedded,bench]'``::

    python bench/peer_faststream.py
    python bench/peer_faststream.py --messages 5000 --latency-samples 100

faststream-outbox is set up as its README's "outbox relay to Kafka" quick
start says: ``make_outbox_table``, an ``OutboxBroker`` on an asyncpg engine
(its LISTEN/NOTIFY wake-up needs asyncpg), a ``KafkaBroker`` publisher stacked
on an outbox subscriber whose handler returns the message, rows written with
``broker.publish(body, queue=..., session=...)``. The Kafka key travels in a
header and the handler returns ``KafkaResponse(body, key=..., headers=...)``,
so that both relays put the same records on the topic. Both sides use the
producer settings of :class:`outbox.KafkaSettings` (acks=all, linger 5 ms,
idempotence off on the embedded broker).

For each relay configuration it measures:

* throughput: the same messages (200-byte values, 16 keys, 8 partitions)
  pre-inserted, then the relay started and timed until every row is done;
* commit-to-publish latency: one row at a time, from the writer's commit to
  a consumer (``fetch_max_wait_ms=10``) having it;
* per-key order: every key's messages carry a sequence number; the topic is
  read back and each key's first deliveries are checked against commit order.

faststream-outbox is measured with its documented defaults (``max_workers=1``,
``fetch_batch_size=10``) and with two relay workers and larger fetches
(``max_workers=2``, ``fetch_batch_size=100``), the setting whose key order the
issue asks about; ours with one relay and with two relays on one outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import MetaData, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox import KafkaPublisher, KafkaSettings, Relay, RelaySettings

try:
    from faststream import Context, StreamMessage
    from faststream.kafka import KafkaBroker, KafkaResponse
    from faststream_outbox import OutboxBroker, make_outbox_table
except ImportError as exc:  # pragma: no cover - only without the bench extra
    raise SystemExit(
        f"faststream-outbox is not installed ({exc}): pip install -e '.[embedded,bench]'"
    ) from exc

from common import (  # the script's directory is on sys.path when run as a script
    DEFAULT_POSTGRES_URL,
    Progress,
    Topics,
    kafka_broker,
    machine_facts,
    package_version,
    percentile,
    rate,
    scratch_database,
    table,
)
from relay_throughput import (
    LATENCY_WARMUP,
    PARTITIONS,
    Database,
    Outbox,
    Receiver,
    Record,
    insert_rows,
    make_records,
    outbox_messages,
    relay_latency,
)

KEY_HEADER = "bench-key"
FORWARDED = ("message-id", "content-type")
_MESSAGE = Context("message")
LATENCY_GAP_SECONDS = 0.005
TIMEOUT_SECONDS = 300.0


def sequenced(records: Sequence[Record]) -> list[Record]:
    """The records with ``<key>:<seq>:`` in front of each value, for the order check."""
    seen: dict[bytes, int] = defaultdict(int)
    out = []
    for r in records:
        seq = seen[r.key]
        seen[r.key] += 1
        prefix = r.key + b":" + str(seq).encode() + b":"
        out.append(Record(r.key, prefix + r.value[len(prefix) :], r.headers, r.message_id))
    return out


# -- faststream-outbox -------------------------------------------------------------


@dataclass
class PeerConfig:
    """One configuration of the faststream-outbox relay."""

    name: str
    max_workers: int
    fetch_batch_size: int
    relays: int = 1
    """Relay processes (here: OutboxBrokers) on the same table."""


class Peer:
    """faststream-outbox's relay to Kafka, wired as its README's quick start does."""

    def __init__(
        self,
        url: str,
        settings: KafkaSettings,
        topic: str,
        config: PeerConfig,
        *,
        table: Any = None,
    ) -> None:
        self.metadata = MetaData()
        self.table = (
            make_outbox_table(self.metadata, table_name=f"fso_{uuid.uuid4().hex[:10]}")
            if table is None
            else table
        )
        self.engine: AsyncEngine = create_async_engine(url)
        # logger=None: FastStream logs two lines per message, which would measure the terminal.
        self.outbox = OutboxBroker(self.engine, outbox_table=self.table, logger=None)
        producer = settings.producer_kwargs()
        # The quick start's KafkaBroker(servers), with acks=all as on our side and
        # idempotence as the broker allows; linger_ms stays aiokafka's default (0):
        # this relay waits for each record's acknowledgement, so lingering would
        # only add to every message.
        self.kafka = KafkaBroker(
            settings.bootstrap_servers,
            acks=producer["acks"],
            enable_idempotence=producer["enable_idempotence"],
            logger=None,
        )
        self.queue = f"{topic}_outbox"
        publisher = self.kafka.publisher(topic)

        @publisher
        @self.outbox.subscriber(
            self.queue,
            max_workers=config.max_workers,
            fetch_batch_size=config.fetch_batch_size,
        )
        async def relay(body: bytes, message: StreamMessage[Any] = _MESSAGE) -> KafkaResponse:
            headers = message.headers
            return KafkaResponse(
                body,
                key=str(headers[KEY_HEADER]).encode(),
                headers={name: headers[name] for name in FORWARDED if name in headers},
            )

        self._relay = relay

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    async def drop(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all)
        await self.engine.dispose()

    async def write(self, records: Sequence[Record], chunk: int) -> None:
        """Insert rows in transactions of ``chunk`` rows, as a producer would."""
        for first in range(0, len(records), chunk):
            async with self.engine.begin() as conn:
                for r in records[first : first + chunk]:
                    await self.outbox.publish(
                        r.value,
                        queue=self.queue,
                        session=conn,
                        headers={
                            KEY_HEADER: r.key.decode(),
                            **{name: value.decode() for name, value in r.headers},
                        },
                    )

    async def left(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(self.table))).scalar())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await self.kafka.start()
        await self.outbox.start()
        try:
            yield
        finally:
            await self.outbox.stop()
            await self.kafka.stop()


# -- runs ------------------------------------------------------------------------------


@dataclass
class Run:
    """One throughput run and the order check of what it published."""

    seconds: float
    out_of_order_keys: int
    inversions: int
    duplicates: int


async def read_back(settings: KafkaSettings, topic: str, count: int) -> list[Any]:
    """Every record of ``topic`` (at least ``count``), with a short wait for extras."""
    consumer = AIOKafkaConsumer(**settings.consumer_kwargs(None))
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        records: list[Any] = []
        deadline = time.monotonic() + TIMEOUT_SECONDS
        quiet: float | None = None
        while quiet is None or time.monotonic() < quiet:
            if time.monotonic() > deadline:
                raise RuntimeError(f"read {len(records)} of {count} records from {topic}")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
            if quiet is None and len(records) >= count:
                quiet = time.monotonic() + 0.5
        return records
    finally:
        await consumer.stop()


def order_check(records: Sequence[Any]) -> tuple[int, int, int]:
    """(keys whose first deliveries are out of order, inversions, duplicate records)."""
    seen: set[bytes] = set()
    by_key: dict[bytes, list[int]] = defaultdict(list)
    duplicates = 0
    for record in records:
        if record.value in seen:
            duplicates += 1
            continue
        seen.add(record.value)
        key, seq = record.value.split(b":", 2)[:2]
        by_key[key].append(int(seq))
    inversions = sum(
        sum(1 for a, b in itertools.pairwise(seqs) if b < a) for seqs in by_key.values()
    )
    bad = sum(1 for seqs in by_key.values() if seqs != sorted(seqs))
    return bad, inversions, duplicates


async def wait_for(check: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def peer_throughput(
    url: str, settings: KafkaSettings, topics: Topics, records: Sequence[Record], config: PeerConfig
) -> Run:
    async with topics.fresh("peer") as topic:
        peer = Peer(url, settings, topic, config)
        others = [
            Peer(url, settings, topic, config, table=peer.table) for _ in range(config.relays - 1)
        ]
        await peer.create()
        try:
            await peer.write(records, 500)
            started = time.perf_counter()
            async with contextlib.AsyncExitStack() as running:
                for relay in (peer, *others):
                    await running.enter_async_context(relay.running())

                async def drained() -> bool:
                    return await peer.left() == 0

                await wait_for(drained, "faststream-outbox to drain its outbox")
                seconds = time.perf_counter() - started
            found = await read_back(settings, topic, len(records))
        finally:
            for other in others:
                await other.engine.dispose()
            await peer.drop()
    return Run(seconds, *order_check(found))


async def peer_latency(
    url: str, settings: KafkaSettings, topics: Topics, records: Sequence[Record], config: PeerConfig
) -> list[float]:
    samples = []
    async with topics.fresh("peer-latency") as topic:
        peer = Peer(url, settings, topic, config)
        await peer.create()
        try:
            async with peer.running(), Receiver(settings, topic) as receiver:
                for r in records:
                    arrived = receiver.expect(r.message_id)
                    await peer.write([r], 1)
                    committed = time.perf_counter()
                    samples.append(await asyncio.wait_for(arrived, 30) - committed)
                    await asyncio.sleep(LATENCY_GAP_SECONDS)
        finally:
            await peer.drop()
    return samples[LATENCY_WARMUP:]


async def ours_throughput(
    settings: KafkaSettings,
    topics: Topics,
    outbox: Outbox,
    records: Sequence[Record],
    relays: int,
    batch: int,
) -> Run:
    async with topics.fresh("ours") as topic:
        messages = outbox_messages(topic, records)
        await insert_rows(outbox.store(), messages, 500)
        store = outbox.store()
        started = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            for n in range(relays):
                await stack.enter_async_context(
                    Relay(
                        outbox.store(),
                        KafkaPublisher(settings),
                        RelaySettings(batch_size=batch),
                        name=f"bench-relay-{n}-{uuid.uuid4().hex[:6]}",
                    )
                )

            async def drained() -> bool:
                stats = await store.stats()
                return stats.published == len(messages)

            await wait_for(drained, "our relay to publish every row")
            seconds = time.perf_counter() - started
        found = await read_back(settings, topic, len(records))
    return Run(seconds, *order_check(found))


# -- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    records = sequenced(make_records(args.messages, seed=1))
    latency_records = sequenced(make_records(args.latency_samples + LATENCY_WARMUP, seed=2))
    configs = [
        PeerConfig("faststream-outbox, documented defaults (1 worker, fetch 10)", 1, 10),
        PeerConfig("faststream-outbox, 2 workers, fetch 100", 2, 100),
        PeerConfig("faststream-outbox, 2 relays (brokers) of 1 worker, fetch 100", 1, 100, 2),
    ]
    ours = [(1, args.batch_size), (2, args.batch_size)]
    throughput: dict[str, list[Run]] = defaultdict(list)
    latency: dict[str, list[float]] = defaultdict(list)
    steps = args.repeat * (len(configs) + len(ours)) + (
        sum(c.relays == 1 for c in configs) + 1 if args.latency_samples else 0
    )
    progress = Progress(steps)
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as workdir:
        async with contextlib.AsyncExitStack() as stack:
            settings, broker = await stack.enter_async_context(kafka_broker(args.bootstrap_servers))
            topics = await stack.enter_async_context(Topics(settings, PARTITIONS))
            db = await stack.enter_async_context(
                Database("postgresql", args.database_url, Path(workdir))
            )
            scratch = await stack.enter_async_context(scratch_database(args.database_url))
            peer_url = scratch.url.set(drivername="postgresql+asyncpg")
            peer_url_text = peer_url.render_as_string(hide_password=False)
            producer = settings.producer_kwargs()
            print(
                machine_facts(
                    "choreosaga relay against faststream-outbox's relay",
                    broker=broker,
                    postgres_url=args.database_url,
                    extra=[
                        (
                            "peer",
                            f"faststream-outbox {package_version('faststream-outbox')}, "
                            f"faststream {package_version('faststream')}, "
                            f"asyncpg {package_version('asyncpg')}",
                        ),
                        (
                            "producer",
                            f"acks={producer['acks']}, "
                            f"idempotence={'on' if producer['enable_idempotence'] else 'off'}; "
                            f"linger_ms={producer['linger_ms']} ours, 0 (aiokafka's default) "
                            "faststream-outbox",
                        ),
                        (
                            "workload",
                            f"{args.messages:,} messages of 200 B, 16 keys, 8 partitions, "
                            f"repeat {args.repeat}; ours: batch {args.batch_size}",
                        ),
                    ],
                ),
                flush=True,
            )
            print(flush=True)
            for repeat in range(1, args.repeat + 1):
                for relays, batch in ours:
                    name = f"choreosaga, {relays} relay{'s' if relays > 1 else ''}, batch {batch}"
                    async with db.fresh_outbox() as outbox:
                        done = await ours_throughput(
                            settings, topics, outbox, records, relays, batch
                        )
                    throughput[name].append(done)
                    progress.step(
                        f"run {repeat}: {name}: {rate(args.messages, done.seconds):,.0f}/s"
                    )
                for config in configs:
                    done = await peer_throughput(peer_url_text, settings, topics, records, config)
                    throughput[config.name].append(done)
                    progress.step(
                        f"run {repeat}: {config.name}: {rate(args.messages, done.seconds):,.0f}/s"
                    )
            if args.latency_samples:
                async with topics.fresh("latency") as topic, db.fresh_outbox() as outbox:
                    latency["choreosaga, 1 relay (NOTIFY)"] = await relay_latency(
                        settings, outbox, "postgresql", topic, latency_records
                    )
                progress.step("latency: choreosaga")
                for config in (c for c in configs if c.relays == 1):
                    latency[config.name] = await peer_latency(
                        peer_url_text, settings, topics, latency_records, config
                    )
                    progress.step(f"latency: {config.name}")
    print(report(args, throughput, latency), flush=True)


def report(
    args: argparse.Namespace, throughput: dict[str, list[Run]], latency: dict[str, list[float]]
) -> str:
    n = args.messages
    base_name = next(iter(throughput))
    base = statistics.median(rate(n, r.seconds) for r in throughput[base_name])
    rows = []
    for name, runs in throughput.items():
        rows.append(
            [
                name,
                f"{statistics.median(rate(n, r.seconds) for r in runs):,.0f}",
                f"{statistics.median(rate(n, r.seconds) for r in runs) / base:.2f}",
                f"{sum(r.out_of_order_keys for r in runs)}/{16 * len(runs)}",
                str(sum(r.inversions for r in runs)),
                str(sum(r.duplicates for r in runs)),
            ]
        )
    parts = [
        f"Throughput: median of {args.repeat} runs, {n:,} messages each; ratio to the first row.",
        "Order: keys whose first deliveries were out of commit order (over all runs), the",
        "number of adjacent inversions, and duplicate records on the topic.",
        table(["relay", "msg/s", "ratio", "keys out of order", "inversions", "duplicates"], rows),
    ]
    if latency:
        lat_rows = [
            [
                name,
                str(len(samples)),
                f"{percentile([s * 1000 for s in samples], 0.5):.1f}",
                f"{percentile([s * 1000 for s in samples], 0.99):.1f}",
                f"{max(samples) * 1000:.1f}",
            ]
            for name, samples in latency.items()
        ]
        parts += [
            "",
            "Commit-to-publish latency, one row at a time: commit until a consumer with",
            "fetch_max_wait_ms=10 has the record; ms.",
            table(["relay", "samples", "p50", "p99", "max"], lat_rows),
        ]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5_000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs per relay")
    parser.add_argument("--batch-size", type=int, default=500, help="our relay's batch size")
    parser.add_argument(
        "--latency-samples", type=int, default=100, help="latency samples per relay (0 skips)"
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_POSTGRES_URL,
        help="PostgreSQL server on which scratch databases are created and dropped",
    )
    parser.add_argument(
        "--bootstrap-servers", help="use this Kafka instead of starting an embedded broker"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1 or args.batch_size < 1 or args.latency_samples < 0:
        parser.error("--messages, --repeat and --batch-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
