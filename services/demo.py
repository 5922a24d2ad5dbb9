"""``saga demo``: place orders through the four reference services and check them.

Starts a Kafka-protocol broker on a free loopback port (unless given one),
creates one database per service (SQLite files unless given PostgreSQL),
runs the services with their relays, places the orders, waits until every
saga has ended, then checks the services against each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from saga import (
    ConfigurationError,
    EmbeddedBroker,
    KafkaSettings,
    ObserverSettings,
    RelaySettings,
    SagaError,
    SagaObserver,
    SagaStatus,
    ServiceSettings,
    create_engine,
    ensure_topics,
    saga_status,
    trace_from_log,
)

from . import SAGA
from .scenarios import OrderRequest, Scenario, order_for, scenario_of
from .shop import SERVICES, TERMINAL, Shop, describe


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What ``saga demo`` was asked to do."""

    orders: int = 100
    database_url: str | None = None
    bootstrap_servers: str | None = None
    directory: str | None = None
    deadline: float = 10.0
    timeout: float = 120.0
    json: bool = False


DEMO_MARK = "made by saga demo, which may drop it"
"""The comment on every PostgreSQL database the demo creates: only these does it drop."""


def database_urls(options: DemoOptions, directory: Path) -> dict[str, str]:
    """One database per service: SQLite files, or PostgreSQL databases made from one URL.

    PostgreSQL databases are named ``<name>_<service>`` after the URL's
    database name. The demo drops and re-creates only the databases that it
    created itself, which it marks with :data:`DEMO_MARK`; it refuses to touch
    any other.

    Raises:
        ConfigurationError: The URL is not a PostgreSQL URL with a database
            name, or a database of that name exists and the demo did not make it.
        SagaError: The PostgreSQL server cannot be reached or refuses the demo.
    """
    if options.database_url is None:
        return {name: f"sqlite+aiosqlite:///{directory / name}.db" for name in SERVICES}
    base = postgresql_url(options.database_url)
    names = {service: f"{base.database}_{service}" for service in SERVICES}
    admin = base.set(drivername="postgresql", database="postgres")
    try:
        with psycopg.connect(
            admin.render_as_string(hide_password=False), autocommit=True, connect_timeout=10
        ) as conn:
            _refuse_foreign_databases(conn, list(names.values()))
            for database in names.values():
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
                conn.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(database), sql.Literal(DEMO_MARK)
                    )
                )
    except psycopg.Error as exc:
        where = f"{base.host or 'localhost'}:{base.port or 5432}"
        raise SagaError(f"PostgreSQL at {where}: {exc}") from exc
    return {
        service: base.set(drivername="postgresql+psycopg", database=database).render_as_string(
            hide_password=False
        )
        for service, database in names.items()
    }


DEMO_APPLICATION_ID = 0x53414741
"""``PRAGMA application_id`` of every SQLite file the demo creates ("SAGA"): only
these does it remove when it runs again in the same ``--directory``."""


def fresh_sqlite_files(directory: Path, names: Iterable[str]) -> None:
    """Make ``<name>.db`` in ``directory`` a new, empty SQLite file for each name.

    A file an earlier demo made there (marked with :data:`DEMO_APPLICATION_ID`)
    is removed with its WAL files: the demo runs again on a fresh shop, as it
    does on the PostgreSQL databases it created. Any other file of those names
    (a database of someone else's, a symlink, WAL files without their
    database) is left alone, and so is everything else: nothing is removed.

    Raises:
        ConfigurationError: A file of one of those names is not the demo's.
    """
    files = {
        directory / f"{name}.db": [directory / f"{name}.db{end}" for end in ("", "-wal", "-shm")]
        for name in names
    }
    foreign = sorted(
        path.name
        for path, group in files.items()
        if any(f.exists() or f.is_symlink() for f in group) and not _made_by_demo(path)
    )
    if foreign:
        raise ConfigurationError(
            f"refusing to remove {', '.join(foreign)} in {directory}: saga demo did not "
            f"create {'it' if len(foreign) == 1 else 'them'}; give --directory another directory"
        )
    for path, group in files.items():
        for leftover in group:
            leftover.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute(f"PRAGMA application_id = {DEMO_APPLICATION_ID}")
            conn.commit()


def _made_by_demo(path: Path) -> bool:
    """Whether ``path`` is a SQLite file the demo made: read from its header, the file
    neither opened by SQLite (which would add WAL files next to a WAL database) nor
    named as a URI (a directory name with ``?`` or ``#``)."""
    if path.is_symlink() or not path.is_file():
        return False
    with path.open("rb") as file:
        header = file.read(100)
    # The header: the magic string, then at offset 68 the application id (big-endian).
    return header[:16] == b"SQLite format 3\x00" and (
        int.from_bytes(header[68:72], "big") == DEMO_APPLICATION_ID
    )


def postgresql_url(text: str) -> URL:
    """The demo's ``--database-url``: a PostgreSQL URL that names a database.

    Raises:
        ConfigurationError: It is not a URL, not PostgreSQL, or names no database.
    """
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise ConfigurationError(f"--database-url is not a database URL: {text!r}") from exc
    if url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"--database-url must be a PostgreSQL URL, not {url.get_backend_name()} "
            "(leave it out for SQLite files)"
        )
    if not url.database:
        raise ConfigurationError(
            "--database-url names no database: give one, e.g. postgresql://user@host/demo; "
            "the services get the databases demo_order, demo_inventory, ..."
        )
    return url


def _refuse_foreign_databases(conn: psycopg.Connection[Any], names: list[str]) -> None:
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname = ANY(%s)",
        (names,),
    ).fetchall()
    foreign = sorted(name for name, comment in rows if comment != DEMO_MARK)
    if foreign:
        raise ConfigurationError(
            f"refusing to drop {', '.join(foreign)}: saga demo did not create "
            f"{'it' if len(foreign) == 1 else 'them'}; give --database-url another database name"
        )


@contextlib.asynccontextmanager
async def kafka_for(options: DemoOptions) -> AsyncIterator[tuple[KafkaSettings, str]]:
    """Kafka settings: the given brokers, or an embedded broker started for the demo."""
    # Group timing: the broker holds a join for half the session timeout, and
    # the demo should not wait 5 s for its groups. The fetch wait: the demo
    # runs five consumers in one process at saturation, and with the embedded
    # broker's low-latency 5 ms each idle one asks ~200 times a second; those
    # empty fetches took half the demo's throughput (about 15-17 against
    # 7-10 sagas/s on a shared 2-core machine). 100 ms leaves the CPU to the sagas.
    tuning: dict[str, Any] = {
        "session_timeout_ms": 3000,
        "heartbeat_interval_ms": 500,
        "fetch_max_wait_ms": 100,
    }
    if options.bootstrap_servers:
        yield (
            KafkaSettings.from_env(bootstrap_servers=options.bootstrap_servers, **tuning),
            f"Kafka at {options.bootstrap_servers}",
        )
        return
    async with EmbeddedBroker() as broker:
        yield broker.kafka_settings(**tuning), f"embedded broker at {broker.bootstrap_servers}"


async def run(options: DemoOptions) -> dict[str, Any]:
    """Run the demo; return its result (counts, timing, checks)."""
    with tempfile.TemporaryDirectory(prefix="choreosaga-demo-") as scratch:
        directory = Path(options.directory or scratch)
        if await asyncio.to_thread(directory.is_file):
            raise ConfigurationError(f"--directory {directory} is a file, not a directory")
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        # The SQLite files of this run (the saga log's, the services' on SQLite).
        files = ["saga_log", *(SERVICES if options.database_url is None else ())]
        await asyncio.to_thread(fresh_sqlite_files, directory, files)
        urls = await asyncio.to_thread(database_urls, options, directory)
        storage = (
            f"SQLite in {directory}"
            + ("" if options.directory else " (removed at the end; keep it with --directory)")
            if options.database_url is None
            else "PostgreSQL databases "
            + ", ".join(make_url(u).database or "" for u in urls.values())
        )
        async with kafka_for(options) as (kafka, where):
            say(options, f"choreosaga demo: {_orders(options.orders)}, {where}, {storage}")
            settings = ServiceSettings(
                relay=RelaySettings(poll_interval=timedelta(milliseconds=500)),
                saga_topic_prefix="saga.",
            )
            with _quiet_first_contact():
                await ensure_topics(kafka, {settings.saga_topic_prefix + SAGA: 4})
            shop = Shop(
                urls=urls,
                kafka=kafka,
                settings=settings,
                deadline=timedelta(seconds=options.deadline),
                authorization_delay=timedelta(seconds=options.deadline * 1.5),
            )
            # The saga log, as `saga observe` would keep it, next to the services.
            log_url = f"sqlite+aiosqlite:///{directory / 'saga_log.db'}"
            log_engine = create_engine(log_url)
            observer = SagaObserver(
                engine=log_engine,
                kafka=kafka,
                codec=shop.codec,
                settings=ObserverSettings(
                    patterns=(settings.saga_topic_prefix + "*",), group_id="saga-demo-observer"
                ),
            )
            await observer.create_tables()
            try:
                await observer.start()
                result = await _run_shop(shop, options)
                await _add_timelines(result, observer, shop, options, directory, urls["order"])
                return result
            finally:
                await observer.stop()
                await shop.stop()
                await log_engine.dispose()


@contextlib.contextmanager
def _quiet_first_contact() -> Iterator[None]:
    """Leave an unreachable broker to the one-line error, not aiokafka's log (unless -v)."""
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    if not logging.getLogger().isEnabledFor(logging.INFO):
        kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)


async def _run_shop(shop: Shop, options: DemoOptions) -> dict[str, Any]:
    await shop.setup()
    say(options, "  starting order, inventory, payment and shipping services ...")
    await shop.start()
    orders: dict[str, tuple[OrderRequest, Scenario]] = {}
    for number in range(options.orders):
        scenario = scenario_of(number)
        request = order_for(scenario, number)
        orders[request.order_id] = (request, scenario)
    started = time.monotonic()
    await asyncio.gather(*(shop.order.place(request) for request, _ in orders.values()))
    say(options, f"  placed {_orders(len(orders))} in {time.monotonic() - started:.2f} s")
    try:
        async with asyncio.timeout(options.timeout):
            statuses = await shop.wait_terminal(len(orders), progress=not options.json)
    except TimeoutError:
        raise SagaError(not_ended(await shop.statuses(), options.timeout)) from None
    elapsed = time.monotonic() - started
    checks = await shop.check(orders)
    stamps = await shop.order.service.states.all(shop.order.engine, SAGA)
    durations = sorted(
        (s.steps[-1].at - s.started_at).total_seconds()
        for s in stamps
        if s.steps and s.reason != "deadline passed"
    )
    first_start = min(s.started_at for s in stamps)
    last_end = max(
        (s.steps[-1].at for s in stamps if s.steps and s.reason != "deadline passed"),
        default=first_start,
    )
    busy = max((last_end - first_start).total_seconds(), 1e-3)
    outcomes = Counter(
        status if status != "rejected" else f"rejected: {_label(reason)}"
        for status, reason in statuses.values()
    )
    result = {
        "orders": len(orders),
        "outcomes": dict(sorted(outcomes.items())),
        "seconds": round(elapsed, 3),
        "sagas_per_second": round(len(durations) / busy, 1),
        "sagas_without_deadline": len(durations),
        "seconds_without_deadline": round(busy, 3),
        "saga_seconds_p50": round(durations[len(durations) // 2], 3) if durations else None,
        "saga_seconds_max": round(durations[-1], 3) if durations else None,
        "deadline_seconds": options.deadline,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "ok": all(c.ok for c in checks),
    }
    if not options.json:
        await _print_report(shop, result)
    return result


def not_ended(statuses: Mapping[str, tuple[str, str | None]], timeout: float) -> str:
    """One line on the orders whose saga had not ended when the demo gave up."""
    open_orders = Counter(status for status, _ in statuses.values() if status not in TERMINAL)
    counts = ", ".join(f"{status} {count}" for status, count in sorted(open_orders.items()))
    return (
        f"{sum(open_orders.values())} of {len(statuses)} sagas had not ended after "
        f"{timeout:g} s ({counts or 'none open'}); give a longer --timeout"
    )


async def _add_timelines(
    result: dict[str, Any],
    observer: SagaObserver,
    shop: Shop,
    options: DemoOptions,
    directory: Path,
    order_url: str,
) -> None:
    """Add one saga's timeline per outcome (from the saga log) and how to see any other."""
    try:
        async with asyncio.timeout(30):
            while True:
                report = await saga_status(observer.engine)
                ended = sum(n for _, status, n in report.counts if SagaStatus(status).is_terminal)
                if ended >= result["orders"]:
                    break
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise SagaError("the saga log did not catch up with the sagas in 30 s") from None
    examples: dict[str, str] = {}
    for order_id, (status, reason) in sorted((await shop.statuses()).items()):
        label = status if status != "rejected" else f"rejected: {_label(reason)}"
        examples.setdefault(label, order_id)
    timelines = {}
    for label, order_id in sorted(examples.items()):
        trace = await trace_from_log(observer.engine, order_id)
        if trace is not None:
            timelines[label] = trace.to_dict()
    result["timelines"] = timelines
    # The richest story: a refund and a release after a shipment that could not be made.
    example = examples.get(f"rejected: {Scenario.SHIPMENT_IMPOSSIBLE.value}") or min(
        examples.values()
    )
    # PostgreSQL databases stay until the next run; SQLite files only with --directory.
    # The command is pasted into a shell: quoted, and without the password (libpq
    # takes it from PGPASSWORD or ~/.pgpass; "***" would be sent as the password).
    password_left_out = False
    if options.database_url is not None:
        order_db = make_url(order_url).set(drivername="postgresql")
        password_left_out = order_db.password is not None
        # (URL.set(password=None) would keep it: None there means "unchanged".)
        order_db_kept: str | None = order_db._replace(password=None).render_as_string(
            hide_password=False
        )
    else:
        order_db_kept = f"sqlite:///{directory / 'order.db'}" if options.directory else None
    log_kept = options.directory is not None
    result["trace_command"] = (
        f"saga trace {example} --database-url {shlex.quote(order_db_kept)}"
        if order_db_kept
        else f"saga demo --directory DIR, then: saga trace {example} "
        "--database-url sqlite:///DIR/order.db"
    )
    if not options.json:
        print()
        if order_db_kept:
            print("  see any order's story (steps as the order service knows them):")
            print(f"    {result['trace_command']}")
            if password_left_out:
                print("    (the password left out: give it in PGPASSWORD or ~/.pgpass)")
        if log_kept:
            log_db = shlex.quote(f"sqlite:///{directory / 'saga_log.db'}")
            print("  or every message of it, from the saga log the demo kept:")
            print(f"    saga trace {example} --database-url {log_db}")
        if not order_db_kept:
            print("  to see any order's story afterwards, keep the databases:")
            print(f"    {result['trace_command']}")


def _label(reason: str | None) -> str:
    for scenario in Scenario:
        if scenario.value in (reason or ""):
            return scenario.value
    return reason or "unknown"


async def _print_report(shop: Shop, result: Mapping[str, Any]) -> None:
    print()
    print(f"  {'outcome':<36} {'orders':>6}")
    for outcome, count in result["outcomes"].items():
        print(f"  {outcome:<36} {count:>6}")
    print(
        f"  {result['sagas_without_deadline']} sagas ended in "
        f"{result['seconds_without_deadline']:.2f} s: {result['sagas_per_second']} sagas/s "
        f"(each took {result['saga_seconds_p50']:.2f} s at the median, "
        f"{result['saga_seconds_max']:.2f} s at most)"
    )
    at_deadline = result["outcomes"].get(f"rejected: {Scenario.DEADLINE_PASSED.value}", 0)
    print(
        f"  all {result['orders']} ended in {result['seconds']:.2f} s"
        + (
            f", including {at_deadline} compensated at their "
            f"{result['deadline_seconds']:g} s deadline"
            if at_deadline
            else ""
        )
    )
    stamps = await shop.order.service.states.all(shop.order.engine, SAGA)
    compensated = [s for s in stamps if s.status is SagaStatus.COMPENSATED]
    if compensated:
        example = max(compensated, key=lambda s: len(s.steps))
        print()
        print(f"  timeline of compensated saga {example.saga_id}:")
        for line in describe(example):
            print(line)
    print()
    for check in result["checks"]:
        print(f"  [{'ok' if check['ok'] else 'FAILED'}] {check['name']}: {check['detail']}")
    print()
    print("  all checks passed" if result["ok"] else "  SOME CHECKS FAILED")


def _orders(count: int) -> str:
    return "1 order" if count == 1 else f"{count} orders"


def say(options: DemoOptions, line: str) -> None:
    """Print a progress line, unless the output is JSON."""
    if not options.json:
        print(line, flush=True)


def main(options: DemoOptions) -> int:
    """Run the demo and print its result; return the exit status."""
    result = asyncio.run(run(options))
    if options.json:
        print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1
