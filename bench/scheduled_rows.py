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
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_POSTGRES_URL, Progress, machine_facts, scratch_database

from outbox import OutboxMessage, OutboxTables, SqlOutboxStore, create_engine

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
    async with scratch_database(server) as scratch:
        engine = create_engine(scratch.url.render_as_string(hide_password=False))
        try:
            yield engine, f"PostgreSQL {scratch.version}, scratch database {scratch.name}"
        finally:
            await engine.dispose()


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


async def measure(
    kind: str, args: argparse.Namespace, progress: Progress
) -> tuple[str, list[float], list[float]]:
    """Fetch times (ms) on the plain and the scheduled outbox of one database."""
    async with database(kind, args.database_url) as (engine, description):
        plain = await _outbox(engine, "plain", 0, args.due)
        progress.step(f"{kind}: writing {args.scheduled:,} scheduled rows")
        scheduled = await _outbox(engine, "scheduled", args.scheduled, args.due)
        progress.step(f"{kind}: timing {args.repeat} fetches of each outbox")
        for _ in range(WARMUP):
            await _time(plain, args.due)
            await _time(scheduled, args.due)
        without: list[float] = []
        with_rows: list[float] = []
        for _ in range(args.repeat):
            without.append(await _time(plain, args.due))
            with_rows.append(await _time(scheduled, args.due))
        progress.step(f"{kind}: done")
        return description, without, with_rows


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


async def main(args: argparse.Namespace) -> None:
    kinds = ("postgresql", "sqlite") if args.database == "both" else (args.database,)
    progress = Progress(3 * len(kinds))
    results = [(kind, *(await measure(kind, args, progress))) for kind in kinds]
    extra = [(f"{kind} db", description) for kind, description, _, _ in results]
    extra.append(
        (
            "workload",
            f"{args.due} due rows; {args.scheduled:,} rows scheduled a day ahead (written "
            f"first) in the second outbox; fetch_due over {SHARDS} shards, batch {BATCH}, "
            f"{args.repeat} fetches each, interleaved",
        )
    )
    postgres = args.database_url if "postgresql" in kinds else None
    print(
        machine_facts(
            "choreosaga scheduled rows benchmark: fetch_due with and without scheduled rows",
            postgres_url=postgres,
            extra=extra,
        )
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
