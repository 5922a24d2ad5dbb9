"""What scheduled rows cost the relay's fetch: ``fetch_due`` with and without them.

Run it from the project root::

    python bench/scheduled_rows.py                        # PostgreSQL and SQLite
    python bench/scheduled_rows.py --database postgresql --scheduled 500000

Two outboxes in one database, side by side:

* *plain*: ``--due`` rows ready to publish (10 by default), nothing else;
* *scheduled*: ``--scheduled`` rows due a day from now (200,000 by default:
  saga deadlines, delayed messages), written first so that they have the
  lower ids, then the same ``--due`` ready rows.

Both tables are analysed (as autovacuum would), then ``SqlOutboxStore.fetch_due``
over every shard, with the relay's batch size, is timed ``--repeat`` times on
each, interleaved so that drift hits both. Nothing is marked: every fetch
returns the same due rows. It prints the median and p90 per outbox and the
ratio of the medians (scheduled / plain; the target is at most 2).
PostgreSQL runs live in a scratch database dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import OutboxMessage, OutboxTables, SqlOutboxStore, create_engine

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SHARDS = 16
BATCH = 100
INSERT_CHUNK = 5000
WARMUP = 10


@contextlib.asynccontextmanager
async def database(kind: str, server: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """An engine on a scratch database of ``kind``, and its description."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            engine = create_engine(f"sqlite:///{Path(directory) / 'bench.db'}")
            try:
                yield engine, "SQLite (a file in a temporary directory)"
            finally:
                await engine.dispose()
        return
    libpq = make_url(server).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        version = conn.execute("SHOW server_version").fetchone()
    url = make_url(server).set(drivername="postgresql+psycopg", database=name)
    engine = create_engine(url.render_as_string(hide_password=False))
    try:
        yield engine, f"PostgreSQL {version[0] if version else '?'}, scratch database {name}"
    finally:
        await engine.dispose()
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _ready(count: int, prefix: str) -> list[OutboxMessage]:
    return [
        OutboxMessage(topic="orders", key=f"k{i % 16}".encode(), value=b"v" * 200)
        for i in range(count)
    ]


async def _outbox(engine: AsyncEngine, name: str, scheduled: int, due: int) -> SqlOutboxStore:
    tables = OutboxTables(
        outbox=f"{name}_outbox",
        inbox=f"{name}_inbox",
        leases=f"{name}_leases",
        relays=f"{name}_relays",
    )
    await tables.create_all(engine)
    store = SqlOutboxStore(engine, tables, shards=SHARDS)
    later = timedelta(days=1)
    for start in range(0, scheduled, INSERT_CHUNK):
        chunk = [
            OutboxMessage(
                topic="saga.orders", key=f"o{start + i}".encode(), value=b"d" * 100, delay=later
            )
            for i in range(min(INSERT_CHUNK, scheduled - start))
        ]
        async with engine.begin() as conn:
            await store.add(conn, chunk)
    async with engine.begin() as conn:
        await store.add(conn, _ready(due, name))
    async with engine.begin() as conn:
        table = tables.outbox.name
        await conn.execute(
            text(f"ANALYZE {table}" if engine.dialect.name != "sqlite" else "ANALYZE")
        )
    return store


async def _time(store: SqlOutboxStore, due: int) -> float:
    started = time.perf_counter()
    rows = await store.fetch_due(set(range(SHARDS)), BATCH)
    elapsed = time.perf_counter() - started
    if len(rows) != due:
        raise SystemExit(f"fetch_due returned {len(rows)} rows, expected {due}")
    return elapsed * 1000


async def measure(kind: str, args: argparse.Namespace) -> tuple[str, list[float], list[float]]:
    """Fetch times (ms) on the plain and the scheduled outbox of one database."""
    async with database(kind, args.database_url) as (engine, description):
        started = time.perf_counter()
        plain = await _outbox(engine, "plain", 0, args.due)
        scheduled = await _outbox(engine, "scheduled", args.scheduled, args.due)
        print(f"{kind}: outboxes written in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        for _ in range(WARMUP):
            await _time(plain, args.due)
            await _time(scheduled, args.due)
        without: list[float] = []
        with_rows: list[float] = []
        for _ in range(args.repeat):
            without.append(await _time(plain, args.due))
            with_rows.append(await _time(scheduled, args.due))
        return description, without, with_rows


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def _code_version() -> str:
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
            ["git", "status", "--porcelain", "--", "outbox"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"git {commit}" + (" + uncommitted changes in outbox/" if changed else "")


async def main(args: argparse.Namespace) -> None:
    kinds = ("postgresql", "sqlite") if args.database == "both" else (args.database,)
    results = [(kind, *(await measure(kind, args))) for kind in kinds]

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    print("choreosaga scheduled rows benchmark: fetch_due with and without scheduled rows")
    print(f"  machine   : {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"  python    : {platform.python_implementation()} {platform.python_version()}")
    print(f"  code      : {_code_version()}")
    print(
        f"  libraries : SQLAlchemy {version('sqlalchemy')}, psycopg {version('psycopg')}, "
        f"aiosqlite {version('aiosqlite')}"
    )
    for kind, description, _, _ in results:
        print(f"  {kind:<10}: {description}")
    print(
        f"  workload  : {args.due} due rows; {args.scheduled:,} rows scheduled a day ahead "
        f"(written first) in the second outbox; fetch_due over {SHARDS} shards, "
        f"batch {BATCH}, {args.repeat} fetches each, interleaved"
    )
    print()
    header = (
        f"{'database':<11} {'plain p50':>10} {'p90':>8} "
        f"{'scheduled p50':>14} {'p90':>8} {'ratio p50':>10}"
    )
    print(header)
    print("-" * len(header))
    for kind, _, without, with_rows in results:
        plain, scheduled = statistics.median(without), statistics.median(with_rows)
        print(
            f"{kind:<11} {plain:>8.2f}ms {_p90(without):>6.2f}ms "
            f"{scheduled:>12.2f}ms {_p90(with_rows):>6.2f}ms {scheduled / plain:>9.2f}x"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database", choices=("postgresql", "sqlite", "both"), default="both")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_POSTGRES_URL,
        help="PostgreSQL server on which a scratch database is created and dropped",
    )
    parser.add_argument("--scheduled", type=int, default=200_000, help="rows scheduled ahead")
    parser.add_argument("--due", type=int, default=10, help="rows ready to publish")
    parser.add_argument("--repeat", type=int, default=200, help="fetches timed per outbox")
    args = parser.parse_args(argv)
    if args.due < 1 or args.due > BATCH or args.scheduled < 0 or args.repeat < 2:
        parser.error(f"--due must be 1-{BATCH}, --scheduled at least 0, --repeat at least 2")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
