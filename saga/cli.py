"""The ``saga`` command line.

``saga relay``          publish a service's outbox to Kafka (a standalone relay process)
``saga schemas check``  check that every schema version can read the earlier ones
``saga outbox``         list parked outbox rows, release them for another try, or discard them
``saga dlq``            list dead letters, or replay them once the cause is fixed
``saga observe``, ``saga trace``, ``saga status``: see :mod:`saga.observe.cli`

Installed packages add commands through the ``choreosaga.commands`` entry
points (see :mod:`saga.commands`): the reference shop adds ``saga demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import (
    KafkaPublisher,
    KafkaSettings,
    OutboxTables,
    Relay,
    RelaySettings,
    SqlOutboxStore,
    create_engine,
)
from outbox.database import read_connection, safe_url, translate_db_error
from outbox.errors import ConfigurationError as OutboxConfigurationError
from outbox.relay import MAX_NAME_LENGTH
from outbox.settings import MAX_BATCH_SIZE
from outbox.store import MAX_SHARDS
from outbox.tables import validate_identifier
from saga import dlq
from saga.commands import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    CountArgument,
    DefaultsHelpFormatter,
    DurationArgument,
    broker_list,
    database_url,
    describe,
    exit_status,
    load_plugins,
    package_version,
    stop_event,
)
from saga.embedded import EmbeddedBroker
from saga.errors import ConfigurationError
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
        type=broker_list,
        default=None,
        help="Kafka brokers (default: $KAFKA_BOOTSTRAP_SERVERS, then localhost:9092)",
    )
    p.add_argument(
        "--name",
        type=_relay_name,
        default=None,
        help="relay instance name (default: host:pid:random)",
    )
    p.add_argument("--outbox-table", type=_outbox_table, default="outbox", help="outbox table name")
    p.add_argument(
        "--shards",
        type=CountArgument(most=MAX_SHARDS),
        default=16,
        help="key-hash shards of the outbox",
    )
    p.add_argument(
        "--batch-size",
        type=CountArgument(most=MAX_BATCH_SIZE),
        default=500,
        help=f"rows per publish round (at most {MAX_BATCH_SIZE})",
    )
    p.add_argument(
        "--lease-ttl",
        type=DurationArgument(least=1),
        default=10.0,
        help="shard lease, in seconds (at least 1)",
    )
    p.add_argument(
        "--poll-interval",
        type=DurationArgument(zero=False),
        default=1.0,
        help="fallback poll, in seconds",
    )
    p.add_argument(
        "--retention",
        type=DurationArgument(),
        default=3600.0,
        help="seconds published rows are kept; 0 deletes each row as it is published",
    )
    p.add_argument(
        "--create-tables", action="store_true", help="create the outbox tables if missing"
    )
    p.add_argument(
        "--startup-timeout",
        type=DurationArgument(zero=False),
        default=30.0,
        help="seconds to wait at start for an unreachable database or broker (default 30); "
        "a missing database or table, or a broker refusing the producer, fails at once",
    )
    p.add_argument(
        "--stats-json",
        action="store_true",
        help="print the relay's counters as one JSON line when it stops",
    )


def _relay_name(text: str) -> str:
    """The argparse ``type`` of ``--name``: what the relay takes, refused as the option."""
    if len(text) > MAX_NAME_LENGTH:
        raise argparse.ArgumentTypeError(
            f"a relay name is at most {MAX_NAME_LENGTH} characters, not {len(text)}"
        )
    return text


def _outbox_table(text: str) -> str:
    """The argparse ``type`` of ``--outbox-table``: a name OutboxTables takes (a valid
    identifier, not the name of one of the other tables)."""
    try:
        validate_identifier("outbox table", text)
    except OutboxConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    defaults = OutboxTables()
    others = [t.name for t in (defaults.inbox, defaults.leases, defaults.relays)]
    if text in others:
        raise argparse.ArgumentTypeError(
            f"{text!r} is the name of another table of the outbox ({', '.join(others)})"
        )
    return text


async def _run_relay(args: argparse.Namespace) -> int:
    # A missing SQLite file is refused when the relay checks its tables (or
    # created with them, under --create-tables).
    url = database_url(args.database_url, must_exist=False)
    kafka = KafkaSettings.from_env(
        **({"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {})
    )
    settings = RelaySettings(
        batch_size=args.batch_size,
        lease_ttl=timedelta(seconds=args.lease_ttl),
        poll_interval=timedelta(seconds=args.poll_interval),
        retention=timedelta(seconds=args.retention),
        startup_timeout=timedelta(seconds=args.startup_timeout),
    )
    engine = create_engine(url)
    try:
        tables = OutboxTables(outbox=args.outbox_table)
        if args.create_tables:
            await _create_tables(tables, engine)
        store = SqlOutboxStore(engine, tables, shards=args.shards)
        relay = Relay(store, KafkaPublisher(kafka), settings, name=args.name)
        if configure_from_env("choreosaga-relay"):  # OTEL_EXPORTER_OTLP_* is set
            instrument_relay(relay)
        stop = stop_event()
        logging.getLogger(__name__).info(
            "relay %s publishing to %s", relay.name, kafka.bootstrap_servers
        )
        async with relay:
            # Until a signal, or until the relay stops on an error it cannot retry.
            stopped = asyncio.create_task(stop.wait())
            ended = asyncio.create_task(relay.join())
            await asyncio.wait([stopped, ended], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            ended.cancel()
            await asyncio.gather(stopped, ended, return_exceptions=True)
    finally:
        await engine.dispose()
    status = 0
    if relay.failure is not None:
        print(f"saga relay: stopped: {describe(relay.failure)}", file=sys.stderr)
        status = 1
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
    return status


async def _create_tables(tables: OutboxTables, engine: AsyncEngine) -> None:
    try:
        await tables.create_all(engine)
    except SQLAlchemyError as exc:
        raise translate_db_error(exc, "could not create the outbox tables") from exc


def _confirm(prompt: str) -> bool:
    """Ask on the terminal; anything but yes (or no input at all) is a no."""
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _outbox_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="database holding the outbox (default: $DATABASE_URL)",
    )
    common.add_argument(
        "--outbox-table", type=_outbox_table, default="outbox", help="outbox table name"
    )
    p = sub.add_parser(
        "outbox",
        help="inspect an outbox: counts, parked rows; retry or discard parked rows",
        description="Rows the relay could not publish (too large, unknown or invalid topic, "
        "not authorised) are parked with their error; later rows of the same topic and key "
        "wait behind them. Fix the cause, then retry them; or discard them for good.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="action")
    actions.add_parser("stats", parents=[common], help="count pending, parked, published rows")
    actions.add_parser("parked", parents=[common], help="list parked rows with their errors")
    retry = actions.add_parser(
        "retry",
        parents=[common],
        help="release parked rows for another try (once the cause is fixed)",
    )
    retry.add_argument("message_ids", nargs="*", help="only these message ids (default: all)")
    discard = actions.add_parser(
        "discard",
        parents=[common],
        help="delete parked rows for good; the rows held back behind them go on",
    )
    discard.add_argument("message_ids", nargs="+", help="message ids of the parked rows")
    discard.add_argument("--yes", action="store_true", help="do not ask for confirmation")


async def _run_outbox(args: argparse.Namespace) -> int:
    engine = create_engine(args.database_url)
    store = SqlOutboxStore(engine, OutboxTables(outbox=args.outbox_table))
    try:
        await _check_outbox(engine, store.tables)
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
        elif args.action == "retry":
            return await _retry(store, args.message_ids)
        else:
            return await _discard(store, args.message_ids, assume_yes=args.yes)
    finally:
        await engine.dispose()
    return 0


async def _check_outbox(engine: AsyncEngine, tables: OutboxTables) -> None:
    """Refuse a database without the outbox table: a usage error, as for the saga log.

    Another database (the saga log, a wrong name) is an easy mistake to make
    here: the message names the database and the table it lacks.
    """
    outbox = tables.outbox
    try:
        async with read_connection(engine) as conn:
            there = await conn.run_sync(
                lambda c: inspect(c).has_table(outbox.name, schema=outbox.schema)
            )
    except SQLAlchemyError as exc:
        raise translate_db_error(exc, f"could not open the database {safe_url(engine)}") from exc
    if not there:
        raise ConfigurationError(
            f"the database {safe_url(engine)} holds no outbox (no table {outbox.fullname}): "
            "give a service's own database, or its table with --outbox-table"
        )


async def _not_parked(store: SqlOutboxStore, message_ids: Sequence[str]) -> list[str]:
    """Report (on stderr) and return the given ids that name no parked row."""
    if not message_ids:
        return []
    parked = {p.message.message_id for p in await store.parked(limit=1_000_000)}
    unknown = [m for m in message_ids if m not in parked]
    for message_id in unknown:
        print(f"saga outbox: no parked row {message_id}", file=sys.stderr)
    return unknown


async def _retry(store: SqlOutboxStore, message_ids: Sequence[str]) -> int:
    unknown = await _not_parked(store, message_ids)
    wanted = [m for m in message_ids if m not in unknown]
    if message_ids and not wanted:
        return 1  # nothing to release: the errors say why
    count = await store.retry_parked(wanted or None)
    print(f"released {count} parked row(s) for another try")
    return 1 if unknown else 0


async def _discard(store: SqlOutboxStore, message_ids: Sequence[str], *, assume_yes: bool) -> int:
    unknown = await _not_parked(store, message_ids)
    wanted = [m for m in message_ids if m not in unknown]
    if not wanted:
        return 1
    if not assume_yes:
        prompt = (
            f"Discard {len(wanted)} parked row(s) for good? They will never be published. [y/N] "
        )
        if not await asyncio.to_thread(_confirm, prompt):
            print("nothing discarded")
            return 1
    count = await store.discard_parked(wanted)
    print(f"discarded {count} parked row(s)")
    return 1 if unknown else 0


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
        raise ConfigurationError(
            f"no schemas directory at {Path(directory).resolve()}: give DIRECTORY"
        )
    if not any(file.is_file() for file in Path(directory).rglob("*.avsc")):
        raise ConfigurationError(
            f"no .avsc files under {Path(directory).resolve()}: nothing checked"
        )
    problems = check_directory(directory, full=args.full)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {directory}", file=sys.stderr)
        return 1
    names = SchemaRegistry.from_directory(directory).names()
    print(
        f"{len(names)} schemas in {directory}: every version reads the earlier ones"
        + (" and is read by them (--full)" if args.full else "")
    )
    return 0


def _broker_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "broker",
        help="run the embedded Kafka-protocol broker until stopped (SIGTERM/SIGINT)",
        description="Run the embedded broker (Tansu, memory storage: everything is lost "
        "when it stops), the one saga demo and the tests start, for trying the commands "
        "that need Kafka (observe, dlq, abort, trace --from-kafka, relay, demo "
        "--bootstrap-servers) on a machine without one. It prints the environment "
        "variables that point those commands at it. Needs the 'embedded' extra.",
    )
    p.add_argument(
        "--port",
        type=CountArgument(most=65535),
        default=None,
        help="loopback port to listen on (default: a free one)",
    )


async def _run_broker(args: argparse.Namespace) -> int:
    # SIGHUP too (its terminal closed): the broker runs in a session of its own,
    # out of the terminal's reach, and would outlive this process.
    stop = stop_event(hangup=True)
    async with EmbeddedBroker(port=args.port) as broker:
        servers = broker.bootstrap_servers
        print(f"embedded broker at {servers}; memory storage, lost when it stops")
        print("point the saga commands at it (it cannot hand out idempotent producer ids):")
        print(f"  export KAFKA_BOOTSTRAP_SERVERS={servers} KAFKA_ENABLE_IDEMPOTENCE=false")
        print("stop it with Ctrl-C", flush=True)
        await stop.wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saga`` command."""
    parser = argparse.ArgumentParser(
        prog="saga",
        description="choreosaga: choreographed sagas over Kafka.",
        epilog="Run 'saga COMMAND --help' for the options of a command. Exit status: "
        "0 done, 1 runtime failure, 2 usage error, 130 interrupted, 141 output closed.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log more; show the traceback of a failure"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _relay_parser(sub)
    _broker_parser(sub)
    _schemas_parser(sub)
    _outbox_parser(sub)
    dlq.add_parser(sub)
    observe_cli.register(sub)
    load_plugins(sub)
    _finish_subcommands(sub)
    return parser


def _innermost(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the (sub-)command that ``args`` chose: ``saga outbox stats``'s, say."""
    while True:
        chosen = [
            action.choices[name]
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            and isinstance(action.choices, dict)
            and (name := getattr(args, action.dest or "", None)) in action.choices
        ]
        if not chosen:
            return parser
        parser = chosen[0]


def _finish_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every sub-command shows its defaults and also takes -v (``saga demo -v``)."""
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
        if "--verbose" not in command._option_string_actions:
            command.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more"
            )
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _finish_subcommands(action)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``saga`` command; return its exit status.

    The one error boundary of every command (see :mod:`saga.commands`): a
    failure prints one line on stderr, with the traceback before it under
    ``--verbose``, and the exit status says what kind of failure it was.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command mistyped, with its usage, not by ``saga``
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # aiokafka logs every failed connection attempt at ERROR; the relay
        # reports what they mean (an outage it waits out, or why it stops).
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        done = _dispatch(args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return done
    except BrokenPipeError:
        # ``saga trace ... | head``: stop quietly. Output still buffered would
        # fail again at exit; it goes nowhere instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"saga {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        status = exit_status(exc)
        if status is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"saga {args.command}: {describe(exc)}", file=sys.stderr)
        return status


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "relay":
        return asyncio.run(_run_relay(args))
    if args.command == "broker":
        return asyncio.run(_run_broker(args))
    if args.command == "schemas":
        return _run_schemas(args)
    if args.command == "outbox":
        args.database_url = database_url(args.database_url)
        return asyncio.run(_run_outbox(args))
    if args.command == "dlq":
        return asyncio.run(dlq.run(args))
    if args.command in observe_cli.COMMANDS:
        return observe_cli.run(args)
    run: Callable[[argparse.Namespace], int] = args.run  # a command added by a plug-in
    return run(args)
