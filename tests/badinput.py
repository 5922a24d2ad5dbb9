"""The bad-input catalogue: records that decoding must refuse, and some it must tolerate.

:func:`bad_records` starts from one valid, stamped envelope and returns every
kind of bad record we know of, each named: random and truncated values,
unknown schemas, Avro lengths and block counts far beyond the bytes sent,
headers missing, not UTF-8 or oversized, a ``ce_type`` that lies, stamps over
their bounds. :meth:`EnvelopeCodec.decode` must raise ``DecodeError`` for each
one, fast and without allocating much; a consumer must dead-letter each one
and move on. :func:`tolerated_records` returns records whose only fault is a
malformed trace header: they decode, without trace context.

The unit tests (``tests/test_bad_input.py``) run the catalogue against the
codec; the same lists can be sent to a real broker, with the headers as
given, to check that a service dead-letters every bad record and processes
every tolerated one. The largest records (a value over the default 8 MiB
limit, a stamp of 200,000 steps) need a producer ``max_request_size`` of
:data:`LARGEST_RECORD_BYTES` and a broker that takes records that large.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

from saga.codec import AvroCodec
from saga.envelope import Envelope, EnvelopeCodec
from saga.schemas import RegisteredSchema
from saga.stamp import STAMP_SCHEMA

__all__ = ["LARGEST_RECORD_BYTES", "BadRecord", "bad_records", "tolerated_records", "zigzag"]

LARGEST_RECORD_BYTES = 10 * 1024 * 1024
"""A producer ``max_request_size`` that fits every record of the catalogue."""

Headers = list[tuple[str, bytes | None]]

_MARKER = b"\xc3\x01"
_STAMP_HEADER = "ce_sagastamp"
_LEGACY_STAMP_HEADER = "saga_stamp"


class BadRecord(NamedTuple):
    """One Kafka record of the catalogue."""

    name: str
    key: bytes | None
    value: bytes | None
    headers: Headers


def zigzag(n: int) -> bytes:
    """Avro's zig-zag varint of any integer (beyond 64 bits too, to craft attacks)."""
    n = (n << 1) ^ (n >> 127) if n >= 0 else ((-n) << 1) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def bad_records(codec: EnvelopeCodec, valid: Envelope) -> list[BadRecord]:
    """Every bad record of the catalogue, built around ``valid``.

    Args:
        codec: The codec the consumer uses; its registry and limits shape the
            attacks (a schema with an array, a map, bytes or a string is found
            among the registered ones when the event's own has none).
        valid: A stamped envelope that ``codec`` encodes and decodes.

    Returns:
        Named records, each of which ``codec.decode`` must refuse.
    """
    if valid.stamp is None:
        raise ValueError("the catalogue needs a stamped envelope")
    key, value, headers = codec.encode(valid)
    records = [
        *_values(codec.codec, key, value, headers),
        *_lengths(codec.codec, key, headers),
        *_headers(codec, key, value, headers),
        *_stamps(codec, key, value, headers),
    ]
    names = [r.name for r in records]
    assert len(set(names)) == len(names), "catalogue names must be unique"
    return records


def tolerated_records(codec: EnvelopeCodec, valid: Envelope) -> list[BadRecord]:
    """Records with malformed trace headers: each decodes, without that trace context."""
    key, value, headers = codec.encode(valid)
    good_parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    parents = {
        "garbage": b"garbage",
        "not-utf8": b"\xff\xfe00-4bf92f",
        "zero-trace-id": b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
        "uppercase-hex": good_parent.upper(),
        "version-ff": b"ff" + good_parent[2:],
        "10000-chars": b"00-" + b"a" * 9997,
        "empty": b"",
    }
    records = [
        BadRecord(f"traceparent-{name}", key, value, _set(headers, "traceparent", text))
        for name, text in parents.items()
    ]
    states = {
        "garbage": b"not a tracestate",
        "not-utf8": b"vendor=\xff",
        "10000-chars": b"vendor=" + b"x" * 9993,
        "33-members": ",".join(f"k{i}=v" for i in range(33)).encode(),
    }
    with_parent = _set(headers, "traceparent", good_parent)
    records.extend(
        BadRecord(f"tracestate-{name}", key, value, _set(with_parent, "tracestate", text))
        for name, text in states.items()
    )
    return records


# --- values ------------------------------------------------------------------------


def _values(codec: AvroCodec, key: bytes | None, value: bytes, headers: Headers) -> list[BadRecord]:
    unknown = 0x5A6A_6E6F_776E_2121
    while True:
        try:
            codec.registry.by_fingerprint(unknown)
        except Exception:
            break
        unknown += 1
    noise = random.Random(6).randbytes(64)
    cases = {
        "value-random-bytes": noise,
        "value-random-bytes-after-the-header": value[:10] + noise,
        "value-empty": b"",
        "value-null": None,
        "value-wrong-marker": b"\xc3\x02" + value[2:],
        "value-confluent-framing": b"\x00\x00\x00\x00\x01" + value[10:],
        "value-short-header": value[:5],
        "value-header-only": value[:10],
        "value-truncated": value[:-1],
        "value-trailing-bytes": value + b"\x00",
        "value-unknown-fingerprint": _MARKER + unknown.to_bytes(8, "little") + value[10:],
        "value-over-the-size-limit": value + b"\x00" * codec.limits.max_value_bytes,
    }
    return [BadRecord(name, key, data, list(headers)) for name, data in cases.items()]


def _lengths(codec: AvroCodec, key: bytes | None, headers: Headers) -> list[BadRecord]:
    """Avro lengths and block counts far beyond the bytes sent, in values."""
    records = []
    event_type = dict(headers)["ce_type"]
    assert event_type is not None
    event_schema = codec.registry.latest(event_type.decode())
    for kind in ("string", "bytes", "array", "map"):
        schema = _carrier(codec, event_schema, kind)
        if schema is None:
            continue
        typed = _set(headers, "ce_type", schema.name.encode())
        for attack, body in _attacks(codec, schema, kind):
            records.append(BadRecord(f"value-{kind}-{attack}", key, body, typed))
    return records


def _carrier(codec: AvroCodec, preferred: RegisteredSchema, kind: str) -> RegisteredSchema | None:
    """The event's schema if a value of ``kind`` is in it, else another registered one."""
    candidates = [preferred] + [codec.registry.latest(n) for n in codec.registry.names()]
    for schema in candidates:
        if _lead_to(schema.parsed, kind, _named(schema.parsed)) is not None:
            return schema
    return None


def _attacks(codec: AvroCodec, schema: RegisteredSchema, kind: str) -> Iterator[tuple[str, bytes]]:
    head = _MARKER + schema.fingerprint.to_bytes(8, "little")
    lead = _lead_to(schema.parsed, kind, _named(schema.parsed))
    assert lead is not None
    start = head + lead
    fill = b"\x00" * 64
    if kind in ("string", "bytes"):
        yield "length-2**31", start + zigzag(2**31) + fill
        yield "length-2**62", start + zigzag(2**62) + fill
        yield "length-negative", start + zigzag(-5) + fill
        return
    yield "count-2**31", start + zigzag(2**31) + fill
    yield "count-2**62", start + zigzag(2**62) + fill
    # The count fastavro would believe longest: 1 MiB of items of one zero byte each.
    yield "count-2**62-then-1MiB", start + zigzag(2**62) + b"\x00" * (1 << 20)
    yield "negative-count-2**62", start + zigzag(-(2**62)) + zigzag(len(fill)) + fill
    yield "negative-count-2**63", start + zigzag(-(2**63)) + zigzag(len(fill)) + fill
    yield "negative-count-wrong-size", start + zigzag(-1) + zigzag(2**62) + fill
    yield "negative-count-negative-size", start + zigzag(-1) + zigzag(-8) + fill
    over = codec.limits.max_items + 1
    yield "count-over-the-item-limit", start + zigzag(over) + b"\x00" * (2 * over)


def _named(schema: Any, found: dict[str, Any] | None = None) -> dict[str, Any]:
    """Named types defined in a parsed schema, by full name."""
    found = {} if found is None else found
    if isinstance(schema, list):
        for branch in schema:
            _named(branch, found)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            found[schema["name"]] = schema
        if kind in ("record", "error"):
            for fld in schema["fields"]:
                _named(fld["type"], found)
        elif kind == "array":
            _named(schema["items"], found)
        elif kind == "map":
            _named(schema["values"], found)
        elif isinstance(kind, (dict, list)):
            _named(kind, found)
    return found


def _kind(schema: Any, named: dict[str, Any]) -> tuple[str, Any]:
    if isinstance(schema, str):
        if schema in named:
            return _kind(named[schema], named)
        return schema, schema
    if isinstance(schema, list):
        return "union", schema
    kind = schema["type"]
    if isinstance(kind, (dict, list)):
        return _kind(kind, named)
    return kind, schema


def _lead_to(schema: Any, kind: str, named: dict[str, Any]) -> bytes | None:
    """Bytes of the smallest valid encoding up to the first value of ``kind``, or None."""
    found, node = _kind(schema, named)
    if found == kind:
        return b""
    if found in ("record", "error"):
        prefix = b""
        for fld in node["fields"]:
            rest = _lead_to(fld["type"], kind, named)
            if rest is not None:
                return prefix + rest
            prefix += _least(fld["type"], named)
        return None
    if found == "union":
        for index, branch in enumerate(node):
            rest = _lead_to(branch, kind, named)
            if rest is not None:
                return zigzag(index) + rest
        return None
    if found == "array":
        rest = _lead_to(node["items"], kind, named)
        return None if rest is None else zigzag(1) + rest
    if found == "map":
        rest = _lead_to(node["values"], kind, named)
        return None if rest is None else zigzag(1) + zigzag(0) + rest
    return None


def _least(schema: Any, named: dict[str, Any]) -> bytes:
    """The smallest valid encoding of a value of ``schema``."""
    found, node = _kind(schema, named)
    if found == "null":
        return b""
    if found in ("boolean", "int", "long", "bytes", "string", "enum", "array", "map"):
        return b"\x00"
    if found == "float":
        return b"\x00" * 4
    if found == "double":
        return b"\x00" * 8
    if found == "fixed":
        return b"\x00" * int(node["size"])
    if found == "union":
        return b"\x00" + _least(node[0], named)
    if found in ("record", "error"):
        return b"".join(_least(fld["type"], named) for fld in node["fields"])
    raise AssertionError(f"unexpected Avro type {found}")


# --- headers -------------------------------------------------------------------------


def _headers(
    codec: EnvelopeCodec, key: bytes | None, value: bytes, headers: Headers
) -> list[BadRecord]:
    limits = codec.limits
    records = []
    for name in ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time"):
        records.append(BadRecord(f"header-{name}-missing", key, value, _set(headers, name, None)))
        records.append(BadRecord(f"header-{name}-empty", key, value, _set(headers, name, b"")))
        records.append(
            BadRecord(f"header-{name}-null", key, value, [*_set(headers, name, None), (name, None)])
        )
        records.append(
            BadRecord(f"header-{name}-not-utf8", key, value, _set(headers, name, b"\xff\xfe\x80"))
        )
    oversized = {
        "ce_id-10000-chars": ("ce_id", b"x" * 10_000),
        "ce_id-over-the-limit": ("ce_id", b"x" * (limits.max_header_bytes + 1)),
        "ce_source-over-the-limit": ("ce_source", b"urn:" + b"s" * limits.max_header_bytes),
        "ce_correlationid-over-the-limit": (
            "ce_correlationid",
            b"c" * (limits.max_header_bytes + 1),
        ),
        "ce_causationid-over-the-limit": ("ce_causationid", b"c" * (limits.max_header_bytes + 1)),
    }
    for case, (name, text) in oversized.items():
        records.append(BadRecord(f"header-{case}", key, value, _set(headers, name, text)))
    others = registered_other_than(codec.codec, dict(headers)["ce_type"])
    wrong = {
        "ce_specversion-0.3": ("ce_specversion", b"0.3"),
        "ce_type-another-registered-type": ("ce_type", others.encode()),
        "ce_type-an-unknown-type": ("ce_type", b"choreosaga.unknown.Nothing"),
        "ce_time-not-a-time": ("ce_time", b"yesterday"),
        "ce_time-without-zone": ("ce_time", b"2024-05-17T09:30:15"),
        "ce_correlationid-not-utf8": ("ce_correlationid", b"\xff"),
        "ce_causationid-not-utf8": ("ce_causationid", b"\xc3"),
    }
    for case, (name, text) in wrong.items():
        records.append(BadRecord(f"header-{case}", key, value, _set(headers, name, text)))
    junk = [(f"x-junk-{i}", b"1") for i in range(limits.max_headers)]
    records.append(BadRecord("headers-too-many", key, value, [*headers, *junk]))
    return records


def registered_other_than(codec: AvroCodec, name: bytes | None) -> str:
    """A registered schema name other than ``name``."""
    return next(n for n in codec.registry.names() if name is None or n != name.decode())


# --- stamps --------------------------------------------------------------------------


def _stamps(
    codec: EnvelopeCodec, key: bytes | None, value: bytes, headers: Headers
) -> list[BadRecord]:
    limits = codec.limits
    good = base64.b64decode(dict(headers)[_STAMP_HEADER] or b"", validate=True)
    schema = codec.codec.registry.latest(STAMP_SCHEMA)

    def stamp_of(steps: int, reason: bytes = b"") -> bytes:
        # version 1, saga "s" id "i", RUNNING, `steps` steps of ("n", "v", DONE,
        # epoch, no data), correlation "c", started at epoch, no deadline, reason,
        # no suspension, hop 0.
        step = zigzag(1) + b"n" + zigzag(1) + b"v" + b"\x00" + b"\x00" + b"\x00"
        body = zigzag(1) + zigzag(1) + b"s" + zigzag(1) + b"i" + b"\x00"
        body += (zigzag(steps) + step * steps if steps else b"") + b"\x00"
        body += zigzag(1) + b"c" + b"\x00" + b"\x00"
        body += zigzag(1) + zigzag(len(reason)) + reason if reason else b"\x00"
        body += b"\x00"  # no suspension
        body += b"\x00"  # hop 0
        return _MARKER + schema.fingerprint.to_bytes(8, "little") + body

    assert codec.codec.decode(stamp_of(2), expected=STAMP_SCHEMA)  # the crafting is right
    steps = limits.max_stamp_steps + 1
    cases: dict[str, tuple[str, bytes]] = {
        "200000-steps": (_STAMP_HEADER, base64.b64encode(stamp_of(200_000))),
        f"{steps}-steps": (_STAMP_HEADER, base64.b64encode(stamp_of(steps))),
        "over-the-byte-limit": (
            _STAMP_HEADER,
            base64.b64encode(stamp_of(1, b"r" * limits.max_stamp_bytes)),
        ),
        "not-base64": (_STAMP_HEADER, b"not base64!"),
        "base64-of-garbage": (_STAMP_HEADER, base64.b64encode(b"garbage garbage")),
        "truncated": (_STAMP_HEADER, base64.b64encode(good[:-2])),
        "trailing-bytes": (_STAMP_HEADER, base64.b64encode(good + b"\x00")),
        "the-event-not-a-stamp": (_STAMP_HEADER, base64.b64encode(value)),
        "legacy-binary-garbage": (_LEGACY_STAMP_HEADER, b"\xc3\x01garbage"),
        "legacy-binary-200000-steps": (_LEGACY_STAMP_HEADER, stamp_of(200_000)),
    }
    records = []
    for case, (name, text) in cases.items():
        base = _set(headers, _STAMP_HEADER, None) if name == _LEGACY_STAMP_HEADER else headers
        records.append(BadRecord(f"stamp-{case}", key, value, _set(base, name, text)))
    for kind in ("string", "array", "map"):
        for attack, stamp in _attacks(codec.codec, schema, kind):
            records.append(
                BadRecord(
                    f"stamp-{kind}-{attack}",
                    key,
                    value,
                    _set(headers, _STAMP_HEADER, base64.b64encode(stamp)),
                )
            )
    return records


def _set(headers: Headers, name: str, value: bytes | None) -> Headers:
    """``headers`` with ``name`` set to ``value``, or removed when ``value`` is None."""
    kept = [(n, v) for n, v in headers if n != name]
    return kept if value is None else [*kept, (name, value)]
