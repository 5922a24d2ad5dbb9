"""The ``saga observe``, ``saga trace`` and ``saga status`` commands.

``saga observe``  fill a saga log from the saga topics until stopped
``saga trace``    one saga's timeline: from the saga log, the topics, or a
                  service's own database
``saga status``   sagas per name and status; stuck and failed ones
``saga graph``    the choreography as observed: Mermaid, DOT or AsyncAPI 3.0
``saga abort``    ask a running saga's initiator to compensate it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import KafkaSettings, create_engine
from outbox.database import read_connection, safe_url, translate_db_error
from saga.codec import AvroCodec
from saga.commands import DurationArgument, broker_list, database_url, stop_event
from saga.errors import ConfigurationError, SagaError
from saga.observe.abort import request_abort
from saga.observe.api import trace_from_kafka, trace_from_log, trace_from_service
from saga.observe.graph import GRAPH_FORMATS, observed_graph, render_graph
from saga.observe.log import SagaLog
from saga.observe.observer import ObserverSettings, SagaObserver
from saga.observe.render import FORMATS, render_trace
from saga.observe.scan import terminal_or_none
from saga.observe.status import metrics_text, saga_metrics, saga_status
from saga.observe.topics import DEFAULT_PATTERNS
from saga.observe.trace import SeveralSagasError, Trace
from saga.schemas import SchemaRegistry

__all__ = ["COMMANDS", "register", "run"]

COMMANDS = ("observe", "trace", "status", "graph", "abort")
"""Commands this module adds to ``saga``."""


def _common(p: argparse.ArgumentParser, *, database_help: str) -> None:
    p.add_argument(
        "--database-url",
        default=os.environ.get("SAGA_LOG_URL") or os.environ.get("DATABASE_URL"),
        help=f"{database_help} (default: $SAGA_LOG_URL, then $DATABASE_URL)",
    )


def _kafka_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap-servers",
        type=broker_list,
        default=None,
        help="Kafka brokers (default: $KAFKA_BOOTSTRAP_SERVERS, then localhost:9092)",
    )
    p.add_argument(
        "--topics",
        default=",".join(DEFAULT_PATTERNS),
        help="comma-separated glob patterns of the saga topics (default: saga.*)",
    )
    p.add_argument(
        "--schemas", default=None, help="directory of extra .avsc files (to decode payloads)"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the commands of this module to the ``saga`` parser."""
    p = sub.add_parser(
        "observe",
        help="store every saga message in a saga log until stopped (SIGTERM/SIGINT)",
        description="Consume the saga topics with its own consumer group and store one row "
        "per message (id, saga, event type, service, step, outcome, status, time, "
        "causation and correlation ids, trace id, the stamp as JSON) in a SQLite or "
        "PostgreSQL database, once each. 'saga trace' and 'saga status' read it.",
    )
    _common(p, database_help="database of the saga log")
    _kafka_options(p)
    p.add_argument("--group", default="saga-observer", help="consumer group")
    p.add_argument("--payloads", action="store_true", help="also store payloads, as JSON")
    p.add_argument(
        "--retention-days",
        type=DurationArgument(unit="days", zero=False),
        default=7.0,
        help="forget sagas idle for this many days",
    )

    p = sub.add_parser(
        "trace",
        help="print one saga's timeline and why it ended where it did",
        description="Rebuild the timeline of the saga whose id or correlation id is REF: "
        "every message with its time, delta from the start, producing service, event type, "
        "step and outcome; compensations marked; the final status and why (the failing "
        "step and its reason, or where it waits and for how long); missing messages. "
        "Reads the saga log at --database-url (a service's own database works too: its "
        "saga view gives the steps), or scans the topics with --from-kafka. A saga is "
        "(name, id): when sagas of several names have the id REF, name one with --saga.",
    )
    p.add_argument("ref", help="saga id or correlation id")
    p.add_argument(
        "--saga", default=None, help="saga name (needed when sagas of several names have the id)"
    )
    _common(p, database_help="saga log, or a service's database")
    _kafka_options(p)
    p.add_argument("--from-kafka", action="store_true", help="scan the saga topics instead")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")

    p = sub.add_parser(
        "status",
        help="sagas per name and status; stuck and failed ones, oldest first",
        description="Read the saga log: count sagas per name and status, and list, oldest "
        "first, sagas that are stuck (not ended, no message for longer than "
        "--stuck-after) or failed.",
    )
    _common(p, database_help="database of the saga log")
    p.add_argument(
        "--stuck-after",
        type=DurationArgument(),
        default=300.0,
        help="seconds without a message after which a running saga is stuck",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="also print saga metrics read off the log: sagas in flight by step, "
        "time to end by outcome",
    )

    p = sub.add_parser(
        "abort",
        help="ask the initiator to compensate a running saga (idempotent)",
        description="Publish an AbortRequested event on the saga's topic. The initiating "
        "service compensates the saga's completed steps, most recent first, if the saga is "
        "still running, and records REASON. Running it twice is harmless. The saga's name "
        "and topic come from the saga log (--database-url), or from --saga and "
        "--topic-prefix.",
    )
    p.add_argument("saga_id", help="id of the saga to abort")
    p.add_argument("--reason", required=True, help="why (becomes the saga's reason)")
    p.add_argument(
        "--saga",
        default=None,
        help="saga name (default: from the saga log, while only one saga there has the id)",
    )
    p.add_argument("--topic-prefix", default="saga.", help="saga topic prefix")
    p.add_argument(
        "--requested-by", default=os.environ.get("USER"), help="who asks (default: $USER)"
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("SAGA_LOG_URL"),
        help="saga log to read the saga from (default: $SAGA_LOG_URL)",
    )
    p.add_argument(
        "--bootstrap-servers",
        type=broker_list,
        default=None,
        help="Kafka brokers (default: $KAFKA_BOOTSTRAP_SERVERS, then localhost:9092)",
    )

    p = sub.add_parser(
        "graph",
        help="draw the choreography as observed: who emits and consumes what",
        description="Read the saga log: services, event types, and who consumes what (a "
        "message that caused another one), with counts and median latency per edge. "
        "Mermaid (default), Graphviz DOT, or an AsyncAPI 3.0 document with the Avro schemas.",
    )
    _common(p, database_help="database of the saga log")
    p.add_argument("--format", choices=GRAPH_FORMATS, default="mermaid", help="output format")
    p.add_argument("--saga", default=None, help="only this saga name")
    p.add_argument(
        "--schemas", default=None, help="directory of extra .avsc files (AsyncAPI payloads)"
    )


def _codec(args: argparse.Namespace) -> AvroCodec:
    registry = SchemaRegistry.default()
    if getattr(args, "schemas", None):
        extra = SchemaRegistry.from_directory(args.schemas)
        for name in extra.names():
            registry.register(extra.latest(name).parsed)
    return AvroCodec(registry)


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    overrides: dict[str, Any] = {}
    if args.bootstrap_servers:
        overrides["bootstrap_servers"] = args.bootstrap_servers
    return KafkaSettings.from_env(**overrides)


def _patterns(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(p.strip() for p in args.topics.split(",") if p.strip())


@asynccontextmanager
async def _database(url: str | None, *, must_exist: bool, doing: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``--database-url``, disposed of afterwards.

    The URL is checked first (:func:`~saga.commands.database_url`: a usage
    error). A database error inside (a database that does not exist, a
    server that does not answer) becomes a :class:`~outbox.errors.StoreError`
    saying ``could not DOING URL`` and why: one line, exit status 1.
    """
    checked = database_url(url, variables="SAGA_LOG_URL / DATABASE_URL", must_exist=must_exist)
    engine = create_engine(checked)
    try:
        yield engine
    except SQLAlchemyError as exc:
        raise translate_db_error(exc, f"could not {doing} {safe_url(engine)}") from exc
    finally:
        await engine.dispose()


async def _tables(engine: AsyncEngine) -> set[str]:
    async with read_connection(engine) as conn:
        names: list[str] = await conn.run_sync(lambda c: inspect(c).get_table_names())
    return set(names)


async def _saga_log(engine: AsyncEngine, *, instead: str = "") -> SagaLog:
    """The saga log in the database, or a usage error saying the database holds none.

    A service's own database (outbox, saga views) is an easy mistake to give
    here: the message names what is missing and which database to give. A
    log of an earlier version is refused with the SQL that migrates it.
    """
    log = SagaLog(dialect=engine.dialect.name)
    tables = await _tables(engine)
    missing = [t.name for t in (log.messages, log.sagas) if t.name not in tables]
    if missing:
        raise ConfigurationError(
            f"the database {safe_url(engine)} holds no saga log (no table {', '.join(missing)}): "
            f"give the database that 'saga observe' fills{instead}"
        )
    await log.check_keys(engine)
    return log


async def _observe(args: argparse.Namespace) -> int:
    # The observer waits out database outages itself; what fails here is the start.
    async with _database(
        args.database_url, must_exist=False, doing="create the saga log in"
    ) as engine:
        observer = SagaObserver(
            engine=engine,
            kafka=_kafka(args),
            codec=_codec(args),
            settings=ObserverSettings(
                patterns=_patterns(args),
                group_id=args.group,
                payloads=args.payloads,
                retention=timedelta(days=args.retention_days),
            ),
        )
        await observer.create_tables()
        stop = stop_event()
        async with observer:
            print(f"observing {', '.join(observer.stats.topics) or '(no topic yet)'}", flush=True)
            await stop.wait()
    stats = observer.stats
    print(
        f"stored {stats.stored}, duplicates {stats.duplicates}, skipped {stats.skipped}",
        flush=True,
    )
    return 0


async def _trace(args: argparse.Namespace) -> int:
    trace: Trace | None
    if args.from_kafka:
        trace = await trace_from_kafka(
            _kafka(args),
            _codec(args),
            args.ref,
            saga=args.saga,
            patterns=_patterns(args),
            progress=terminal_or_none(sys.stderr),
        )
        where = f"the topics {args.topics}"
    else:
        async with _database(
            args.database_url, must_exist=True, doing="read the database"
        ) as engine:
            tables = await _tables(engine)
            log = SagaLog(dialect=engine.dialect.name)
            trace = None
            if log.messages.name in tables:
                await log.check_keys(engine)
                trace = await trace_from_log(engine, args.ref, saga=args.saga, log=log)
            if trace is None and "saga_state" in tables:
                trace = await trace_from_service(engine, _codec(args), args.ref, saga=args.saga)
            if log.messages.name not in tables and "saga_state" not in tables:
                raise ConfigurationError(
                    f"the database {safe_url(engine)} holds neither a saga log nor saga views "
                    f"(no table {log.messages.name}, no table saga_state): give the database "
                    "that 'saga observe' fills, or a service's own database"
                )
        where = "the database"
    if trace is None:
        which = f"{args.saga} " if args.saga else ""
        print(f"saga trace: no saga {which}{args.ref!r} in {where}", file=sys.stderr)
        return 1
    print(render_trace(trace, args.format))
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with _database(
        args.database_url, must_exist=True, doing="read the saga log in"
    ) as engine:
        log = await _saga_log(engine)
        report = await saga_status(engine, log=log, stuck_after=timedelta(seconds=args.stuck_after))
        metrics = await saga_metrics(engine, log=log) if args.metrics else None
    if args.json:
        document = report.to_dict()
        if metrics is not None:
            document["metrics"] = metrics
        print(json.dumps(document, indent=2))
    else:
        print(report.to_text())
        if metrics is not None:
            print()
            print(metrics_text(metrics))
    return 0


async def _graph(args: argparse.Namespace) -> int:
    async with _database(
        args.database_url, must_exist=True, doing="read the saga log in"
    ) as engine:
        log = await _saga_log(engine)
        graph = await observed_graph(engine, log=log, saga_name=args.saga)
    if not graph.edges:
        which = f" of saga {args.saga!r}" if args.saga else ""
        print(f"saga graph: no saga message{which} in the log", file=sys.stderr)
        return 1
    print(render_graph(graph, args.format, _codec(args).registry))
    return 0


async def _abort(args: argparse.Namespace) -> int:
    saga_name, topic, known = args.saga, None, None
    if args.database_url:
        async with _database(
            args.database_url, must_exist=True, doing="read the saga log in"
        ) as engine:
            log = await _saga_log(engine, instead=", or leave it out and give --saga NAME")
            trace = await trace_from_log(engine, args.saga_id, saga=args.saga, log=log)
        if trace is not None and trace.saga_id == args.saga_id:
            saga_name, known = trace.saga_name, trace.stamp
            topic = trace.topic
            if trace.status.is_terminal:
                print(f"saga {args.saga_id} already ended {trace.status.value}: nothing to abort")
                return 0
    if saga_name is None and not args.database_url:
        raise ConfigurationError(
            "give --saga NAME, or a saga log to find the saga in (--database-url or $SAGA_LOG_URL)"
        )
    if saga_name is None:
        raise SagaError(f"saga {args.saga_id} is not in the saga log: give --saga NAME")
    sent = await request_abort(
        _kafka(args),
        _codec(args),
        topic=topic or f"{args.topic_prefix}{saga_name}",
        saga_name=saga_name,
        saga_id=args.saga_id,
        reason=args.reason,
        requested_by=args.requested_by,
        known=known,
    )
    print(f"asked the initiator of {saga_name} {args.saga_id} to compensate it ({sent.id})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`."""
    commands = {
        "observe": _observe,
        "trace": _trace,
        "status": _status,
        "graph": _graph,
        "abort": _abort,
    }
    command = commands[args.command]
    try:
        return asyncio.run(command(args))
    except SeveralSagasError as exc:
        # A saga id that sagas of several names have: the commands name one with --saga.
        raise SeveralSagasError(exc.saga_id, exc.names, ask="give --saga NAME") from exc
