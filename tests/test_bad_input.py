"""Bad input is refused by decoding, fast and small; malformed trace headers are tolerated.

Every record of the catalogue in ``tests/badinput.py`` must make
``EnvelopeCodec.decode`` raise ``DecodeError`` (and nothing else), keeping the
value byte for byte, within a time and memory bound, with a short message
that quotes no payload: that is what lets a consumer dead-letter the record
and move on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import tracemalloc
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from badinput import LARGEST_RECORD_BYTES, BadRecord, bad_records, tolerated_records
from conftest import NewTopicFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from support import read_topic

from outbox import KafkaSettings, create_engine, ensure_topics
from saga.codec import AvroCodec, DecodeLimits
from saga.context import MessageContext
from saga.dlq import read_dead_letters
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import DecodeError, EncodeError
from saga.schemas import SchemaRegistry
from saga.service import Service
from saga.stamp import SagaStatus, Stamp, StepOutcome, StepRecord

TESTS = Path(__file__).parent
STAMP_AVSC = TESTS.parent / "schemas" / "choreosaga" / "saga" / "Stamp.v2.avsc"
FAREWELL = "choreosaga.test.Farewell"
MARKER = "PAYLOAD-MARKER-5e1f"
T0 = datetime(2024, 5, 17, 9, 30, 15, tzinfo=UTC)
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

MAX_SECONDS = 0.5
"""CPU time of the decoding thread, which a loaded machine pausing the test does not add to."""
MAX_PEAK_BYTES = 3 * 1024 * 1024


def make_codec(limits: DecodeLimits | None = None) -> EnvelopeCodec:
    """Farewell (strings, bytes, an array, a map, an enum, a fixed), Item and the stamp."""
    registry = SchemaRegistry()
    registry.register((TESTS / "schemas/evolution/choreosaga/test/Farewell.avsc").read_text())
    registry.register((TESTS / "schemas/core/choreosaga/test/Item.avsc").read_text())
    registry.register(STAMP_AVSC.read_text())
    return EnvelopeCodec(AvroCodec(registry, limits=limits))


def stamp(steps: int = 2) -> Stamp:
    return Stamp(
        saga_name="place_order",
        saga_id="order-42",
        status=SagaStatus.RUNNING,
        steps=tuple(
            StepRecord(
                name=f"step{i}", service="svc", outcome=StepOutcome.DONE, at=T0, data={"k": "v"}
            )
            for i in range(steps)
        ),
        correlation_id="corr-1",
        started_at=T0,
    )


def farewell() -> Envelope:
    return Envelope(
        type=FAREWELL,
        data={
            "text": MARKER,
            "mood": "SAD",
            "tags": ["a", MARKER],
            "scores": {MARKER: 1.5},
            "digest": b"\x01\x02\x03\x04",
            "payload": MARKER.encode(),
        },
        source="urn:choreosaga:test",
        key=b"order-42",
        id="msg-1",
        time=T0,
        correlation_id="corr-1",
        causation_id="msg-0",
        traceparent=TP,
        tracestate="vendor=abc",
        stamp=stamp(),
    )


CODEC = make_codec()
CATALOGUE = bad_records(CODEC, farewell())
TOLERATED = tolerated_records(CODEC, farewell())


@pytest.mark.parametrize("record", CATALOGUE, ids=[r.name for r in CATALOGUE])
def test_bad_record_is_a_decode_error_fast_small_and_without_payload(record: BadRecord) -> None:
    tracemalloc.start()
    started = time.thread_time()
    try:
        with pytest.raises(DecodeError) as caught:
            CODEC.decode(record.key, record.value, record.headers)
        elapsed = time.thread_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = caught.value
    assert type(error) is DecodeError
    assert error.raw == (record.value or b"")
    if record.value is not None:
        assert error.raw is record.value  # the very bytes, for the dead letter
    assert elapsed < MAX_SECONDS, f"{elapsed:.3f} s"
    assert peak < MAX_PEAK_BYTES, f"peak {peak / 1e6:.1f} MB"
    message = str(error)
    assert 0 < len(message) <= 200, message
    assert MARKER not in message
    assert "\\x" not in message  # no bytes quoted
    assert "b'" not in message


def test_the_catalogue_covers_every_kind_of_bad_input() -> None:
    names = {r.name for r in CATALOGUE}
    expected = {
        "value-random-bytes",
        "value-truncated",
        "value-trailing-bytes",
        "value-unknown-fingerprint",
        "header-ce_type-another-registered-type",
        "header-ce_id-10000-chars",
        "header-ce_source-missing",
        "header-ce_time-not-utf8",
        "stamp-200000-steps",
        "stamp-legacy-binary-200000-steps",
    }
    for kind in ("array", "map"):
        for where in ("value", "stamp"):
            expected |= {
                f"{where}-{kind}-count-2**31",
                f"{where}-{kind}-count-2**62",
                f"{where}-{kind}-negative-count-2**62",
                f"{where}-{kind}-negative-count-wrong-size",
            }
    expected |= {f"value-{k}-length-2**{n}" for k in ("bytes", "string") for n in (31, 62)}
    assert expected <= names, sorted(expected - names)


def test_the_attack_values_name_their_real_schema_so_only_the_lengths_are_wrong() -> None:
    (record,) = [r for r in CATALOGUE if r.name == "value-array-count-2**62"]
    with pytest.raises(DecodeError, match="array items cannot fit in the 64 bytes left"):
        CODEC.decode(record.key, record.value, record.headers)


@pytest.mark.parametrize("record", TOLERATED, ids=[r.name for r in TOLERATED])
def test_a_malformed_trace_header_is_dropped_and_the_record_decodes(record: BadRecord) -> None:
    received = CODEC.decode(record.key, record.value, record.headers)
    assert received == replace(farewell(), traceparent=received.traceparent, tracestate=None)
    if record.name.startswith("traceparent-"):
        assert received.traceparent is None
    else:
        assert received.traceparent == TP


def test_the_catalogue_built_on_the_shop_schemas_is_refused_too() -> None:
    """The reference shop's events only have strings: attacks on arrays and maps use another
    registered schema (the stamp's) as the value, named by its ``ce_type``."""
    codec = EnvelopeCodec(AvroCodec(SchemaRegistry.default()))
    order = Envelope(
        type="choreosaga.shop.ShipmentCreated",
        data={"order_id": "order-42", "shipment_id": MARKER},
        source="/choreosaga/shipping",
        key=b"order-42",
        stamp=stamp(),
    )
    records = bad_records(codec, order)
    assert {"value-array-count-2**62", "value-map-count-2**62"} <= {r.name for r in records}
    for record in records:
        with pytest.raises(DecodeError) as caught:
            codec.decode(record.key, record.value, record.headers)
        assert MARKER not in str(caught.value), record.name


def test_stamp_limits_are_configurable_and_encoding_respects_them() -> None:
    long_saga = replace(farewell(), stamp=stamp(steps=300))
    default = make_codec()
    with pytest.raises(EncodeError, match="300 steps"):
        default.encode(long_saga)
    roomy = make_codec(DecodeLimits(max_stamp_steps=300))
    record = roomy.encode(long_saga)
    assert roomy.decode(*record) == long_saga
    with pytest.raises(DecodeError, match="300 steps, over the limit of 256"):
        default.decode(*record)


def test_header_limits_are_configurable() -> None:
    long_id = replace(farewell(), id="x" * 10_000)
    with pytest.raises(EncodeError, match="ce_id"):
        make_codec().encode(long_id)
    roomy = make_codec(DecodeLimits(max_header_bytes=10_000))
    assert roomy.decode(*roomy.encode(long_id)).id == "x" * 10_000


_HEADER_NAMES = st.sampled_from(
    [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "ce_correlationid",
        "ce_causationid",
        "traceparent",
        "tracestate",
        "ce_sagastamp",
        "saga_stamp",
        "content-type",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(
        st.tuples(_HEADER_NAMES, st.none() | st.binary(max_size=40)), min_size=1, max_size=4
    ),
    flip=st.none() | st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
)
def test_any_damage_to_headers_or_stamp_gives_an_envelope_or_a_decode_error(
    changes: list[tuple[str, bytes | None]], flip: tuple[int, int] | None
) -> None:
    key, value, headers = CODEC.encode(farewell())
    found: dict[str, bytes | None] = dict(headers)
    if flip is not None:
        stamp_bytes = bytearray(base64.b64decode(found["ce_sagastamp"] or b""))
        stamp_bytes[flip[0] % len(stamp_bytes)] ^= flip[1]
        found["ce_sagastamp"] = base64.b64encode(bytes(stamp_bytes))
    for name, text in changes:
        found[name] = text
    outcome: Envelope | DecodeError
    try:
        outcome = CODEC.decode(key, value, list(found.items()))
    except DecodeError as exc:
        outcome = exc
    if isinstance(outcome, DecodeError):
        assert outcome.raw is value
    else:
        assert outcome.type == FAREWELL
        assert outcome.data["text"] == MARKER


def test_trace_context_that_readers_would_drop_is_not_written_and_fails_nothing() -> None:
    codec = make_codec(DecodeLimits(max_header_bytes=64))
    long_state = ",".join(f"k{i}=v" for i in range(20))  # valid W3C, over 64 bytes
    _, _, headers = codec.encode(replace(farewell(), tracestate=long_state))
    assert dict(headers)["traceparent"] == TP.encode()
    assert "tracestate" not in dict(headers)
    _, _, headers = codec.encode(replace(farewell(), traceparent="garbage"))
    assert "traceparent" not in dict(headers)
    assert "tracestate" not in dict(headers)


async def test_every_bad_record_read_back_from_the_real_broker_is_a_decode_error(
    kafka_settings: KafkaSettings, new_topic: NewTopicFactory
) -> None:
    """The catalogue survives the broker byte for byte (aiokafka's header types and all),
    and each record as a consumer receives it is refused, with the value it carried."""
    topic = await new_topic(partitions=1)
    records = [*CATALOGUE, *TOLERATED]
    producer = AIOKafkaProducer(
        **kafka_settings.producer_kwargs(), max_request_size=LARGEST_RECORD_BYTES
    )
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(
                topic, record.value, key=record.key, headers=list(record.headers)
            )
    finally:
        await producer.stop()
    received = await read_topic(kafka_settings, topic, len(records))
    assert len(received) == len(records)
    for sent, got in zip(records, received, strict=True):
        assert (got.key, got.value) == (sent.key, sent.value), sent.name
        if sent in TOLERATED:
            assert CODEC.decode(got.key, got.value, got.headers).id == "msg-1"
            continue
        with pytest.raises(DecodeError) as caught:
            CODEC.decode(got.key, got.value, got.headers)
        assert caught.value.raw == (sent.value or b""), sent.name


def test_limits_given_to_the_envelope_codec_bound_the_value_too() -> None:
    key, value, headers = CODEC.encode(farewell())
    tight = EnvelopeCodec(CODEC.codec, limits=DecodeLimits(max_value_bytes=len(value) - 1))
    with pytest.raises(DecodeError, match="limit"):
        tight.decode(key, value, headers)
    few = EnvelopeCodec(CODEC.codec, limits=DecodeLimits(max_items=2))
    with pytest.raises(DecodeError, match="too many array items"):
        few.decode(key, value, headers)


async def test_a_running_service_dead_letters_every_bad_record_and_keeps_going(
    kafka_settings: KafkaSettings,
    new_topic: NewTopicFactory,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The whole catalogue through a live service on the real broker and PostgreSQL.

    Every bad record lands on the dead-letter topic byte for byte, every
    tolerated one is handled, the records after them are handled in order,
    and the logs quote none of the payloads.
    """
    caplog.set_level(logging.INFO)
    topic = await new_topic(partitions=1)
    await ensure_topics(kafka_settings, {topic + ".dlq": 1})
    # The relay must be able to publish the largest dead letters too.
    kafka = replace(
        kafka_settings,
        producer_options={
            **kafka_settings.producer_options,
            "max_request_size": LARGEST_RECORD_BYTES,
        },
    )
    engine = create_engine(postgres_url)
    service = Service("catalogue", engine=engine, kafka=kafka, codec=CODEC.codec)
    seen: list[str] = []

    @service.subscribe(topic, FAREWELL)
    async def handle(ctx: MessageContext) -> None:
        seen.append(ctx.envelope.id)

    good = [replace(farewell(), id=f"good-{i}") for i in range(2)]
    producer = AIOKafkaProducer(
        **kafka_settings.producer_kwargs(), max_request_size=LARGEST_RECORD_BYTES
    )
    await service.create_tables()
    await producer.start()
    try:
        async with service:
            await service.wait_assigned()
            first = CODEC.encode(good[0])
            await producer.send_and_wait(topic, first[1], key=first[0], headers=first[2])
            for record in [*CATALOGUE, *TOLERATED]:
                await producer.send_and_wait(
                    topic, record.value, key=record.key, headers=list(record.headers)
                )
            last = CODEC.encode(good[1])
            await producer.send_and_wait(topic, last[1], key=last[0], headers=last[2])
            deadline = time.monotonic() + 90
            while "good-1" not in seen or service.stats.dead_lettered < len(CATALOGUE):
                assert time.monotonic() < deadline, (seen, service.stats)
                await asyncio.sleep(0.1)
            letters = await read_dead_letters(kafka_settings, [topic + ".dlq"])
            while len(letters) < len(CATALOGUE):
                assert time.monotonic() < deadline, f"{len(letters)} dead letters published"
                await asyncio.sleep(0.5)
                letters = await read_dead_letters(kafka_settings, [topic + ".dlq"])
    finally:
        await producer.stop()
        await engine.dispose()

    # Handled in order: the first good record, the tolerated ones (one id, so
    # once), the last good record. Nothing bad was handled.
    assert seen == ["good-0", "msg-1", "good-1"]
    assert service.stats.undecodable == len(CATALOGUE)
    assert sorted(d.value or b"" for d in letters) == sorted(r.value or b"" for r in CATALOGUE)
    for letter in letters:
        assert letter.error_type == "saga.errors.DecodeError"
        assert letter.info["role"] == "decode"
        assert letter.original_topic == topic
    assert MARKER not in caplog.text
