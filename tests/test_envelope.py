"""Tests for the envelope (a domain event as a Kafka record), the stamp and trace context.

What is checked is what a consumer, or any other Kafka or Avro tool, relies on:
the CloudEvents binary-mode headers, a value and a stamp that plain fastavro
reads given the ``.avsc`` files, lossless round trips, one ``DecodeError``
(keeping the value) for every bad record, and the stamp's semantics.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given
from hypothesis import strategies as st

from saga.codec import AvroCodec
from saga.envelope import Envelope, EnvelopeCodec
from saga.errors import ConfigurationError, DecodeError
from saga.schemas import SchemaRegistry
from saga.stamp import STAMP_SCHEMA, SagaStatus, Stamp, StepOutcome, StepRecord
from saga.tracecontext import current_trace_headers, use_trace_headers

ROOT = Path(__file__).resolve().parent.parent
ITEM_AVSC = Path(__file__).parent / "schemas" / "core" / "choreosaga" / "test" / "Item.avsc"
STAMP_AVSC = ROOT / "schemas" / "choreosaga" / "saga" / "Stamp.v2.avsc"
ITEM = "choreosaga.test.Item"

TRACEPARENT = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)
T0 = datetime(2024, 5, 17, 9, 30, 15, 123456, tzinfo=UTC)
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

REQUIRED = ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"]


def envelope_codec() -> EnvelopeCodec:
    """Codec with ``choreosaga.test.Item`` and the stamp schema, read from the files.

    Not ``support.core_codec()``: it registers the project schemas by their
    Parsing Canonical Form, which drops the stamp's ``timestamp-millis``
    logical types, so that codec cannot encode a stamp.
    """
    registry = SchemaRegistry.from_directory(ITEM_AVSC.parent)
    registry.register(STAMP_AVSC.read_text(encoding="utf-8"))
    return EnvelopeCodec(AvroCodec(registry))


@pytest.fixture
def codec() -> EnvelopeCodec:
    return envelope_codec()


def avsc(path: Path) -> dict[str, Any]:
    parsed = parse_schema(json.loads(path.read_text(encoding="utf-8")))
    assert isinstance(parsed, dict)
    return parsed


def read_single_object(data: bytes, schema: dict[str, Any]) -> Any:
    """Read Avro single-object encoding with fastavro alone, checking the header."""
    assert data[:2] == b"\xc3\x01"
    assert data[2:10].hex() == fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    body = io.BytesIO(data[10:])
    record = schemaless_reader(body, schema, None)
    assert body.read() == b"", "trailing bytes after the record"
    return record


def step(
    name: str,
    outcome: StepOutcome = StepOutcome.DONE,
    at: datetime = T0,
    **data: str,
) -> StepRecord:
    return StepRecord(name=name, service=f"{name}-svc", outcome=outcome, at=at, data=data)


def stamp(**overrides: Any) -> Stamp:
    fields: dict[str, Any] = {
        "saga_name": "place_order",
        "saga_id": "order-42",
        "status": SagaStatus.COMPENSATING,
        "steps": (
            step("reserve_stock", reservation_id="r-7"),
            step("charge_payment", StepOutcome.FAILED, T0 + timedelta(seconds=2)),
        ),
        "correlation_id": "corr-1",
        "started_at": T0 - timedelta(minutes=1),
        "deadline": T0 + timedelta(hours=1),
        "reason": "card declined",
        "version": 3,
    }
    fields.update(overrides)
    return Stamp(**fields)


def envelope(**overrides: Any) -> Envelope:
    fields: dict[str, Any] = {
        "type": ITEM,
        "data": {"key": "order-42", "seq": 7, "note": "first"},
        "source": "urn:choreosaga:order",
        "key": b"order-42",
        "time": T0,
        "correlation_id": "corr-1",
        "causation_id": "msg-0",
        "traceparent": TP,
        "tracestate": "vendor=abc",
        "stamp": stamp(),
    }
    fields.update(overrides)
    return Envelope(**fields)


def replace_header(
    headers: list[tuple[str, bytes]], name: str, value: bytes | None
) -> list[tuple[str, bytes | None]]:
    """Headers with ``name`` set to ``value``, or removed when ``value`` is None."""
    kept: list[tuple[str, bytes | None]] = [(n, v) for n, v in headers if n != name]
    return kept if value is None else [*kept, (name, value)]


# --- headers ------------------------------------------------------------------


def test_headers_are_cloudevents_binary_mode_with_lineage_trace_and_stamp(
    codec: EnvelopeCodec,
) -> None:
    sent = envelope()
    _, _, headers = codec.encode(sent)
    names = [name for name, _ in headers]
    assert sorted(names) == sorted(
        [
            *REQUIRED,
            "ce_correlationid",
            "ce_causationid",
            "traceparent",
            "tracestate",
            "ce_subject",
            "ce_sagastamp",
        ]
    )
    found = dict(headers)
    assert found["ce_specversion"] == b"1.0"
    assert found["ce_id"] == sent.id.encode()
    assert found["ce_type"] == b"choreosaga.test.Item"
    assert found["ce_source"] == b"urn:choreosaga:order"
    assert found["content-type"] == b"application/avro"
    assert found["ce_correlationid"] == b"corr-1"
    assert found["ce_causationid"] == b"msg-0"
    assert found["traceparent"] == TP.encode()
    assert found["tracestate"] == b"vendor=abc"
    assert found["ce_subject"] == b"order-42"  # the saga id


def test_envelope_without_lineage_trace_or_stamp_has_only_the_required_headers(
    codec: EnvelopeCodec,
) -> None:
    key, _, headers = codec.encode(
        envelope(
            key=None,
            correlation_id=None,
            causation_id=None,
            traceparent=None,
            tracestate=None,
            stamp=None,
        )
    )
    assert [name for name, _ in headers] == REQUIRED
    assert key is None


def test_traceparent_from_the_current_context_is_w3c_and_tracestate_is_left_out_when_unset(
    codec: EnvelopeCodec,
) -> None:
    traceparent, tracestate = current_trace_headers()
    _, _, headers = codec.encode(envelope(traceparent=traceparent, tracestate=tracestate))
    found = dict(headers)
    assert TRACEPARENT.fullmatch(found["traceparent"].decode())
    assert "tracestate" not in found


@pytest.mark.parametrize(
    "moment",
    [
        T0,
        datetime(2024, 5, 17, 15, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2023, 12, 31, 23, 59, 59, 1, tzinfo=timezone(timedelta(hours=-8))),
    ],
    ids=["utc-micros", "plus-0530", "minus-0800"],
)
def test_ce_time_is_rfc3339_with_its_offset(codec: EnvelopeCodec, moment: datetime) -> None:
    _, _, headers = codec.encode(envelope(time=moment))
    text = dict(headers)["ce_time"].decode()
    assert RFC3339.fullmatch(text), text
    assert datetime.fromisoformat(text) == moment


def test_default_time_is_now_and_rfc3339(codec: EnvelopeCodec) -> None:
    before = datetime.now(UTC)
    sent = Envelope(type=ITEM, data={"key": "k", "seq": 1}, source="urn:s")
    _, _, headers = codec.encode(sent)
    text = dict(headers)["ce_time"].decode()
    assert RFC3339.fullmatch(text), text
    assert before <= datetime.fromisoformat(text) <= datetime.now(UTC)


def test_every_header_value_is_utf8_text_and_the_stamp_is_base64(codec: EnvelopeCodec) -> None:
    _, _, headers = codec.encode(envelope(source="urn:choreosaga:café", correlation_id="κόσμε"))
    found = dict(headers)
    assert found["ce_source"].decode("utf-8") == "urn:choreosaga:café"
    assert found["ce_correlationid"].decode("utf-8") == "κόσμε"
    for _, value in headers:
        value.decode("utf-8")  # raises if not UTF-8
    assert re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", found["ce_sagastamp"])
    assert base64.b64decode(found["ce_sagastamp"], validate=True)[:2] == b"\xc3\x01"


def stamp_bytes_of(headers: list[tuple[str, bytes]]) -> bytes:
    """The Avro single-object bytes of the stamp carried in ``ce_sagastamp``."""
    return base64.b64decode(dict(headers)["ce_sagastamp"], validate=True)


def as_legacy_record(headers: list[tuple[str, bytes]]) -> list[tuple[str, bytes | None]]:
    """Headers as written before the stamp became text: raw Avro in ``saga_stamp``."""
    legacy = replace_header(headers, "ce_sagastamp", None)
    return [*legacy, ("saga_stamp", stamp_bytes_of(headers))]


# --- value and stamp readable by any Avro library -----------------------------


def test_value_is_plain_avro_single_object_encoding(codec: EnvelopeCodec) -> None:
    _, value, _ = codec.encode(envelope(data={"key": "order-42", "seq": 7, "note": "n"}))
    assert read_single_object(value, avsc(ITEM_AVSC)) == {
        "key": "order-42",
        "seq": 7,
        "note": "n",
    }


def test_stamp_header_is_plain_avro_single_object_encoding_of_stamp_avsc(
    codec: EnvelopeCodec,
) -> None:
    _, _, headers = codec.encode(envelope())
    record = read_single_object(stamp_bytes_of(headers), avsc(STAMP_AVSC))
    assert record == {
        "version": 3,
        "saga_name": "place_order",
        "saga_id": "order-42",
        "status": "COMPENSATING",
        "steps": [
            {
                "name": "reserve_stock",
                "service": "reserve_stock-svc",
                "outcome": "DONE",
                "at": datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC),
                "data": {"reservation_id": "r-7"},
            },
            {
                "name": "charge_payment",
                "service": "charge_payment-svc",
                "outcome": "FAILED",
                "at": datetime(2024, 5, 17, 9, 30, 17, 123000, tzinfo=UTC),
                "data": {},
            },
        ],
        "correlation_id": "corr-1",
        "started_at": datetime(2024, 5, 17, 9, 29, 15, 123000, tzinfo=UTC),
        "deadline": datetime(2024, 5, 17, 10, 30, 15, 123000, tzinfo=UTC),
        "reason": "card declined",
        "suspension": None,
        "hop": 0,
    }


# --- round trip -----------------------------------------------------------------


def test_round_trip_gives_an_equal_envelope(codec: EnvelopeCodec) -> None:
    sent = envelope()
    received = codec.decode(*codec.encode(sent))
    assert received == sent
    assert received.stamp is not None
    assert received.stamp.steps[0].data == {"reservation_id": "r-7"}
    assert received.stamp.deadline == datetime(2024, 5, 17, 10, 30, 15, 123000, tzinfo=UTC)
    assert received.time == T0  # the header keeps microseconds


def test_a_record_handed_on_is_parsed_once_and_a_new_record_again(
    codec: EnvelopeCodec,
) -> None:
    # Tracing decodes a record just before the pipeline decodes the same
    # objects: the second decode reuses the first, and only for those objects.
    key, value, headers = codec.encode(envelope())
    first = codec.decode(key, value, headers)
    assert codec.decode(key, value, headers) is first
    copy = codec.decode(key, bytes(bytearray(value)), list(headers))
    assert copy == first
    assert copy is not first
    other = codec.decode(*codec.encode(envelope()))
    assert other.id != first.id


def test_round_trip_of_a_bare_envelope(codec: EnvelopeCodec) -> None:
    sent = Envelope(type=ITEM, data={"key": "k", "seq": -1, "note": ""}, source="urn:s")
    received = codec.decode(*codec.encode(sent))
    assert received == sent
    assert received.stamp is None
    assert received.correlation_id is None
    assert received.traceparent is None


def test_decoding_fills_in_field_defaults(codec: EnvelopeCodec) -> None:
    received = codec.decode(*codec.encode(envelope(data={"key": "k", "seq": 1})))
    assert received.data == {"key": "k", "seq": 1, "note": ""}


@given(
    moment=st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
        ),
    ),
    status=st.sampled_from(SagaStatus),
    outcome=st.sampled_from(StepOutcome),
    reason=st.none() | st.text(max_size=20),
    version=st.integers(min_value=1, max_value=2**63 - 1),
)
def test_stamp_round_trips_with_millisecond_times(
    moment: datetime,
    status: SagaStatus,
    outcome: StepOutcome,
    reason: str | None,
    version: int,
) -> None:
    sent_stamp = stamp(
        status=status,
        steps=(step("s1", outcome, moment, k="v"),),
        started_at=moment,
        deadline=moment + timedelta(days=1),
        reason=reason,
        version=version,
    )
    sent = envelope(time=moment, stamp=sent_stamp)
    codec = envelope_codec()
    received = codec.decode(*codec.encode(sent))
    assert received == sent
    assert received.stamp is not None
    millis = moment.astimezone(UTC).replace(microsecond=moment.microsecond // 1000 * 1000)
    assert received.stamp.started_at == millis
    assert received.stamp.steps[0].at == millis
    assert received.stamp.started_at.utcoffset() == timedelta(0)


# --- decode errors keep the value ----------------------------------------------


@pytest.mark.parametrize("name", ["ce_id", "ce_type", "ce_source", "ce_time"])
@pytest.mark.parametrize("how", ["absent", "null", "empty"])
def test_missing_required_header_is_a_decode_error_keeping_the_value(
    codec: EnvelopeCodec, name: str, how: str
) -> None:
    key, value, headers = codec.encode(envelope())
    broken = replace_header(headers, name, None)
    if how != "absent":
        broken.append((name, None if how == "null" else b""))
    with pytest.raises(DecodeError) as caught:
        codec.decode(key, value, broken)
    assert caught.value.raw == value


@pytest.mark.parametrize("declared", [b"choreosaga.saga.Stamp", b"choreosaga.test.Other", b"Item"])
def test_ce_type_not_matching_the_value_schema_is_a_decode_error(
    codec: EnvelopeCodec, declared: bytes
) -> None:
    key, value, headers = codec.encode(envelope())
    with pytest.raises(DecodeError) as caught:
        codec.decode(key, value, replace_header(headers, "ce_type", declared))
    assert caught.value.raw == value


@pytest.mark.parametrize(
    "name", ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "ce_correlationid"]
)
def test_non_utf8_header_is_a_decode_error(codec: EnvelopeCodec, name: str) -> None:
    key, value, headers = codec.encode(envelope())
    with pytest.raises(DecodeError) as caught:
        codec.decode(key, value, replace_header(headers, name, b"\xff\xfeid"))
    assert caught.value.raw == value


@pytest.mark.parametrize(
    "text", [b"2024-05-17T09:30:15", b"2024-05-17T09:30:15.123456", b"2024-05-17", b"yesterday"]
)
def test_time_without_timezone_or_not_a_time_is_a_decode_error(
    codec: EnvelopeCodec, text: bytes
) -> None:
    key, value, headers = codec.encode(envelope())
    with pytest.raises(DecodeError) as caught:
        codec.decode(key, value, replace_header(headers, "ce_time", text))
    assert caught.value.raw == value


def foreign_stamp(**overrides: Any) -> bytes:
    """A stamp written by plain fastavro, as another tool would, with some fields changed."""
    schema = avsc(STAMP_AVSC)
    record = {**stamp().to_avro(), **overrides}
    body = io.BytesIO()
    schemaless_writer(body, schema, record)
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
    return b"\xc3\x01" + fp + body.getvalue()


def corrupt_stamps() -> dict[str, bytes]:
    _, item_value, headers = envelope_codec().encode(envelope())
    good = stamp_bytes_of(headers)
    long_value = {
        "name": "s",
        "service": "x",
        "outcome": "DONE",
        "at": T0,
        "data": {"k": "v" * 2000},
    }
    return {
        "empty": b"",
        "truncated": good[:-3],
        "trailing-bytes": good + b"\x00",
        "not-single-object": b"\x00" * 20,
        "unknown-fingerprint": good[:2] + b"\x01" * 8 + good[10:],
        "an-item-not-a-stamp": item_value,
        "version-0": foreign_stamp(version=0),
        "empty-saga-id": foreign_stamp(saga_id=""),
        "oversized-step-data": foreign_stamp(steps=[long_value]),
    }


def with_stamp(
    headers: list[tuple[str, bytes]], stamp_bytes: bytes, form: str
) -> list[tuple[str, bytes | None]]:
    """Headers carrying ``stamp_bytes`` as today (base64 text) or as before (raw bytes)."""
    if form == "base64":
        return replace_header(headers, "ce_sagastamp", base64.b64encode(stamp_bytes))
    return [*replace_header(headers, "ce_sagastamp", None), ("saga_stamp", stamp_bytes)]


@pytest.mark.parametrize("form", ["base64", "legacy-binary"])
@pytest.mark.parametrize("stamp_bytes", corrupt_stamps().values(), ids=corrupt_stamps().keys())
def test_corrupt_stamp_header_is_a_decode_error_keeping_the_value(
    codec: EnvelopeCodec, stamp_bytes: bytes, form: str
) -> None:
    key, value, headers = codec.encode(envelope())
    with pytest.raises(DecodeError) as caught:
        codec.decode(key, value, with_stamp(headers, stamp_bytes, form))
    assert caught.value.raw == value


@pytest.mark.parametrize("form", ["base64", "legacy-binary"])
def test_a_valid_foreign_stamp_is_accepted(codec: EnvelopeCodec, form: str) -> None:
    key, value, headers = codec.encode(envelope())
    written = foreign_stamp(reason=None, version=9)
    received = codec.decode(key, value, with_stamp(headers, written, form))
    assert received.stamp == stamp(reason=None, version=9)


def test_a_record_written_with_the_binary_stamp_header_is_still_read(
    codec: EnvelopeCodec,
) -> None:
    sent = envelope()
    key, value, headers = codec.encode(sent)
    legacy = as_legacy_record(headers)
    assert "ce_sagastamp" not in dict(legacy)
    assert dict(legacy)["saga_stamp"][:2] == b"\xc3\x01"
    assert codec.decode(key, value, legacy) == sent


def test_the_text_stamp_wins_over_a_binary_one_on_the_same_record(codec: EnvelopeCodec) -> None:
    key, value, headers = codec.encode(envelope())
    stale = foreign_stamp(version=1)
    received = codec.decode(key, value, [*headers, ("saga_stamp", stale)])
    assert received.stamp == stamp()


# --- stamp semantics -------------------------------------------------------------


def test_with_step_appends_a_new_revision_and_leaves_the_original_untouched() -> None:
    before = stamp()
    added = step("refund_payment", StepOutcome.COMPENSATED)
    after = before.with_step(added)
    assert after.steps == (*before.steps, added)
    assert after.version == before.version + 1
    assert before == stamp()
    assert len(before.steps) == 2


def test_with_status_changes_status_and_reason_in_a_new_revision() -> None:
    before = stamp(status=SagaStatus.RUNNING, reason=None, version=1)
    failing = before.with_status(SagaStatus.COMPENSATING, "card declined")
    done = failing.with_status(SagaStatus.COMPENSATED)
    assert (failing.status, failing.reason, failing.version) == (
        SagaStatus.COMPENSATING,
        "card declined",
        2,
    )
    assert (done.status, done.reason, done.version) == (SagaStatus.COMPENSATED, "card declined", 3)
    assert (before.status, before.reason, before.version) == (SagaStatus.RUNNING, None, 1)


def test_stamp_and_steps_cannot_be_mutated() -> None:
    data = {"reservation_id": "r-7"}
    record = StepRecord(
        name="reserve_stock", service="inv", outcome=StepOutcome.DONE, at=T0, data=data
    )
    data["reservation_id"] = "changed"
    assert record.data == {"reservation_id": "r-7"}
    with pytest.raises(TypeError):
        record.data["x"] = "y"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stamp().version = 5  # type: ignore[misc]
    steps = [record]
    built = stamp(steps=steps)
    steps.append(record)
    assert built.steps == (record,)


def test_to_compensate_is_done_steps_not_yet_undone_most_recent_first() -> None:
    reserve = step("reserve_stock")
    charge = step("charge_payment")
    ship = step("ship", StepOutcome.FAILED)
    forward = stamp(steps=(reserve, charge, ship))
    assert forward.to_compensate() == [charge, reserve]

    one_undone = forward.with_step(step("charge_payment", StepOutcome.COMPENSATED))
    assert one_undone.to_compensate() == [reserve]

    given_up = one_undone.with_step(step("reserve_stock", StepOutcome.COMPENSATION_FAILED))
    assert given_up.to_compensate() == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"amount": 12}, "str to str"),
        ({7: "x"}, "str to str"),
        ({"ok": None}, "str to str"),
        ({f"k{i}": "v" for i in range(33)}, "at most 32"),
        ({"receipt": "x" * 1025}, "longer than 1024"),
    ],
    ids=["int-value", "int-key", "none-value", "33-items", "1025-chars"],
)
def test_step_record_refuses_unsuitable_data(data: dict[Any, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        StepRecord(name="s", service="svc", outcome=StepOutcome.DONE, at=T0, data=data)


def test_step_record_accepts_data_at_the_limits() -> None:
    items = {f"k{i}": "v" for i in range(32)}
    assert (
        len(StepRecord(name="s", service="x", outcome=StepOutcome.DONE, at=T0, data=items).data)
        == 32
    )
    long = {"receipt": "x" * 1024}
    assert (
        StepRecord(name="s", service="x", outcome=StepOutcome.DONE, at=T0, data=long).data == long
    )


def test_naive_times_are_refused() -> None:
    naive = datetime(2024, 5, 17, 9, 30)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        StepRecord(name="s", service="x", outcome=StepOutcome.DONE, at=naive)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        stamp(started_at=naive)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        stamp(deadline=naive)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        envelope(time=naive)


def test_stamp_times_are_utc_truncated_to_milliseconds() -> None:
    local = datetime(2024, 5, 17, 11, 30, 15, 123999, tzinfo=timezone(timedelta(hours=2)))
    record = step("s", at=local)
    assert record.at == datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC)
    assert record.at.utcoffset() == timedelta(0)


def test_terminal_statuses_are_completed_compensated_and_failed() -> None:
    terminal = {status for status in SagaStatus if status.is_terminal}
    assert terminal == {SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED}


# --- trace context ---------------------------------------------------------------


def trace_id(traceparent: str) -> str:
    match = TRACEPARENT.fullmatch(traceparent)
    assert match, traceparent
    return match.group(1)


def test_without_a_current_trace_each_message_starts_a_new_one() -> None:
    first, first_state = current_trace_headers()
    second, _ = current_trace_headers()
    assert trace_id(first) != trace_id(second)
    assert first_state is None


def test_inside_an_incoming_trace_outgoing_messages_continue_it() -> None:
    with use_trace_headers(TP, None):
        traceparent, tracestate = current_trace_headers()
    assert trace_id(traceparent) == trace_id(TP)
    assert tracestate is None
    after, _ = current_trace_headers()
    assert trace_id(after) != trace_id(TP)  # the incoming context ends with the block


def test_incoming_tracestate_is_passed_on() -> None:
    with use_trace_headers(TP, "vendor=abc,other=1"):
        traceparent, tracestate = current_trace_headers()
    assert trace_id(traceparent) == trace_id(TP)
    assert tracestate == "vendor=abc,other=1"


@pytest.mark.parametrize("bad", ["garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", ""])
def test_an_invalid_incoming_traceparent_starts_a_new_trace(bad: str) -> None:
    with use_trace_headers(bad, "vendor=abc"):
        traceparent, tracestate = current_trace_headers()
    assert trace_id(traceparent) != trace_id(TP)
    assert tracestate is None


def test_a_stamp_breaking_an_invariant_is_refused_without_quoting_its_data(
    codec: EnvelopeCodec,
) -> None:
    key, value, headers = codec.encode(envelope())
    data = {"k": "v" * 2000}
    step_data = {"name": "s", "service": "x", "outcome": "DONE", "at": T0, "data": data}
    broken = with_stamp(headers, foreign_stamp(steps=[step_data]), "base64")
    with pytest.raises(DecodeError, match="invariant") as caught:
        codec.decode(key, value, broken)
    assert "vvvv" not in str(caught.value)


def test_a_stamp_written_with_the_first_stamp_schema_is_still_read() -> None:
    """Records already on a topic, stamped before the suspension and hop fields existed."""
    first = SchemaRegistry()
    first.register((ROOT / "schemas" / "choreosaga" / "saga" / "Stamp.avsc").read_text())
    old = Stamp(
        saga_name="place_order",
        saga_id="order-1",
        status=SagaStatus.COMPENSATING,
        correlation_id="c",
        started_at=datetime(2024, 5, 17, 9, 0, tzinfo=UTC),
        reason="card declined",
    )
    written = {k: v for k, v in old.to_avro().items() if k not in ("suspension", "hop")}
    raw = AvroCodec(first).encode(STAMP_SCHEMA, written)
    _, record = AvroCodec(SchemaRegistry.default()).decode(raw, expected=STAMP_SCHEMA)
    assert Stamp.from_avro(record) == old
