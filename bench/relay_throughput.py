"""Relay throughput and latency against a raw aiokafka producer, side by side.

Run it from the project root::

    python bench/relay_throughput.py                      # embedded broker, PostgreSQL
    python bench/relay_throughput.py --database both --messages 50000
    python bench/relay_throughput.py --bootstrap-servers kafka:9092 --batch-size 100 500 1000

For every batch size and repeat, interleaved so that drift hits both sides:

* baseline: an ``AIOKafkaProducer`` with the relay's producer settings sends
  the same records pipelined, ``batch`` sends then one wait for all their
  acknowledgements, as the relay's publisher does per round;
* relay: the same records pre-inserted into a fresh outbox (insert time
  measured separately), then a :class:`outbox.Relay` started and timed until
  every row is marked published.

Then latency, one message at a time: commit of an outbox row to a consumer
receiving it (the relay woken by NOTIFY on PostgreSQL, by the in-process
commit hook on SQLite), against ``send_and_wait`` to the same consumer.

Every run uses a fresh topic (8 partitions) and fresh outbox tables, dropped
afterwards; PostgreSQL runs live in a scratch database dropped at the end.
Every timed stretch starts after a full garbage collection (see stopwatch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from common import (  # the script's directory is on sys.path when run as a script
    DEFAULT_POSTGRES_URL,
    Progress,
    ScratchDatabase,
    Topics,
    kafka_broker,
    machine_facts,
    percentile,
    rate,
    scratch_database,
    table,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxMessage,
    OutboxTables,
    PublishError,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    StoredMessage,
    create_engine,
)
from outbox.store import LeaseFence

PARTITIONS = 8
VALUE_BYTES = 200
DISTINCT_KEYS = 16
SHARDS = 16
LATENCY_WARMUP = 10
LATENCY_GAP_SECONDS = 0.005
LATENCY_TIMEOUT_SECONDS = 10.0
MESSAGE_ID_HEADER = "message-id"
DATABASES = ("postgresql", "sqlite")


# -- the workload ---------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One benchmark message, sent identically by the baseline and the relay."""

    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    message_id: str


def make_records(count: int, seed: int) -> list[Record]:
    """Return ``count`` records: 200-byte values, 16 distinct keys, 2 headers."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        records.append(
            Record(
                key=f"customer-{index % DISTINCT_KEYS:02d}".encode(),
                value=rng.randbytes(VALUE_BYTES),
                headers=(
                    (MESSAGE_ID_HEADER, message_id.encode()),
                    ("content-type", b"application/octet-stream"),
                ),
                message_id=message_id,
            )
        )
    return records


def outbox_messages(topic: str, records: Sequence[Record]) -> list[OutboxMessage]:
    """The records as outbox messages for ``topic``."""
    return [
        OutboxMessage(
            topic=topic, key=r.key, value=r.value, headers=r.headers, message_id=r.message_id
        )
        for r in records
    ]


# -- Kafka ----------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock and this process's CPU seconds of one measured stretch."""

    wall: float
    cpu: float


@contextlib.contextmanager
def stopwatch() -> Iterator[list[Timing]]:
    """Measure the ``with`` block; the yielded list holds its Timing afterwards.

    It starts with a full garbage collection, so that the measured code does
    not pay for garbage left by what ran before it: the relay's rows are
    written just before its clock starts, and the writer's objects then set off
    a full collection (tens of milliseconds) in the middle of the relay's run.
    """
    gc.collect()
    result: list[Timing] = []
    wall, cpu = time.perf_counter(), time.process_time()
    yield result
    result.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))


async def produce_pipelined(
    settings: KafkaSettings, topic: str, records: Sequence[Record], batch: int
) -> Timing:
    """Send ``records`` in rounds of ``batch`` sends and one wait for their acknowledgements."""
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        with stopwatch() as timing:
            for first in range(0, len(records), batch):
                futures = [
                    await producer.send(topic, value=r.value, key=r.key, headers=list(r.headers))
                    for r in records[first : first + batch]
                ]
                await asyncio.gather(*futures)
        return timing[0]
    finally:
        await producer.stop()


async def produce_serially(
    settings: KafkaSettings, topic: str, records: Sequence[Record]
) -> Timing:
    """Send ``records`` one ``send_and_wait`` at a time: no pipelining at all."""
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        with stopwatch() as timing:
            for r in records:
                await producer.send_and_wait(
                    topic, value=r.value, key=r.key, headers=list(r.headers)
                )
        return timing[0]
    finally:
        await producer.stop()


# -- databases ------------------------------------------------------------------


@dataclass
class PhaseClock:
    """Seconds the relay spent inside each store or publisher call."""

    fetch: float = 0.0
    publish: float = 0.0
    mark: float = 0.0
    rounds: int = 0


class TimedStore(SqlOutboxStore):
    """The SQL store, timing the relay's calls and signalling when all rows are marked."""

    def __init__(self, *args: Any, clock: PhaseClock, target: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.target = target
        self.marked = 0
        self.all_marked = asyncio.Event()

    async def fetch_due(
        self, shards: Collection[int], limit: int, *, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        started = time.perf_counter()
        try:
            return await super().fetch_due(shards, limit, exclude=exclude)
        finally:
            self.clock.fetch += time.perf_counter() - started

    async def mark_published(
        self,
        messages: Sequence[StoredMessage],
        *,
        fence: LeaseFence | None = None,
        delete: bool = False,
    ) -> int:
        started = time.perf_counter()
        try:
            marked = await super().mark_published(messages, fence=fence, delete=delete)
        finally:
            self.clock.mark += time.perf_counter() - started
        self.clock.rounds += 1
        self.marked += marked
        if self.marked >= self.target:
            self.all_marked.set()
        return marked


class TimedPublisher(KafkaPublisher):
    """The Kafka publisher, timing each batch from first send to last acknowledgement."""

    def __init__(self, settings: KafkaSettings, clock: PhaseClock) -> None:
        super().__init__(settings)
        self.clock = clock

    async def publish(self, batch: Sequence[StoredMessage]) -> list[PublishError | None]:
        started = time.perf_counter()
        try:
            return await super().publish(batch)
        finally:
            self.clock.publish += time.perf_counter() - started


@dataclass
class Outbox:
    """Fresh outbox tables on one database, for one run."""

    engine: AsyncEngine
    tables: OutboxTables

    def store(self, **kwargs: Any) -> SqlOutboxStore:
        """A plain store over these tables."""
        return SqlOutboxStore(self.engine, self.tables, shards=SHARDS, **kwargs)

    def timed_store(self, clock: PhaseClock, target: int) -> TimedStore:
        """A store that times the relay's calls."""
        return TimedStore(self.engine, self.tables, shards=SHARDS, clock=clock, target=target)


class Database:
    """A database kind (PostgreSQL or SQLite) that hands out fresh outboxes."""

    def __init__(self, kind: str, server_url: str, workdir: Path) -> None:
        self.kind = kind
        self.server_url = server_url
        self.workdir = workdir
        self.description = kind
        self._scratch: ScratchDatabase | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Database:
        if self.kind == "postgresql":
            self._scratch = await self._stack.enter_async_context(scratch_database(self.server_url))
            url = self._scratch.url
            self.description = (
                f"postgresql {self._scratch.version} at {url.host}:{url.port or 5432}, "
                f"scratch database {self._scratch.name}"
            )
        else:
            self.description = f"sqlite {sqlite3.sqlite_version} (WAL) in {self.workdir}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @contextlib.asynccontextmanager
    async def fresh_outbox(self) -> AsyncIterator[Outbox]:
        """Yield new outbox tables (and their engine), dropped afterwards."""
        suffix = uuid.uuid4().hex[:12]
        tables = OutboxTables(
            outbox=f"outbox_{suffix}",
            inbox=f"inbox_{suffix}",
            leases=f"leases_{suffix}",
            relays=f"relays_{suffix}",
        )
        if self.kind == "postgresql":
            assert self._scratch is not None
            engine = create_engine(self._scratch.url)
            path = None
        else:
            path = self.workdir / f"outbox-{suffix}.db"
            engine = create_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await tables.create_all(engine)
            yield Outbox(engine, tables)
            await tables.drop_all(engine)
        finally:
            await engine.dispose()
            if path is not None:
                for leftover in path.parent.glob(f"{path.name}*"):
                    leftover.unlink()


async def insert_rows(
    store: SqlOutboxStore, messages: Sequence[OutboxMessage], chunk: int
) -> float:
    """Write ``messages`` in transactions of ``chunk`` rows; return the seconds taken."""
    started = time.perf_counter()
    for first in range(0, len(messages), chunk):
        async with store.engine.begin() as conn:
            await store.add(conn, messages[first : first + chunk])
    return time.perf_counter() - started


@dataclass
class RelayRun:
    """One timed relay run."""

    insert_seconds: float
    relay: Timing
    clock: PhaseClock


async def relay_once(
    settings: KafkaSettings,
    outbox: Outbox,
    topic: str,
    records: Sequence[Record],
    batch: int,
    insert_chunk: int,
    *,
    delete: bool = False,
) -> RelayRun:
    """Insert the records, then time a relay from start until every row is marked.

    With ``delete``, the relay keeps no published rows (``retention`` zero):
    its mark statement deletes them.
    """
    messages = outbox_messages(topic, records)
    insert_seconds = await insert_rows(outbox.store(), messages, insert_chunk)
    clock = PhaseClock()
    store = outbox.timed_store(clock, target=len(messages))
    publisher = TimedPublisher(settings, clock)
    relay_settings = RelaySettings(batch_size=batch)
    if delete:
        relay_settings = replace(relay_settings, retention=timedelta(0))
    relay = Relay(store, publisher, relay_settings)
    timeout = max(60.0, len(messages) / 500)
    try:
        # Connected before the clock starts, as the baseline's producer is.
        await publisher.start()
        with stopwatch() as timing:
            await relay.start()
            await asyncio.wait_for(store.all_marked.wait(), timeout)
    finally:
        await relay.stop()
        await publisher.stop()  # already stopped by the relay unless it never started
    stats = await store.stats()
    kept = 0 if delete else len(messages)
    if store.marked != len(messages) or stats.published != kept or stats.pending or stats.parked:
        raise RuntimeError(f"relay left the outbox inconsistent: {stats}, {store.marked} marked")
    return RelayRun(insert_seconds, timing[0], clock)


# -- latency --------------------------------------------------------------------


class Receiver:
    """A consumer on every partition of a topic, resolving one future per message id."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        options = settings.with_options(fetch_max_wait_ms=10).consumer_kwargs(group_id=None)
        self._consumer = AIOKafkaConsumer(**options)
        self._topic = topic
        self._waiting: dict[str, asyncio.Future[float]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Receiver:
        await self._consumer.start()
        partitions = [TopicPartition(self._topic, p) for p in range(PARTITIONS)]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def expect(self, message_id: str) -> asyncio.Future[float]:
        """Return a future that gets the ``perf_counter()`` at which the message arrives."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = future
        return future

    async def _run(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=1000)
            now = time.perf_counter()
            for records in fetched.values():
                for record in records:
                    headers = dict(record.headers)
                    message_id = headers.get(MESSAGE_ID_HEADER, b"").decode()
                    future = self._waiting.pop(message_id, None)
                    if future is not None and not future.done():
                        future.set_result(now)


async def baseline_latency(
    settings: KafkaSettings, topic: str, records: Sequence[Record]
) -> list[float]:
    """Seconds from ``send_and_wait`` to receipt, one message at a time."""
    samples = []
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        async with Receiver(settings, topic) as receiver:
            for r in records:
                arrived = receiver.expect(r.message_id)
                started = time.perf_counter()
                await producer.send_and_wait(
                    topic, value=r.value, key=r.key, headers=list(r.headers)
                )
                samples.append(await asyncio.wait_for(arrived, LATENCY_TIMEOUT_SECONDS) - started)
                await asyncio.sleep(LATENCY_GAP_SECONDS)
    finally:
        await producer.stop()
    return samples[LATENCY_WARMUP:]


async def relay_latency(
    settings: KafkaSettings, outbox: Outbox, kind: str, topic: str, records: Sequence[Record]
) -> list[float]:
    """Seconds from an outbox row's commit to its receipt, one row at a time."""
    relay_store = outbox.store()
    # On PostgreSQL the writer is a separate store, as in another process, so
    # only NOTIFY can wake the relay; SQLite has no NOTIFY, so the writer
    # shares the relay's store and wakes it through the in-process commit hook.
    writer = outbox.store() if kind == "postgresql" else relay_store
    samples = []
    async with (
        Receiver(settings, topic) as receiver,
        Relay(relay_store, KafkaPublisher(settings), RelaySettings(batch_size=100)),
    ):
        for message in outbox_messages(topic, records):
            arrived = receiver.expect(message.message_id)
            async with outbox.engine.connect() as conn:
                async with conn.begin():
                    await writer.add(conn, [message])
                committed = time.perf_counter()
            samples.append(await asyncio.wait_for(arrived, LATENCY_TIMEOUT_SECONDS) - committed)
            await asyncio.sleep(LATENCY_GAP_SECONDS)
    return samples[LATENCY_WARMUP:]


# -- reporting ------------------------------------------------------------------


def relay_path(kind: str, delete: bool) -> str:
    """The name of a relay path in the tables: its database, and ``delete`` if it keeps no rows."""
    return f"{kind}, delete" if delete else kind


@dataclass
class Results:
    """Everything measured, keyed by batch size and database."""

    baseline: dict[int, list[Timing]] = field(default_factory=dict)
    serial: list[Timing] = field(default_factory=list)
    relay: dict[tuple[int, str], list[RelayRun]] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)


def _throughput_table(args: argparse.Namespace, paths: Sequence[str], results: Results) -> str:
    n = args.messages
    serial = (
        statistics.median(rate(args.serial_messages, t.wall) for t in results.serial)
        if results.serial
        else None
    )
    header = ["batch", "pipelined msg/s"]
    if serial is not None:
        header.append("send_and_wait msg/s")
    for path in paths:
        header += [f"relay[{path}] msg/s", "/pipelined"]
        if serial is not None:
            header.append("/send_and_wait")
    rows = []
    for batch in args.batch_size:
        base = statistics.median(rate(n, t.wall) for t in results.baseline[batch])
        row = [str(batch), f"{base:,.0f}"]
        if serial is not None:
            row.append(f"{serial:,.0f}")
        for path in paths:
            relay = statistics.median(rate(n, r.relay.wall) for r in results.relay[batch, path])
            row += [f"{relay:,.0f}", f"{relay / base:.2f}"]
            if serial is not None:
                row.append(f"{relay / serial:.1f}")
        rows.append(row)
    lines = [
        f"Throughput: median of {args.repeat} runs, {n:,} messages each "
        f"(send_and_wait: {args.serial_messages:,} messages, one at a time, any batch)",
        table(header, rows),
    ]
    return "\n".join(lines)


def _detail_table(args: argparse.Namespace, paths: Sequence[str], results: Results) -> str:
    n = args.messages
    rows = []
    for batch in args.batch_size:
        baseline = results.baseline[batch]
        rounds = -(-n // batch)
        base_round = statistics.median(t.wall for t in baseline) / rounds
        base_cpu = statistics.median(t.cpu for t in baseline) / n
        rows.append(
            [
                "baseline",
                str(batch),
                "",
                f"{base_round * 1000:.1f}",
                "",
                "",
                "",
                str(rounds),
                f"{base_cpu * 1e6:.0f}",
            ]
        )
        for path in paths:
            runs = results.relay[batch, path]

            def phase(name: str, runs: list[RelayRun] = runs) -> str:
                per_round = statistics.median(
                    getattr(r.clock, name) / max(r.clock.rounds, 1) for r in runs
                )
                share = statistics.median(getattr(r.clock, name) / r.relay.wall for r in runs)
                return f"{per_round * 1000:.1f} ({share:.0%})"

            per_round = statistics.median(r.relay.wall / max(r.clock.rounds, 1) for r in runs)
            rows.append(
                [
                    f"relay[{path}]",
                    str(batch),
                    f"{statistics.median(rate(n, r.insert_seconds) for r in runs):,.0f}",
                    f"{per_round * 1000:.1f}",
                    phase("fetch"),
                    phase("publish"),
                    phase("mark"),
                    str(statistics.median_low(r.clock.rounds for r in runs)),
                    f"{statistics.median(r.relay.cpu for r in runs) / n * 1e6:.0f}",
                ]
            )
    header = [
        "path",
        "batch",
        "insert rows/s",
        "ms/round",
        "fetch ms",
        "publish ms",
        "mark ms",
        "rounds",
        "cpu us/msg",
    ]
    return "\n".join(
        [
            "Where the time goes: medians per round, with the share of the whole run.",
            f"insert = rows/s written to the outbox in transactions of {args.insert_chunk} rows "
            "(paid by",
            "writers, outside the relay's time); cpu = this Python process's CPU per message.",
            table(header, rows),
        ]
    )


def _latency_table(args: argparse.Namespace, results: Results) -> str:
    rows = []
    for path, samples in results.latency.items():
        millis = [s * 1000 for s in samples]
        rows.append(
            [
                path,
                str(len(millis)),
                f"{percentile(millis, 0.5):.2f}",
                f"{percentile(millis, 0.99):.2f}",
                f"{max(millis):.2f}",
            ]
        )
    return "\n".join(
        [
            "Latency: one message at a time, commit (relay) or send (baseline) until a consumer",
            f"with fetch_max_wait_ms=10 has it; ms, {args.repeat} runs pooled",
            table(["path", "samples", "p50", "p99", "max"], rows),
        ]
    )


def report(args: argparse.Namespace, paths: Sequence[str], results: Results) -> str:
    """Render the result tables."""
    parts = [_throughput_table(args, paths, results), _detail_table(args, paths, results)]
    if results.latency:
        parts.append(_latency_table(args, results))
    return "\n\n".join(parts)


def workload_facts(
    settings: KafkaSettings, dbs: Sequence[Database], args: argparse.Namespace
) -> str:
    """The machine, versions and workload, as printed before the figures."""
    producer = settings.producer_kwargs()
    return machine_facts(
        "choreosaga relay throughput benchmark",
        broker=args.broker_description,
        postgres_url=args.database_url if args.database != "sqlite" else None,
        extra=[
            *(("database", db.description) for db in dbs),
            (
                "producer",
                f"acks={producer['acks']}, linger_ms={producer['linger_ms']}, "
                f"idempotence={'on' if producer['enable_idempotence'] else 'off'} "
                "(same settings for the baseline and the relay)",
            ),
            (
                "workload",
                f"{args.messages:,} messages of {VALUE_BYTES} B, {DISTINCT_KEYS} keys, "
                f"2 headers, {PARTITIONS} partitions, relay shards {SHARDS}, "
                f"repeat {args.repeat}, batch sizes {', '.join(map(str, args.batch_size))}, "
                f"send_and_wait baseline on {args.serial_messages:,} messages",
            ),
        ],
    )


# -- main -----------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    """Run every measurement and print the tables."""
    kinds = DATABASES if args.database == "both" else (args.database,)
    modes = (False, True) if args.published == "both" else (args.published == "delete",)
    paths = [relay_path(kind, delete) for kind in kinds for delete in modes]
    records = make_records(args.messages, seed=1)
    serial_records = records[: args.serial_messages]
    latency_records = make_records(args.latency_samples + LATENCY_WARMUP, seed=2)
    results = Results()
    steps_per_repeat = len(args.batch_size) * (1 + len(paths)) + (1 if args.serial_messages else 0)
    steps_per_repeat += (1 + len(kinds)) if args.latency_samples else 0
    progress = Progress(args.repeat * steps_per_repeat)
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as workdir:
        async with contextlib.AsyncExitStack() as stack:
            overrides = {} if args.linger_ms is None else {"linger_ms": args.linger_ms}
            settings, args.broker_description = await stack.enter_async_context(
                kafka_broker(args.bootstrap_servers, **overrides)
            )
            topics = await stack.enter_async_context(Topics(settings, PARTITIONS))
            dbs = [
                await stack.enter_async_context(Database(kind, args.database_url, Path(workdir)))
                for kind in kinds
            ]
            print(workload_facts(settings, dbs, args), flush=True)
            print(flush=True)
            for repeat in range(1, args.repeat + 1):
                if args.serial_messages:
                    async with topics.fresh("serial") as topic:
                        timing = await produce_serially(settings, topic, serial_records)
                    results.serial.append(timing)
                    progress.step(
                        f"run {repeat}: send_and_wait "
                        f"{rate(len(serial_records), timing.wall):,.0f}/s"
                    )
                for batch in args.batch_size:
                    async with topics.fresh("baseline") as topic:
                        timing = await produce_pipelined(settings, topic, records, batch)
                    results.baseline.setdefault(batch, []).append(timing)
                    progress.step(
                        f"run {repeat} batch {batch}: baseline "
                        f"{rate(len(records), timing.wall):,.0f}/s"
                    )
                    for db, delete in ((db, delete) for db in dbs for delete in modes):
                        path = relay_path(db.kind, delete)
                        async with topics.fresh("relay") as topic, db.fresh_outbox() as outbox:
                            done = await relay_once(
                                settings,
                                outbox,
                                topic,
                                records,
                                batch,
                                args.insert_chunk,
                                delete=delete,
                            )
                        results.relay.setdefault((batch, path), []).append(done)
                        progress.step(
                            f"run {repeat} batch {batch}: relay[{path}] "
                            f"{rate(len(records), done.relay.wall):,.0f}/s "
                            f"(insert {rate(len(records), done.insert_seconds):,.0f} rows/s)"
                        )
                if args.latency_samples:
                    async with topics.fresh("latency") as topic:
                        samples = await baseline_latency(settings, topic, latency_records)
                    results.latency.setdefault("baseline send_and_wait", []).extend(samples)
                    progress.step(f"run {repeat}: latency baseline")
                    for db in dbs:
                        wake = "NOTIFY" if db.kind == "postgresql" else "in-process wake"
                        async with topics.fresh("latency") as topic, db.fresh_outbox() as outbox:
                            samples = await relay_latency(
                                settings, outbox, db.kind, topic, latency_records
                            )
                        results.latency.setdefault(f"relay[{db.kind}] {wake}", []).extend(samples)
                        progress.step(f"run {repeat}: latency relay[{db.kind}]")
    print(report(args, paths, results), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[100, 500, 2000],
        help="relay batch sizes (and baseline send rounds) to compare",
    )
    parser.add_argument(
        "--serial-messages",
        type=int,
        default=2000,
        help="messages for the send_and_wait baseline (one at a time; 0 skips it)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--bootstrap-servers", help="use this Kafka instead of starting an embedded broker"
    )
    parser.add_argument(
        "--database",
        choices=[*DATABASES, "both"],
        default="postgresql",
        help="outbox database for the relay runs",
    )
    parser.add_argument(
        "--published",
        choices=["keep", "delete", "both"],
        default="both",
        help="what the relay does with published rows: keeps them (the default "
        "retention) or deletes them (retention zero)",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_POSTGRES_URL,
        help="PostgreSQL server on which a scratch database is created and dropped",
    )
    parser.add_argument(
        "--insert-chunk", type=int, default=500, help="outbox rows per writer transaction"
    )
    parser.add_argument(
        "--latency-samples",
        type=int,
        default=200,
        help="latency samples per path and run (0 skips the latency measurement)",
    )
    parser.add_argument(
        "--linger-ms", type=int, help="override the producer's linger_ms (both sides)"
    )
    args = parser.parse_args(argv)
    for name in ("messages", "repeat", "insert_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(b < 1 for b in args.batch_size):
        parser.error("--batch-size values must be at least 1")
    if args.serial_messages < 0 or args.serial_messages > args.messages:
        parser.error("--serial-messages must be between 0 and --messages")
    if args.latency_samples < 0:
        parser.error("--latency-samples must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
