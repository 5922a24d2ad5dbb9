"""The error model: what a failure means, decided in one place.

Every failure the relay, the consumer or a handler's transaction meets is one
of three kinds, and the kind alone decides what happens next:

========== ============================================= =============================
kind       examples                                      what the runtime does
========== ============================================= =============================
OUTAGE     database or broker unreachable, connection    wait and retry with backoff
           refused or lost, pool timeout, server         for as long as it lasts; the
           shutting down, too many connections           message or row never notices
TRANSIENT  deadlock, serialization failure, lock or      retry with the handler's
           statement timeout, SQLite "database is        bounded policy, then treat
           locked", an error with ``retriable = True``    it as PERMANENT
PERMANENT  anything else: a bug, bad input, a            stop this message (dead
           constraint violation, an unknown topic        letter) or row (parked)
========== ============================================= =============================

A business failure (a step that refuses, ``ctx.fail``) is not an error at
all here; the saga layer handles it before anything is classified.

Errors of our own carry their kind (``error.kind``); foreign ones (SQLAlchemy,
psycopg, sqlite3, aiokafka, the operating system) are classified by
:func:`classify`, which also follows ``__cause__`` through wrappers. Why a
few cases are where they are:

* SQLAlchemy's pool ``TimeoutError`` ("QueuePool limit … reached") means
  every connection is busy or the server is slow to accept: an outage, never
  a reason to fail a saga step.
* PostgreSQL's 57014 (statement or lock timeout) is TRANSIENT, not OUTAGE:
  a statement that always times out would otherwise hold its partition
  forever.
* psycopg reports "connection refused" as ``OperationalError`` without a
  SQLSTATE, and a connection lost mid-statement as one whose connection
  SQLAlchemy marks invalidated: both are outages.
* A bare ``ConnectionError`` (from a handler's own HTTP client, say) is
  TRANSIENT, not an outage of ours: waiting without end for a service that
  may never answer at that address would block the partition for good.
* psycopg also reports a server that refuses the connection for good (the
  database or role does not exist, the password is wrong) without a
  SQLSTATE; only the server's ``FATAL`` message tells it apart from an
  outage, and waiting will not make the database appear: PERMANENT.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

__all__ = ["ErrorKind", "classify", "describe", "is_lock_conflict"]


class ErrorKind(enum.Enum):
    """What a failure means for the message or row that met it."""

    OUTAGE = "outage"
    """A server cannot be reached: wait for as long as it lasts."""

    TRANSIENT = "transient"
    """This attempt failed but another may not: retry a bounded number of times."""

    PERMANENT = "permanent"
    """Trying again will fail again: a bug, bad input, or a refused request."""

    @property
    def retriable(self) -> bool:
        """Whether trying the same thing again later can succeed."""
        return self is not ErrorKind.PERMANENT


# PostgreSQL SQLSTATEs by kind. 08* connection exceptions, 53* insufficient
# resources (too many connections, out of memory or disk), 57P01..03 admin
# shutdown, crash shutdown, cannot connect now: the server is not usable.
_OUTAGE_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03")
# 40001 serialization_failure, 40P01 deadlock_detected, 55P03
# lock_not_available, 57014 query_canceled (statement or lock timeout).
_TRANSIENT_SQLSTATES = ("40001", "40P01", "55P03", "57014")
_LOCK_CONFLICT_SQLSTATES = ("40001", "40P01")
# SQLite reports contention only through its messages.
_TRANSIENT_SQLITE = ("database is locked", "database table is locked", "database schema is locked")
_OUTAGE_SQLITE = ("disk i/o error", "unable to open database file")
# What psycopg says, without a SQLSTATE, when the connection itself is the trouble.
_CONNECTION_TROUBLE = (
    "connection",
    "server closed",
    "could not receive",
    "could not send",
    "consuming input failed",
    "ssl",
    "timeout expired",
    "terminating",
)
# What a PostgreSQL server says (FATAL, no SQLSTATE through psycopg's connect)
# when it refuses a connection for a reason waiting will not fix.
_REFUSED_FOR_GOOD = (
    "does not exist",  # database or role
    "password authentication failed",
    "no pg_hba.conf entry",
)

# aiokafka errors that mean the broker (or the route to it) is unavailable.
_KAFKA_OUTAGE_NAMES = frozenset(
    {
        "KafkaConnectionError",
        "NodeNotReadyError",
        "RequestTimedOutError",
        "KafkaTimeoutError",
        "NotLeaderForPartitionError",
        "LeaderNotAvailableError",
        "NotEnoughReplicasError",
        "NotEnoughReplicasAfterAppendError",
        "CoordinatorNotAvailableError",
        "NotCoordinatorError",
        "CoordinatorLoadInProgressError",
        "BrokerNotAvailableError",
        "ProducerClosed",
        "ConsumerStoppedError",
    }
)


def classify(exc: BaseException) -> ErrorKind:
    """Return what ``exc`` means: an outage, a transient failure, or a permanent one.

    Wrappers are seen through: an error raised ``from`` another, or raised
    while handling another (``__context__``, unless suppressed with ``from
    None``), is classified by the most specific kind found along that chain
    (an outage anywhere in it makes it an outage), so that a handler that
    wraps a lost connection in its own exception does not turn an outage
    into a bug.
    """
    kinds = {_classify_one(current) for current in _chain(exc)}
    for kind in (ErrorKind.OUTAGE, ErrorKind.TRANSIENT):
        if kind in kinds:
            return kind
    return ErrorKind.PERMANENT


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether ``exc``, or an error along its chain, is a deadlock or a serialization failure.

    PostgreSQL's 40P01 and 40001: two transactions wanted rows the other held
    (a transient error; :func:`classify` says so too). Handlers that each lock
    one row cannot deadlock one transaction per message, but batches of such
    messages in concurrent transactions can.
    """
    return any(
        isinstance(current, DBAPIError)
        and getattr(current.orig, "sqlstate", None) in _LOCK_CONFLICT_SQLSTATES
        for current in _chain(exc)
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, and so on."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.__cause__ is not None or current.__suppress_context__:
            current = current.__cause__
        else:
            current = current.__context__


def _classify_one(exc: BaseException) -> ErrorKind:
    own = getattr(exc, "kind", None)
    if isinstance(own, ErrorKind):
        return own
    if isinstance(exc, PoolTimeoutError):
        return ErrorKind.OUTAGE
    if isinstance(exc, DBAPIError):
        return _classify_db(exc)
    if type(exc).__module__.startswith("aiokafka"):
        if type(exc).__name__ in _KAFKA_OUTAGE_NAMES:
            return ErrorKind.OUTAGE
        return ErrorKind.TRANSIENT if getattr(exc, "retriable", False) else ErrorKind.PERMANENT
    if isinstance(exc, ConnectionError):
        # Raised by a handler's own client (an HTTP API, say), not by our
        # database or broker, whose errors are classified above: bounded, or
        # a wrong address would hold its partition forever.
        return ErrorKind.TRANSIENT
    if getattr(exc, "retriable", False) is True:
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT


def _classify_db(exc: DBAPIError) -> ErrorKind:
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return ErrorKind.OUTAGE
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate.startswith(_OUTAGE_SQLSTATES):
            return ErrorKind.OUTAGE
        if sqlstate.startswith(_TRANSIENT_SQLSTATES):
            return ErrorKind.TRANSIENT
        return ErrorKind.PERMANENT
    if isinstance(exc, OperationalError):
        if type(orig).__module__.startswith("sqlite3"):
            message = str(orig).lower()
            if any(marker in message for marker in _TRANSIENT_SQLITE):
                return ErrorKind.TRANSIENT
            if any(marker in message for marker in _OUTAGE_SQLITE):
                return ErrorKind.OUTAGE
            return ErrorKind.PERMANENT  # SQLite reports SQL mistakes as OperationalError too
        message = str(orig)
        if "FATAL" in message and any(marker in message for marker in _REFUSED_FOR_GOOD):
            return ErrorKind.PERMANENT
        if any(marker in message.lower() for marker in _CONNECTION_TROUBLE):
            return ErrorKind.OUTAGE  # psycopg: connection refused, server gone, no SQLSTATE
        # No SQLSTATE and nothing about the connection (psycopg refusing a
        # statement before sending it, say): bounded, not an outage.
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT


def describe(exc: BaseException) -> str:
    """One line about an error that never quotes data: safe for logs and stamps.

    PostgreSQL adds the failing row's values to constraint errors (``DETAIL:
    Key (card)=(…)``), and SQLAlchemy adds the statement: for a database
    error this keeps the driver's error class, the SQLSTATE and the primary
    message only.
    """
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        orig = exc.orig
        diag = getattr(orig, "diag", None)
        primary = getattr(diag, "message_primary", None) if diag is not None else None
        text = primary or (str(orig).strip().splitlines() or [""])[0]
        sqlstate = getattr(orig, "sqlstate", None)
        code = f" [{sqlstate}]" if sqlstate else ""
        return f"{type(orig).__name__}{code}: {text}"[:500]
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
