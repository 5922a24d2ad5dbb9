"""Engines for the two supported databases, and the database clock.

PostgreSQL (through psycopg 3) is the production database; SQLite (through
aiosqlite) is the embedded default. SQLite needs two adjustments to be safe
with several writers: write-ahead logging, and transactions that take the
write lock when they begin (``BEGIN IMMEDIATE``) instead of failing with
"database is locked" when a reader later tries to write.

Transactions that only read are the exception (:func:`read_connection`, the
:data:`READ_ONLY` execution option): they begin deferred (``BEGIN``). With
WAL a reader needs no lock: it reads the last committed state, even while
another connection holds the write lock, and a writer commits while it
reads. Taking the write lock for a read would make ``saga trace`` on a
running service's database wait for the service's transactions (and fail
after the busy timeout), and the service wait for ``saga trace``. Only
transactions that never write may begin deferred: one that reads and then
writes would have to upgrade its lock, and SQLite refuses that at once
(SQLITE_BUSY, no waiting) when another connection wrote since the read.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import BigInteger, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import InvalidatePoolError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from outbox.errors import ConfigurationError, StoreError
from outbox.failures import classify, describe

__all__ = [
    "READ_ONLY",
    "configure_sqlite",
    "create_engine",
    "db_now_ms",
    "dialect_of",
    "is_transient_db_error",
    "read_connection",
    "translate_db_error",
    "upsert_insert",
]

SUPPORTED = ("postgresql", "sqlite")


class db_now_ms(FunctionElement[int]):
    """The database's current time in epoch milliseconds (an SQL expression).

    Every time the outbox stores or compares comes from here, so that relays
    on machines with skewed clocks still agree on when a row is due.
    """

    type = BigInteger()
    inherit_cache = True


@compiles(db_now_ms, "postgresql")
def _now_pg(element: db_now_ms, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) AS BIGINT)"


@compiles(db_now_ms, "sqlite")
def _now_sqlite(element: db_now_ms, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"


@compiles(db_now_ms)
def _now_other(element: db_now_ms, compiler: SQLCompiler, **kw: Any) -> str:
    raise ConfigurationError(
        f"database dialect {compiler.dialect.name!r} is not supported; use one of {SUPPORTED}"
    )


def upsert_insert(dialect: str) -> Callable[..., Any]:
    """The dialect's ``insert`` construct, which offers ``ON CONFLICT`` clauses."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def dialect_of(engine: AsyncEngine) -> str:
    """Return ``"postgresql"`` or ``"sqlite"``, or raise ConfigurationError."""
    name = engine.dialect.name
    if name not in SUPPORTED:
        raise ConfigurationError(f"database {name!r} is not supported; use one of {SUPPORTED}")
    return name


def _normalise(url: str | URL) -> URL:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.get_driver_name() not in ("psycopg", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_driver_name() != "psycopg":
            raise ConfigurationError("PostgreSQL URLs must use the psycopg (3) async driver")
    elif backend == "sqlite":
        if parsed.get_driver_name() != "aiosqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigurationError(
                "SQLite needs a database file (several connections must share it), "
                "for example sqlite+aiosqlite:///service.db"
            )
    else:
        raise ConfigurationError(
            f"database URL {parsed.render_as_string()!r} is not supported; "
            "use postgresql+psycopg://... or sqlite+aiosqlite:///file.db"
        )
    return parsed


def create_engine(url: str | URL, **engine_options: Any) -> AsyncEngine:
    """Create an async engine configured for the outbox.

    ``postgresql://`` URLs use psycopg 3; ``sqlite:///file.db`` URLs use
    aiosqlite with WAL and ``BEGIN IMMEDIATE`` (see :func:`configure_sqlite`;
    reads through :func:`read_connection` begin deferred); a
    SQLite statement waits up to ``connect_args={"timeout": seconds}`` (30 by
    default) for another writer's lock. Errors never quote statement
    parameters (``hide_parameters=True``).
    Extra keyword arguments go to :func:`sqlalchemy.ext.asyncio.create_async_engine`.
    Statement parameters are left out of error messages and logs
    (``hide_parameters``): they hold payloads, card tokens and the like.
    A PostgreSQL engine checks pooled connections only after they rested
    (:data:`PING_AFTER_IDLE`) unless ``pool_pre_ping`` is given.
    """
    parsed = _normalise(url)
    # A database error's text would otherwise quote the statement's parameters
    # (payloads, card tokens) into every traceback that is logged.
    engine_options.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        # sqlite3's ``timeout``: how long a statement waits for another writer's
        # lock before "database is locked". The caller's, or 30 s.
        connect_args = dict(engine_options.get("connect_args") or {})
        connect_args["timeout"] = _seconds(
            connect_args.get("timeout", _BUSY_TIMEOUT), 'connect_args["timeout"]'
        )
        engine_options["connect_args"] = connect_args
        # SQLite runs one writer at a time. With one pooled connection, waiting
        # transactions queue in asyncio, first come first served, instead of
        # sleeping in SQLite's busy handler (which backs off up to 100 ms).
        engine_options.setdefault("pool_size", 1)
        engine_options.setdefault("max_overflow", 0)
        engine_options.setdefault("pool_timeout", 300)
        engine = create_async_engine(parsed, **engine_options)
        configure_sqlite(engine)
        return engine
    if "pool_pre_ping" in engine_options:
        return create_async_engine(parsed, **engine_options)
    engine = create_async_engine(parsed, **engine_options)
    _ping_when_rested(engine)
    return engine


PING_AFTER_IDLE = 1.0
"""Seconds a pooled PostgreSQL connection may have sat unused before the pool checks it
(an empty statement) as it hands it out again; a dead one is replaced, with every
connection pooled before it.

``create_engine`` does this instead of SQLAlchemy's ``pool_pre_ping``, which checks on
every checkout: a round trip of its own before each transaction, a tenth of a lone
message's step. A connection that died while in steady use (the server restarted)
fails its next statement instead; that is an outage, which the relay and the services
wait out and retry, and the pool then replaces the connections it held. Passing
``pool_pre_ping`` to ``create_engine`` keeps SQLAlchemy's behaviour, whichever value."""

_RESTED_SINCE = "outbox.rested_since"


def _ping_when_rested(engine: AsyncEngine) -> None:
    dialect = engine.dialect

    def rested(_dbapi_connection: Any, record: Any) -> None:
        record.info[_RESTED_SINCE] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get(_RESTED_SINCE, 0.0) < PING_AFTER_IDLE:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                raise InvalidatePoolError() from exc  # the pool reconnects and retries
            raise

    event.listen(engine.sync_engine, "connect", rested)
    event.listen(engine.sync_engine, "checkin", rested)
    event.listen(engine.sync_engine, "checkout", checkout)


def _on_connect(dbapi_connection: Any, record: Any) -> None:
    # Take transaction control away from the driver, so that BEGIN below is ours.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        f"PRAGMA busy_timeout={record.info.get(_BUSY_MS, round(_BUSY_TIMEOUT * 1000))}",
        "PRAGMA foreign_keys=ON",
    ):
        cursor.execute(pragma)
    cursor.close()


def _take_timeout(busy_timeout: float | None) -> Callable[[Any, Any, Any, Any], None]:
    """A ``do_connect`` listener: the connection's timeout is ``busy_timeout``, or the
    engine's ``connect_args["timeout"]``, or 30 s."""

    def do_connect(_dialect: Any, record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        if busy_timeout is not None:
            cparams["timeout"] = busy_timeout
        else:
            cparams["timeout"] = _seconds(
                cparams.get("timeout", _BUSY_TIMEOUT), 'connect_args["timeout"]'
            )
        record.info[_BUSY_MS] = round(cparams["timeout"] * 1000)

    return do_connect


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and 0 <= value <= _MAX_BUSY_TIMEOUT):
        raise ConfigurationError(
            f"{name} must be from 0 to {_MAX_BUSY_TIMEOUT:.0f} seconds, not {value!r}"
        )
    return float(value)


READ_ONLY = "choreosaga_read_only"
"""Execution option: the connection's transactions only read (see :func:`read_connection`).

On SQLite they begin deferred instead of taking the write lock; elsewhere it
changes nothing. Give it only where nothing is written."""


@asynccontextmanager
async def read_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection of ``engine`` for transactions that only read.

    On SQLite its transactions begin deferred (``BEGIN``, see the module
    docstring): they read the last committed state without waiting for
    another connection's write lock, and do not hold writers up. Writing
    through it is a mistake: the upgrade to the write lock fails at once
    with "database is locked" when another connection wrote meanwhile.
    """
    async with engine.connect() as conn:
        await conn.execution_options(**{READ_ONLY: True})
        yield conn


def _on_begin(connection: Connection) -> None:
    # A deferred read still begins a transaction, so that its statements read one snapshot.
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def configure_sqlite(engine: AsyncEngine, *, busy_timeout: float | None = None) -> None:
    """Make an aiosqlite engine safe for concurrent writers (idempotent).

    Its transactions begin with ``BEGIN IMMEDIATE``, but for those of a
    :func:`read_connection` (plain ``BEGIN``). Call it on engines you create
    yourself, before their first connection.

    Args:
        engine: An aiosqlite engine.
        busy_timeout: Seconds a statement waits for another connection's write
            lock before SQLite reports "database is locked" (a transient error:
            retried, then dead-lettered), set on every new connection. Default:
            the engine's ``connect_args={"timeout": ...}``, or 30. An engine
            already configured keeps its timeout; giving another is refused.
    """
    if engine.dialect.name != "sqlite":
        raise ConfigurationError("configure_sqlite() takes a SQLite engine")
    if busy_timeout is not None:
        busy_timeout = _seconds(busy_timeout, "busy_timeout")
    sync_engine = engine.sync_engine
    if event.contains(sync_engine, "begin", _on_begin):
        if busy_timeout is not None and _configured.get(sync_engine) != busy_timeout:
            raise ConfigurationError(
                "this SQLite engine is configured already; give busy_timeout on its "
                'first configuration (or connect_args={"timeout": ...} to create_engine)'
            )
        return
    _configured[sync_engine] = busy_timeout
    event.listen(sync_engine, "do_connect", _take_timeout(busy_timeout))
    event.listen(sync_engine, "connect", _on_connect)
    event.listen(sync_engine, "begin", _on_begin)


_configured: weakref.WeakKeyDictionary[Any, float | None] = weakref.WeakKeyDictionary()
"""The busy_timeout each configured engine was given (None: its connect_args')."""
_BUSY_TIMEOUT = 30.0
"""Seconds a SQLite statement waits for a lock unless told otherwise."""
_BUSY_MS = "choreosaga_busy_timeout_ms"
_MAX_BUSY_TIMEOUT = 2**31 // 1000
"""SQLite takes the busy timeout in milliseconds, as a C int."""


def safe_url(engine: AsyncEngine) -> str:
    """The engine's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


def require_configured(engine: AsyncEngine) -> str:
    """Return the engine's dialect, refusing SQLite engines not made safe for writers."""
    dialect = dialect_of(engine)
    if dialect == "sqlite" and not event.contains(engine.sync_engine, "begin", _on_begin):
        raise ConfigurationError(
            "this SQLite engine takes its write lock too late for concurrent writers: "
            "create it with outbox.create_engine(url) or call outbox.configure_sqlite(engine)"
        )
    return dialect


def is_transient_db_error(exc: BaseException) -> bool:
    """Whether a database error may go away if the transaction is tried again.

    True for outages (lost connections, pool timeouts, a server shutting
    down) and transient failures (deadlocks, serialization failures, lock
    and statement timeouts, SQLite's "database is locked"); false for
    constraint violations and SQL mistakes. See :mod:`outbox.failures`.
    """
    return classify(exc).retriable


def translate_db_error(exc: SQLAlchemyError, what: str) -> StoreError:
    """Map a SQLAlchemy error to a :class:`StoreError` that says what failed."""
    return StoreError(f"{what}: {describe(exc)}", kind=classify(exc))
