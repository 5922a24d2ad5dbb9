"""The ``saga`` command line.

``saga demo``           run the reference shop saga end to end and check it
``saga relay``          publish a service's outbox to Kafka (a standalone relay process)
``saga schemas check``  check that every schema version can read the earlier ones
``saga outbox``         list parked outbox rows, or release them for another try
``saga observe``, ``saga trace``, ``saga status``: see :mod:`saga.observe.cli`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import make_url

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxError,
    OutboxTables,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    create_engine,
)
from saga.errors import SagaError
from saga.observe import cli as observe_cli
from saga.schemas import SchemaRegistry, check_directory
from saga.telemetry import configure_from_env, instrument_relay

__all__ = ["main"]


def _relay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "relay",
        help="publish a database's outbox to Kafka until stopped (SIGTERM/SIGINT)",
        description="Publish committed outbox rows to Kafka. Several relays may run "
        "against one database; they share the shards and keep per-key order.",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="database holding the outbox (default: $DATABASE_URL)",
    )
    p.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka brokers (default: $KAFKA_BOOTSTRAP_SERVERS, then localhost:9092)",
    )
    p.add_argument("--name", default=None, help="relay instance name (default: host:pid:random)")
    p.add_argument("--outbox-table", default="outbox", help="outbox table name")
    p.add_argument("--shards", type=int, default=16, help="key-hash shards of the outbox")
    p.add_argument("--batch-size", type=int, default=500, help="rows per publish round")
    p.add_argument("--lease-ttl", type=float, default=10.0, help="shard lease, in seconds")
    p.add_argument("--poll-interval", type=float, default=1.0, help="fallback poll, in seconds")
    p.add_argument(
        "--create-tables", action="store_true", help="create the outbox tables if missing"
    )
    p.add_argument(
        "--stats-json",
        action="store_true",
        help="print the relay's counters as one JSON line when it stops",
    )


async def _run_relay(args: argparse.Namespace) -> int:
    if not args.database_url:
        raise SagaError("give --database-url or set DATABASE_URL")
    kafka = KafkaSettings.from_env(
        **({"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {})
    )
    settings = RelaySettings(
        batch_size=args.batch_size,
        lease_ttl=timedelta(seconds=args.lease_ttl),
        poll_interval=timedelta(seconds=args.poll_interval),
    )
    engine = create_engine(args.database_url)
    tables = OutboxTables(outbox=args.outbox_table)
    if args.create_tables:
        await tables.create_all(engine)
    store = SqlOutboxStore(engine, tables, shards=args.shards)
    relay = Relay(store, KafkaPublisher(kafka), settings, name=args.name)
    if configure_from_env("choreosaga-relay"):  # OTEL_EXPORTER_OTLP_* is set
        instrument_relay(relay)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logging.getLogger(__name__).info(
        "relay %s publishing to %s", relay.name, kafka.bootstrap_servers
    )
    async with relay:
        await stop.wait()
    await engine.dispose()
    if args.stats_json:
        stats = relay.stats
        print(
            json.dumps(
                {
                    "name": relay.name,
                    "published": stats.published,
                    "parked": stats.parked,
                    "failed_attempts": stats.failed_attempts,
                    "batches": stats.batches,
                }
            ),
            flush=True,
        )
    return 0


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="place orders through the reference services and check the outcome",
        description="Start a local Kafka-protocol broker (unless --bootstrap-servers), "
        "one database per service (SQLite unless --database-url), the order, inventory, "
        "payment and shipping services with their relays; place orders with a mix of "
        "outcomes, wait until every saga ended, print a summary and check the services "
        "against each other. Exits 1 if a check fails.",
    )
    p.add_argument("--orders", type=int, default=100, help="orders to place (default 100)")
    p.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL URL; each service gets the database <name>_<service> "
        "(dropped and re-created). Default: SQLite files in a temporary directory",
    )
    p.add_argument(
        "--bootstrap-servers", default=None, help="use this Kafka instead of an embedded broker"
    )
    p.add_argument("--directory", default=None, help="keep the SQLite files in this directory")
    p.add_argument(
        "--deadline", type=float, default=10.0, help="saga deadline in seconds (default 10)"
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="give up waiting after this many seconds"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_demo(args: argparse.Namespace) -> int:
    if args.orders < 1:
        raise SagaError("--orders must be at least 1")
    if args.deadline <= 0:
        raise SagaError("--deadline must be positive")
    from services.demo import DemoOptions
    from services.demo import main as demo_main

    return demo_main(
        DemoOptions(
            orders=args.orders,
            database_url=args.database_url,
            bootstrap_servers=args.bootstrap_servers,
            directory=args.directory,
            deadline=args.deadline,
            timeout=args.timeout,
            json=args.json,
        )
    )


def _outbox_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "outbox",
        help="inspect an outbox: counts, parked rows; retry parked rows",
        description="Rows the relay could not publish (too large, invalid topic, ...) are "
        "parked with their error; later rows of the same key wait behind them. Fix the "
        "cause, then retry them.",
    )
    p.add_argument("action", choices=("stats", "parked", "retry"), help="what to do")
    p.add_argument(
        "message_ids", nargs="*", help="with retry: only these message ids (default: all)"
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="database holding the outbox (default: $DATABASE_URL)",
    )
    p.add_argument("--outbox-table", default="outbox", help="outbox table name")


def _existing_database(database_url: str | None) -> str:
    if not database_url:
        raise SagaError("give --database-url or set DATABASE_URL")
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise SagaError(f"no SQLite database at {url.database}")
    return database_url


async def _run_outbox(args: argparse.Namespace) -> int:
    engine = create_engine(args.database_url)
    store = SqlOutboxStore(engine, OutboxTables(outbox=args.outbox_table))
    try:
        if args.action == "stats":
            stats = await store.stats()
            print(
                f"pending {stats.pending}, scheduled {stats.scheduled}, "
                f"parked {stats.parked}, published {stats.published}"
            )
        elif args.action == "parked":
            rows = await store.parked(limit=1000)
            if not rows:
                print("no parked rows")
            for parked in rows:
                message = parked.message
                print(
                    f"{message.message_id}  topic={message.topic} key={message.key!r} "
                    f"attempts={message.attempts} parked_at={parked.parked_at.isoformat()}  "
                    f"{parked.error}"
                )
        else:
            count = await store.retry_parked(args.message_ids or None)
            print(f"released {count} parked row(s) for another try")
    finally:
        await engine.dispose()
    return 0


def _schemas_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schemas", help="work with the Avro schemas")
    actions = p.add_subparsers(dest="action", required=True)
    check = actions.add_parser(
        "check",
        help="fail if a schema is invalid or a new version breaks earlier ones",
        description="Load every .avsc file under DIRECTORY (default: ./schemas) and check "
        "that each new version of a record can read data written "
        "with every earlier version (and, with --full, the other way round). Prints one "
        "line per problem and exits 1 if there is any: run it in CI.",
    )
    check.add_argument(
        "directory", nargs="?", default="schemas", help="schemas directory (default: ./schemas)"
    )
    check.add_argument(
        "--full", action="store_true", help="also require old readers to read new data"
    )


def _run_schemas(args: argparse.Namespace) -> int:
    directory = args.directory
    if not Path(directory).is_dir():
        raise SagaError(f"no schemas directory at {Path(directory).resolve()}: give DIRECTORY")
    problems = check_directory(directory, full=args.full)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {directory}", file=sys.stderr)
        return 1
    names = SchemaRegistry.from_directory(directory).names()
    print(f"{len(names)} schemas in {directory}: every version reads the earlier ones")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saga`` command."""
    parser = argparse.ArgumentParser(
        prog="saga",
        description="choreosaga: choreographed sagas over Kafka.",
        epilog="Run 'saga COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _relay_parser(sub)
    _schemas_parser(sub)
    _outbox_parser(sub)
    observe_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saga`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "relay":
            return asyncio.run(_run_relay(args))
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "schemas":
            return _run_schemas(args)
        if args.command in observe_cli.COMMANDS:
            return observe_cli.run(args)
        if args.command == "outbox":
            args.database_url = _existing_database(args.database_url)
            return asyncio.run(_run_outbox(args))
    except (SagaError, OutboxError) as exc:
        print(f"saga {args.command}: {exc}", file=sys.stderr)
        return 2
    return 2
