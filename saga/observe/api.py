"""Where a saga is and how it got there, for your own code (a "where is my order?" page).

Each function reads one source and returns a :class:`~saga.observe.trace.Trace`
(or ``None`` when the saga is unknown there)::

    from saga.observe import trace_from_log
    trace = await trace_from_log(engine, "order-00008")   # the observer's database
    trace.status, trace.explanation(), trace.to_dict()["timeline"]

A saga is (name, id): where sagas of several names have the id asked for
(``place_order`` and ``cancel_order`` of order 7, both ``order-7``), name the
saga (``saga="cancel_order"``); left out, each function raises
:class:`~saga.observe.trace.SeveralSagasError` (a ``ConfigurationError``)
naming them. A correlation id shared by several sagas traces the earliest.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import KafkaSettings
from outbox.database import read_connection
from saga.codec import AvroCodec
from saga.observe.log import SagaLog
from saga.observe.scan import scan_kafka
from saga.observe.topics import DEFAULT_PATTERNS
from saga.observe.trace import (
    SeveralSagasError,
    Trace,
    build_trace,
    messages_of,
    trace_from_stamp,
)
from saga.stamp import STAMP_SCHEMA, Stamp
from saga.state import SagaStates

__all__ = ["trace_from_kafka", "trace_from_log", "trace_from_service"]


async def trace_from_log(
    engine: AsyncEngine, ref: str, *, saga: str | None = None, log: SagaLog | None = None
) -> Trace | None:
    """The trace of saga ``ref`` (saga id or correlation id) from the saga log.

    Args:
        saga: The saga's name (needed when sagas of several names have the id ``ref``).

    Raises:
        SeveralSagasError: ``saga`` is left out and sagas of several names have the id.
    """
    log = log or SagaLog(dialect=engine.dialect.name)
    messages = await log.find(engine, ref, saga=saga)
    return build_trace(messages_of(messages, ref, saga=saga), source="saga log")


async def trace_from_kafka(
    kafka: KafkaSettings,
    codec: AvroCodec,
    ref: str,
    *,
    saga: str | None = None,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    progress: TextIO | None = None,
) -> Trace | None:
    """The trace of saga ``ref`` rebuilt by scanning the saga topics.

    Args:
        saga: The saga's name (needed when sagas of several names have the id ``ref``).

    Raises:
        SeveralSagasError: ``saga`` is left out and sagas of several names have the id.
    """
    messages = await scan_kafka(kafka, codec, ref, patterns=patterns, progress=progress)
    return build_trace(messages_of(messages, ref, saga=saga), source="Kafka topics")


async def trace_from_service(
    engine: AsyncEngine,
    codec: AvroCodec,
    ref: str,
    *,
    saga: str | None = None,
    table: str = "saga_state",
) -> Trace | None:
    """The steps of saga ``ref`` as one service's own database knows them (its saga view).

    Args:
        saga: The saga's name (needed when sagas of several names have the id ``ref``).

    Raises:
        SeveralSagasError: ``saga`` is left out and sagas of several names have the id.
    """
    states = SagaStates(MetaData(), codec, dialect=engine.dialect.name, name=table)
    t = states.table
    query = select(t.c.saga_name, t.c.stamp, t.c.updated_at_ms).where(t.c.saga_id == ref)
    if saga is not None:
        query = query.where(t.c.saga_name == saga)
    async with read_connection(engine) as conn:
        rows = (await conn.execute(query)).all()
    if len(rows) > 1:
        raise SeveralSagasError(ref, (row.saga_name for row in rows))
    if rows:
        _, record = codec.decode(rows[0].stamp, expected=STAMP_SCHEMA)
        stamp = Stamp.from_avro(record)
        updated = datetime.fromtimestamp(rows[0].updated_at_ms / 1000, UTC)
        return trace_from_stamp(stamp, updated_at=updated)
    # A correlation id shared by several sagas: the earliest, as from the log.
    shared = [stamp for stamp in await states.all(engine, saga) if stamp.correlation_id == ref]
    if not shared:
        return None
    return trace_from_stamp(min(shared, key=lambda stamp: stamp.started_at))
