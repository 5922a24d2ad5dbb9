"""Tests for the Avro single-object codec."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader
from hypothesis import given, settings
from hypothesis import strategies as st

from saga.codec import AvroCodec, DecodeLimits
from saga.errors import ConfigurationError, DecodeError, EncodeError, SchemaError
from saga.schemas import RegisteredSchema, SchemaRegistry

EVOLUTION = Path(__file__).parent / "schemas" / "evolution" / "choreosaga" / "test"
GREETING = "choreosaga.test.Greeting"
FAREWELL = "choreosaga.test.Farewell"


def registry_of(*files: str) -> SchemaRegistry:
    registry = SchemaRegistry()
    for file in files:
        registry.register((EVOLUTION / file).read_text())
    return registry


@pytest.fixture
def codec() -> AvroCodec:
    return AvroCodec(registry_of("Greeting.avsc", "Greeting.v2.avsc", "Farewell.avsc"))


def zigzag(n: int) -> bytes:
    """Avro's variable-length zig-zag encoding of a long (any size, for crafting attacks)."""
    n = (n << 1) ^ (n >> 127)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def header(schema: RegisteredSchema) -> bytes:
    return b"\xc3\x01" + schema.fingerprint.to_bytes(8, "little")


HELLO = {"text": "hello", "count": 3, "sender": "ana", "language": "pt"}


# --- round trips and the wire format -----------------------------------------


def test_round_trip(codec: AvroCodec) -> None:
    assert codec.decode(codec.encode(GREETING, HELLO)) == (GREETING, HELLO)


def test_value_is_single_object_encoding_readable_by_plain_fastavro(codec: AvroCodec) -> None:
    data = codec.encode(GREETING, HELLO)
    latest = codec.registry.latest(GREETING)
    assert data[:10] == header(latest)
    assert schemaless_reader(io.BytesIO(data[10:]), latest.parsed) == HELLO


def test_header_matches_the_published_fingerprint_of_a_record() -> None:
    # Apache Avro schema-tests.txt: this canonical form has fingerprint 7843277075252814651.
    registry = SchemaRegistry()
    registry.register(
        {"type": "record", "name": "foo", "fields": [{"name": "f1", "type": "boolean"}]}
    )
    data = AvroCodec(registry).encode("foo", {"f1": True})
    assert data == b"\xc3\x01" + (7843277075252814651).to_bytes(8, "little") + b"\x01"


def test_fields_with_defaults_may_be_left_out(codec: AvroCodec) -> None:
    _, record = codec.decode(codec.encode(GREETING, {"text": "hi", "count": 1}))
    assert record == {"text": "hi", "count": 1, "sender": None, "language": "en"}


def test_record_written_with_v1_is_read_as_v2_with_the_default() -> None:
    old_producer = AvroCodec(registry_of("Greeting.avsc"))
    new_consumer = AvroCodec(registry_of("Greeting.avsc", "Greeting.v2.avsc"))
    data = old_producer.encode(GREETING, {"text": "hi", "count": 7, "sender": None})
    assert new_consumer.decode(data, expected=GREETING) == (
        GREETING,
        {"text": "hi", "count": 7, "sender": None, "language": "en"},
    )


def test_unknown_enum_symbol_is_read_as_the_reader_default() -> None:
    def mood(symbols: list[str]) -> dict[str, Any]:
        enum = {"type": "enum", "name": "Mood", "symbols": symbols, "default": "OK"}
        return {"type": "record", "name": "x.M", "fields": [{"name": "m", "type": enum}]}

    writer = SchemaRegistry()
    writer.register(mood(["OK", "ANGRY"]))
    reader = SchemaRegistry()
    reader.register(mood(["OK", "ANGRY"]))
    reader.register(mood(["OK"]))
    data = AvroCodec(writer).encode("x.M", {"m": "ANGRY"})
    assert AvroCodec(reader).decode(data) == ("x.M", {"m": "OK"})


def test_decode_refuses_an_unexpected_name(codec: AvroCodec) -> None:
    data = codec.encode(GREETING, HELLO)
    with pytest.raises(DecodeError, match=r"expected a choreosaga\.test\.Farewell") as info:
        codec.decode(data, expected=FAREWELL)
    assert info.value.raw == data


# --- encode failures ----------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        {"count": 1},
        {"text": "x", "count": "1"},
        {"text": "x", "count": 1.5},
        {"text": "x", "count": 2**40},
        {"text": 1, "count": 1},
        {"text": "x", "count": 1, "sender": 5},
        {"text": "x", "count": 1, "langauge": "fr"},
        ["text", "count"],
    ],
    ids=["missing", "str-for-long", "float", "too-big", "int-for-str", "union", "typo", "list"],
)
def test_encode_refuses_records_that_do_not_fit(record: Any) -> None:
    codec = AvroCodec(registry_of("Greeting.avsc"))  # count is an int in v1
    with pytest.raises(EncodeError):
        codec.encode(GREETING, record)


def test_a_value_in_a_later_union_branch_encodes_and_a_wrong_one_names_its_field() -> None:
    # The quiet check comes first (see AvroCodec.encode); the error's details come
    # from the second, raising check, and must still name what does not fit.
    codec = AvroCodec(registry_of("Greeting.avsc"))
    raw = codec.encode(GREETING, {"text": "x", "count": 1, "sender": "ana"})
    assert codec.decode(raw) == (GREETING, {"text": "x", "count": 1, "sender": "ana"})
    with pytest.raises(EncodeError, match=r"does not fit choreosaga\.test\.Greeting: .*sender"):
        codec.encode(GREETING, {"text": "x", "count": 1, "sender": 5})


def test_encode_of_an_unknown_name_is_an_encode_error_caused_by_a_schema_error(
    codec: AvroCodec,
) -> None:
    with pytest.raises(EncodeError) as info:
        codec.encode("choreosaga.test.Missing", {})
    assert isinstance(info.value.__cause__, SchemaError)


@pytest.mark.parametrize(
    "bounds",
    [
        {"max_value_bytes": 9},
        {"max_stamp_bytes": 9},
        {"max_items": 0},
        {"max_header_bytes": -1},
        {"max_headers": 0},
        {"max_stamp_steps": 0},
        {"max_items": 1.5},
        {"max_stamp_steps": True},
    ],
    ids=str,
)
def test_decode_limits_refuse_bounds_that_make_no_sense(bounds: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        DecodeLimits(**bounds)


def test_decode_limits_are_frozen_keyword_only_with_documented_defaults() -> None:
    limits = DecodeLimits()
    assert (limits.max_stamp_steps, limits.max_stamp_bytes) == (256, 64 * 1024)
    with pytest.raises(TypeError):
        DecodeLimits(1024)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        limits.max_items = 1  # type: ignore[misc]


# --- decode failures: every one is a DecodeError keeping the raw bytes ---------


def bad_inputs() -> list[tuple[str, bytes]]:
    registry = registry_of("Greeting.avsc", "Greeting.v2.avsc", "Farewell.avsc")
    v2 = header(registry.latest(GREETING))
    farewell = header(registry.latest(FAREWELL))
    valid = AvroCodec(registry).encode(GREETING, HELLO)
    return [
        ("empty", b""),
        ("garbage", b"not avro at all, really"),
        ("short-header", valid[:7]),
        ("wrong-marker", b"\xc3\x02" + valid[2:]),
        ("confluent-magic", b"\x00\x00\x00\x00\x01" + valid[10:]),
        ("unknown-fingerprint", b"\xc3\x01" + b"\x00" * 8 + valid[10:]),
        ("header-only", v2),
        ("truncated", valid[:-1]),
        ("trailing-byte", valid + b"\x00"),
        ("huge-string", v2 + zigzag(2**60) + b"x"),
        ("negative-length", v2 + zigzag(-5) + b"x"),
        ("overlong-varint", v2 + b"\xff" * 64 + b"\x01"),
        ("invalid-utf8", v2 + zigzag(2) + b"\xff\xfe" + zigzag(1) + b"\x00" + zigzag(0)),
        ("bad-union-index", v2 + zigzag(0) + zigzag(1) + zigzag(9)),
        ("huge-array", farewell + zigzag(0) + zigzag(0) + zigzag(2**60) + b"\x00"),
        ("bad-enum-index", farewell + zigzag(0) + zigzag(7)),
    ]


BAD_INPUTS = bad_inputs()


@pytest.mark.parametrize("data", [data for _, data in BAD_INPUTS], ids=[n for n, _ in BAD_INPUTS])
def test_decode_failures_are_decode_errors_keeping_the_raw_bytes(
    codec: AvroCodec, data: bytes
) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert info.value.raw is data


def test_a_tiny_message_claiming_an_enormous_string_fails_fast(codec: AvroCodec) -> None:
    data = header(codec.registry.latest(GREETING)) + zigzag(2**60) + b"abc"
    # CPU time of this thread, here and below: a loaded machine that pauses the
    # test between two instructions adds nothing to it, slow decoding does.
    started = time.thread_time()
    with pytest.raises(DecodeError, match="more than the 3 bytes left") as info:
        codec.decode(data)
    assert time.thread_time() - started < 1.0
    assert info.value.raw is data


def test_decode_refuses_messages_over_the_size_limit_before_reading_them() -> None:
    registry = registry_of("Greeting.avsc")
    small = AvroCodec(registry, limits=DecodeLimits(max_value_bytes=16))
    data = AvroCodec(registry).encode(GREETING, {"text": "x" * 10, "count": 1})
    with pytest.raises(DecodeError, match="limit") as info:
        small.decode(data)
    assert info.value.raw is data


# --- properties ---------------------------------------------------------------

_CODEC = AvroCodec(registry_of("Greeting.avsc", "Greeting.v2.avsc", "Farewell.avsc"))
_HEADERS = [
    header(registry_of("Greeting.avsc").latest(GREETING)),
    header(_CODEC.registry.latest(GREETING)),
    header(_CODEC.registry.latest(FAREWELL)),
]


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=64), st.tuples(st.sampled_from(_HEADERS), st.binary())))
def test_decode_of_any_bytes_returns_or_raises_decode_error(
    value: bytes | tuple[bytes, bytes],
) -> None:
    data = value if isinstance(value, bytes) else value[0] + value[1]
    outcome: tuple[str, dict[str, Any]] | DecodeError
    try:
        outcome = _CODEC.decode(data)
    except DecodeError as exc:
        outcome = exc
    if isinstance(outcome, DecodeError):
        assert outcome.raw is data
    else:
        assert outcome[0] in (GREETING, FAREWELL)
        assert isinstance(outcome[1], dict)


_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_GREETINGS = st.fixed_dictionaries(
    {"text": st.text(), "count": _INT64, "sender": st.none() | st.text(), "language": st.text()}
)
_FAREWELLS = st.fixed_dictionaries(
    {
        "text": st.text(),
        "mood": st.sampled_from(["HAPPY", "SAD"]),
        "tags": st.lists(st.text(max_size=8), max_size=5),
        "scores": st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False), max_size=5),
        "digest": st.none() | st.binary(min_size=4, max_size=4),
        "payload": st.binary(),
    }
)


@given(_GREETINGS)
def test_greetings_round_trip(record: dict[str, Any]) -> None:
    assert _CODEC.decode(_CODEC.encode(GREETING, record), expected=GREETING) == (GREETING, record)


@given(_FAREWELLS)
def test_farewells_round_trip(record: dict[str, Any]) -> None:
    assert _CODEC.decode(_CODEC.encode(FAREWELL, record)) == (FAREWELL, record)


# --- bounds checked before reading: lengths, block counts, items -------------------


def farewell_body(tags: bytes, scores: bytes = b"\x00") -> bytes:
    """A Farewell ("hi", SAD, tags, scores, no digest, empty payload) around raw blocks."""
    return zigzag(2) + b"hi" + zigzag(1) + tags + scores + zigzag(0) + zigzag(0)


def test_blocks_with_a_negative_count_and_the_right_byte_size_are_read(codec: AvroCodec) -> None:
    # Writers may emit a block as -count then its size in bytes (Avro spec), so
    # that readers can skip it; the pre-scan must accept the well-formed ones.
    items = zigzag(1) + b"a" + zigzag(2) + b"bc"
    tags = zigzag(-2) + zigzag(len(items)) + items + zigzag(1) + zigzag(1) + b"d" + zigzag(0)
    entry = zigzag(1) + b"k" + struct.pack("<d", 1.0)
    scores = zigzag(-1) + zigzag(len(entry)) + entry + zigzag(0)
    data = header(codec.registry.latest(FAREWELL)) + farewell_body(tags, scores)
    assert codec.decode(data) == (
        FAREWELL,
        {
            "text": "hi",
            "mood": "SAD",
            "tags": ["a", "bc", "d"],
            "scores": {"k": 1.0},
            "digest": None,
            "payload": b"",
        },
    )


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        (zigzag(-1) + zigzag(5) + zigzag(1) + b"a" + zigzag(0), "declared byte size"),
        (zigzag(-1) + zigzag(-2) + zigzag(1) + b"a" + zigzag(0), "block size of -2"),
        (zigzag(-(2**63)) + zigzag(2) + zigzag(1) + b"a" + zigzag(0), "cannot fit"),
        (zigzag(2**31) + zigzag(1) + b"a" + zigzag(0), "cannot fit"),
        (zigzag(1) + zigzag(2**62) + b"a" + zigzag(0), "length of 4611686018427387904"),
        (zigzag(1) + zigzag(-3) + b"a" + zigzag(0), "negative length"),
        (b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\xff" * 9 + b"\x7f", "64-bit range"),
    ],
    ids=[
        "size-mismatch",
        "negative-size",
        "count-minus-2**63",
        "count-2**31",
        "string-2**62",
        "string-negative",
        "11-byte-varint",
        "70-bit-varint",
    ],
)
def test_block_counts_and_lengths_that_cannot_fit_are_refused_before_reading(
    codec: AvroCodec, tags: bytes, problem: str
) -> None:
    data = header(codec.registry.latest(FAREWELL)) + farewell_body(tags)
    with pytest.raises(DecodeError, match=problem) as info:
        codec.decode(data)
    assert info.value.raw is data


def test_a_huge_count_over_a_mebibyte_of_items_fails_without_building_them(
    codec: AvroCodec,
) -> None:
    # fastavro alone builds a million empty strings here before it runs out.
    data = header(codec.registry.latest(FAREWELL)) + farewell_body(zigzag(2**62) + bytes(2**20))
    tracemalloc.start()
    started = time.thread_time()
    try:
        with pytest.raises(DecodeError, match="cannot fit"):
            codec.decode(data)
        elapsed = time.thread_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.1
    assert peak < 256 * 1024


def test_items_are_bounded_by_the_limits_and_values_within_them_decode() -> None:
    registry = registry_of("Greeting.avsc", "Greeting.v2.avsc", "Farewell.avsc")
    record = {
        "text": "x",
        "mood": "HAPPY",
        "tags": [""] * 900,
        "scores": {str(i): 0.5 for i in range(100)},
        "digest": None,
        "payload": b"",
    }
    data = AvroCodec(registry).encode(FAREWELL, record)
    assert AvroCodec(registry, limits=DecodeLimits(max_items=1000)).decode(data)[1] == record
    with pytest.raises(DecodeError, match="too many array items and map entries"):
        AvroCodec(registry, limits=DecodeLimits(max_items=999)).decode(data)


def test_a_value_of_many_items_within_the_default_bound_decodes_in_reasonable_time(
    codec: AvroCodec,
) -> None:
    record = {
        "text": "x",
        "mood": "HAPPY",
        "tags": ["tag"] * 50_000,
        "scores": {},
        "digest": None,
        "payload": b"",
    }
    data = codec.encode(FAREWELL, record)
    started = time.thread_time()
    assert codec.decode(data) == (FAREWELL, record)
    assert time.thread_time() - started < 2.0


def test_decode_error_messages_do_not_quote_the_bytes(codec: AvroCodec) -> None:
    secret = "card-4111111111111111"
    valid = codec.encode(FAREWELL, {"text": secret, "mood": "SAD", "payload": b""})
    broken = valid.replace(secret.encode(), b"\xff" + secret.encode()[1:])
    with pytest.raises(DecodeError) as info:
        codec.decode(broken)
    assert "UTF-8" in str(info.value)
    assert "4111" not in str(info.value)


def string_blocks(items: list[str], splits: list[int], sized: bool) -> bytes:
    """``items`` as an Avro array of strings written in blocks, with byte sizes if ``sized``."""
    out = b""
    start = 0
    for stop in [*sorted({min(s, len(items)) for s in splits}), len(items)]:
        block = items[start:stop]
        if block:
            data = b"".join(zigzag(len(t.encode())) + t.encode() for t in block)
            if sized:
                out += zigzag(-len(block)) + zigzag(len(data)) + data
            else:
                out += zigzag(len(block)) + data
        start = stop
    return out + zigzag(0)


@given(
    tags=st.lists(st.text(max_size=5), max_size=12),
    splits=st.lists(st.integers(min_value=0, max_value=12), max_size=4),
    sized=st.booleans(),
)
def test_arrays_written_in_any_blocks_are_read(
    tags: list[str], splits: list[int], sized: bool
) -> None:
    data = header(_CODEC.registry.latest(FAREWELL)) + farewell_body(
        string_blocks(tags, splits, sized)
    )
    _, record = _CODEC.decode(data)
    assert record["tags"] == tags


@pytest.mark.parametrize("index", [-1, -2, 2], ids=["minus-1", "minus-2", "past-the-end"])
def test_a_union_or_enum_index_out_of_range_is_refused_not_read_from_the_end(
    codec: AvroCodec, index: int
) -> None:
    # fastavro alone indexes the Python list: -1 silently reads the last branch.
    v2 = header(codec.registry.latest(GREETING))
    sender = v2 + zigzag(2) + b"hi" + zigzag(1) + zigzag(index) + zigzag(1) + b"x" + zigzag(0)
    with pytest.raises(DecodeError, match=f"union index {index} is out of range"):
        codec.decode(sender)
    mood = header(codec.registry.latest(FAREWELL)) + zigzag(0) + zigzag(index) + bytes(4)
    with pytest.raises(DecodeError, match=f"enum index {index} is out of range"):
        codec.decode(mood)
