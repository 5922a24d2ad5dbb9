"""The outbox, inbox and relay-coordination tables, as SQLAlchemy Core tables.

The tables live on a :class:`~sqlalchemy.MetaData` that you may share with your
own tables, so that Alembic (or ``metadata.create_all``) manages them with the
rest of your schema. Table names are configurable and validated against a
strict identifier pattern; they are only ever handed to SQLAlchemy as
identifiers, never formatted into SQL text.

Times are stored as epoch milliseconds taken from the database clock, so that
every relay and writer agrees on "now" whatever their own clocks say.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.database import safe_url, translate_db_error
from outbox.errors import ConfigurationError

__all__ = ["OutboxTables", "check_tables", "create_tables", "validate_identifier"]

# Lower case only (PostgreSQL folds unquoted names) and short enough that the
# derived index names stay within PostgreSQL's 63-byte identifier limit.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,39}")

# SQLite only makes a column an alias of ROWID (and so autoincrementing) when
# it is declared exactly INTEGER PRIMARY KEY.
_ID = BigInteger().with_variant(Integer(), "sqlite")


def validate_identifier(kind: str, name: str) -> str:
    """Return ``name`` if it is a safe SQL identifier, else raise ConfigurationError."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ConfigurationError(
            f"{kind} name {name!r} is not allowed: use 1-40 characters of a-z, 0-9 "
            "and _, not starting with a digit"
        )
    return name


class OutboxTables:
    """The four tables of the transactional messaging layer.

    Args:
        metadata: Where to define the tables; a new ``MetaData`` if omitted.
            Pass your application's metadata to manage them with Alembic.
        outbox: Name of the outbox table (messages waiting to be published).
        inbox: Name of the inbox table (ids of messages already processed).
        leases: Name of the table of shard leases held by relays.
        relays: Name of the table of live relay instances.
        schema: Optional database schema (PostgreSQL) holding the tables.
    """

    def __init__(
        self,
        metadata: MetaData | None = None,
        *,
        outbox: str = "outbox",
        inbox: str = "inbox",
        leases: str = "outbox_leases",
        relays: str = "outbox_relays",
        schema: str | None = None,
    ) -> None:
        names = {
            "outbox": validate_identifier("outbox table", outbox),
            "inbox": validate_identifier("inbox table", inbox),
            "leases": validate_identifier("leases table", leases),
            "relays": validate_identifier("relays table", relays),
        }
        if len(set(names.values())) != len(names):
            raise ConfigurationError(f"table names must differ: {names}")
        if schema is not None:
            validate_identifier("schema", schema)
        self.metadata = MetaData() if metadata is None else metadata
        self.schema = schema
        self.outbox = self._outbox(outbox)
        self.inbox = self._inbox(inbox)
        self.leases = Table(
            leases,
            self.metadata,
            Column("shard", Integer, primary_key=True, autoincrement=False),
            Column("owner", String(200), nullable=True),
            Column("expires_at_ms", BigInteger, nullable=False, default=0),
            # Fencing token: bumped whenever another relay takes the shard, so
            # that a relay that lost it (a long pause) can no longer mark rows.
            Column("epoch", BigInteger, nullable=False, default=0, server_default=text("0")),
            schema=schema,
        )
        self.relays = Table(
            relays,
            self.metadata,
            Column("owner", String(200), primary_key=True),
            Column("started_at_ms", BigInteger, nullable=False),
            Column("expires_at_ms", BigInteger, nullable=False),
            schema=schema,
        )

    @property
    def notify_channel(self) -> str:
        """PostgreSQL NOTIFY channel on which writers announce new outbox rows."""
        return f"{self.outbox.name}_committed"

    def _outbox(self, name: str) -> Table:
        pending = "published_at_ms IS NULL AND parked_at_ms IS NULL"
        ready = f"{pending} AND due_at_ms IS NULL"
        scheduled = f"{pending} AND due_at_ms IS NOT NULL"
        parked = "parked_at_ms IS NOT NULL AND published_at_ms IS NULL"
        return Table(
            name,
            self.metadata,
            Column("id", _ID, primary_key=True, autoincrement=True),
            Column("message_id", String(200), nullable=False),
            Column("topic", String(249), nullable=False),
            Column("key", LargeBinary, nullable=True),
            Column("value", LargeBinary, nullable=True),
            Column("headers", JSON, nullable=False),
            Column("shard", SmallInteger, nullable=False),
            Column("created_at_ms", BigInteger, nullable=False),
            Column("due_at_ms", BigInteger, nullable=True),
            Column("published_at_ms", BigInteger, nullable=True),
            Column("parked_at_ms", BigInteger, nullable=True),
            Column("attempts", Integer, nullable=False, default=0),
            Column("last_error", Text, nullable=True),
            # Ready rows in id order: the relay walks it, filters its shards
            # and stops at the batch size, whatever the backlog or retention.
            Index(
                f"ix_{name}_ready",
                "id",
                postgresql_where=text(ready),
                sqlite_where=text(ready),
            ),
            # Scheduled rows by due time: the relay reads only those due by
            # now, so rows due later (saga deadlines) cost it nothing.
            Index(
                f"ix_{name}_scheduled",
                "due_at_ms",
                postgresql_where=text(scheduled),
                sqlite_where=text(scheduled),
            ),
            Index(
                f"ix_{name}_parked_key",
                "key",
                postgresql_where=text(parked),
                sqlite_where=text(parked),
            ),
            Index(
                f"ix_{name}_published",
                "published_at_ms",
                postgresql_where=text("published_at_ms IS NOT NULL"),
                sqlite_where=text("published_at_ms IS NOT NULL"),
            ),
            schema=self.schema,
        )

    def _inbox(self, name: str) -> Table:
        return Table(
            name,
            self.metadata,
            Column("consumer", String(200), nullable=False),
            # Who assigned the id (a CloudEvents source, a topic): ids are
            # unique only within their source.
            Column("source", String(200), nullable=False),
            Column("message_id", String(200), nullable=False),
            Column("received_at_ms", BigInteger, nullable=False),
            PrimaryKeyConstraint("consumer", "source", "message_id", name=f"pk_{name}"),
            Index(f"ix_{name}_received", "received_at_ms"),
            schema=self.schema,
        )

    async def create_all(self, engine: AsyncEngine) -> None:
        """Create the four tables (and indexes) if they do not exist yet.

        Safe when several instances start at once (see :func:`create_tables`).
        """
        await create_tables(engine, [self.outbox, self.inbox, self.leases, self.relays])

    async def drop_all(self, engine: AsyncEngine) -> None:
        """Drop the four tables if they exist."""
        tables = [self.outbox, self.inbox, self.leases, self.relays]
        async with engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all, tables=tables, checkfirst=True)


async def create_tables(engine: AsyncEngine, tables: list[Table]) -> None:
    """Create ``tables`` if missing, one creator at a time.

    On PostgreSQL two processes checking and creating at once both see the
    table missing and the second fails; a transaction-scoped advisory lock
    makes them take turns. (SQLite's write lock already does.)
    """
    if not tables:
        return
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(select(func.pg_advisory_xact_lock(_CREATE_LOCK)))
        await conn.run_sync(tables[0].metadata.create_all, tables=tables, checkfirst=True)


# An arbitrary constant naming the "creating outbox tables" advisory lock.
_CREATE_LOCK = 0x63686F7265  # "chore"


async def check_tables(engine: AsyncEngine, tables: Sequence[Table]) -> None:
    """Refuse a database that does not exist or lacks some of ``tables``.

    Run at start, so that a wrong URL or a forgotten migration stops a
    process at once with one clear message instead of being retried as if
    it were an outage. A SQLite file that does not exist is refused before
    connecting (connecting would create it, or look like an outage).

    Raises:
        ConfigurationError: The SQLite directory or some tables are missing.
        StoreError: The database could not be opened (``kind`` says whether
            waiting may help: a missing PostgreSQL database is permanent).
    """
    if engine.url.get_backend_name() == "sqlite":
        _check_sqlite_file(engine.url.database or "")
    try:
        async with engine.connect() as conn:
            missing = await conn.run_sync(_missing_tables, list(tables))
    except SQLAlchemyError as exc:
        raise translate_db_error(exc, f"could not open the database {safe_url(engine)}") from exc
    if missing:
        raise ConfigurationError(
            f"table(s) {', '.join(missing)} missing in the database {safe_url(engine)}: create "
            "them with create_tables() (OutboxTables.create_all(), Service.create_tables(), "
            "saga relay --create-tables) or run the migration that adds them"
        )


def _check_sqlite_file(database: str) -> None:
    # Connecting would create the file (and fail, as if it were an outage, in a
    # missing directory): a relay or service must find the database it was given.
    path = Path(database).resolve()
    if not path.parent.is_dir():
        raise ConfigurationError(
            f"the SQLite database {database} is in a directory that does not exist: {path.parent}"
        )
    if not path.is_file():
        raise ConfigurationError(
            f"no SQLite database at {database}: create it and its tables with create_tables()"
        )


def _missing_tables(conn: Connection, tables: list[Table]) -> list[str]:
    inspector = inspect(conn)
    return [t.fullname for t in tables if not inspector.has_table(t.name, schema=t.schema)]
