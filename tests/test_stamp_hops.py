"""The hop counter of the stamp: carried on the wire, merged as a maximum."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from saga import Envelope, SagaStatus, SchemaRegistry, Stamp
from saga.codec import AvroCodec
from saga.envelope import EnvelopeCodec
from saga.errors import ConfigurationError
from saga.stamp import STAMP_SCHEMA
from saga.state import merge

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stamp(**changes: object) -> Stamp:
    values: dict[str, object] = {
        "saga_name": "place_order",
        "saga_id": "order-1",
        "status": SagaStatus.RUNNING,
        "correlation_id": "c-1",
        "started_at": T0,
    }
    values.update(changes)
    return Stamp(**values)  # type: ignore[arg-type]


def test_a_message_carries_its_hop_through_kafka_headers() -> None:
    codec = EnvelopeCodec(AvroCodec(SchemaRegistry.default()))
    sent = Envelope(
        type="choreosaga.saga.SagaEnded",
        data={"status": "COMPLETED", "reason": None},
        source="/choreosaga/order",
        stamp=stamp(hop=7),
    )
    received = codec.decode(*codec.encode(sent))
    assert received.stamp is not None
    assert received.stamp.hop == 7


def test_a_stamp_written_without_a_hop_reads_as_hop_zero() -> None:
    # A writer that predates the hop (the schema without the field) is read
    # with the current one: the default applies.
    registry = SchemaRegistry.default()
    current = registry.latest(STAMP_SCHEMA).parsed
    old = dict(current, fields=[f for f in current["fields"] if f["name"] != "hop"])
    older = SchemaRegistry()
    older.register(old)
    registry.register(old)
    registry.register(current)  # the current version stays the latest
    record = stamp(hop=3).to_avro()
    del record["hop"]
    raw = AvroCodec(older).encode(STAMP_SCHEMA, record)
    _, decoded = AvroCodec(registry).decode(raw, expected=STAMP_SCHEMA)
    assert Stamp.from_avro(decoded).hop == 0


def test_merge_keeps_the_highest_hop_seen_and_next_hop_adds_one() -> None:
    view = stamp(hop=4)
    late = stamp(hop=2)
    assert merge(view, late).hop == 4
    assert merge(late, view).hop == 4
    assert merge(view, late).next_hop().hop == 5
    assert view.with_status(SagaStatus.COMPENSATING).hop == 4


def test_a_negative_hop_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        stamp(hop=-1)
