"""Avro codec for message values, in Avro single-object encoding.

A value is ``C3 01`` (the marker), the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema, then the Avro binary encoding of the record
(see the Avro specification, "Single object encoding"). Any Avro library can
read it given the schema. The framing lives in two private functions so that
another one (the Confluent wire format) can replace it later.

Decoding takes untrusted bytes: every way they can fail surfaces as one
:class:`~saga.errors.DecodeError` that keeps the bytes, with a short message
that never quotes them.

Before fastavro reads a record, the bytes are walked by :mod:`saga.prescan`,
which checks every length, count and index against the schema and the bytes
left and bounds the number of items; see there why. All bounds are in
:class:`DecodeLimits`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from saga.errors import ConfigurationError, DecodeError, EncodeError, SchemaError
from saga.prescan import Budget, Malformed, Scan, compile_scanner
from saga.schemas import RegisteredSchema, SchemaRegistry

__all__ = ["AvroCodec", "DecodeLimits"]

_MARKER = b"\xc3\x01"
_HEADER_SIZE = len(_MARKER) + 8


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Bounds on what decoding accepts from the wire; larger input is a DecodeError.

    Every bound is checked before the bytes it guards are parsed, so a hostile
    record costs little time and memory however large the sizes it claims.
    """

    max_value_bytes: int = 8 * 1024 * 1024
    """Largest record value, in bytes (8 MiB)."""

    max_items: int = 100_000
    """Most array items plus map entries in one value; each becomes a Python object."""

    max_header_bytes: int = 1024
    """Largest value of a text header (``ce_id``, ``ce_source``, ...), in bytes."""

    max_headers: int = 64
    """Most headers on one record, ours and others' together."""

    max_stamp_bytes: int = 64 * 1024
    """Largest state stamp, in bytes of its Avro single-object encoding (64 KiB)."""

    max_stamp_steps: int = 256
    """Most steps in one state stamp."""

    def __post_init__(self) -> None:
        for name in (
            "max_value_bytes",
            "max_items",
            "max_header_bytes",
            "max_headers",
            "max_stamp_bytes",
            "max_stamp_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_value_bytes", "max_stamp_bytes"):
            if getattr(self, name) < _HEADER_SIZE:
                raise ConfigurationError(
                    f"{name} must hold the {_HEADER_SIZE}-byte header, got {getattr(self, name)}"
                )


def _frame(fingerprint: int, body: bytes) -> bytes:
    """Prefix an Avro body with the single-object header."""
    return _MARKER + fingerprint.to_bytes(8, "little") + body


def _unframe(data: bytes) -> tuple[int, int]:
    """Return the writer fingerprint and the offset at which the body starts."""
    if len(data) < _HEADER_SIZE:
        raise DecodeError(
            f"message of {len(data)} bytes is shorter than the {_HEADER_SIZE}-byte header",
            raw=data,
        )
    if data[: len(_MARKER)] != _MARKER:
        raise DecodeError(
            f"not Avro single-object encoding: marker {data[:2].hex()} is not c301", raw=data
        )
    return int.from_bytes(data[len(_MARKER) : _HEADER_SIZE], "little"), _HEADER_SIZE


class AvroCodec:
    """Encode records to, and decode them from, Avro single-object encoding.

    Records are written with the latest version of their schema in the
    registry, and read with the writer's version (found by fingerprint)
    resolved to the latest version of the same name.

    Args:
        registry: The schemas to write and read with; schemas registered later
            are seen too.
        limits: Bounds on decoded input; the envelope codec built on this codec
            uses them too. Default: ``DecodeLimits()``.
    """

    def __init__(self, registry: SchemaRegistry, *, limits: DecodeLimits | None = None) -> None:
        if limits is not None and not isinstance(limits, DecodeLimits):
            raise ConfigurationError(f"limits must be DecodeLimits, not {type(limits).__name__}")
        self._registry = registry
        self._limits = limits or DecodeLimits()
        self._scanners: dict[int, Scan] = {}

    @property
    def registry(self) -> SchemaRegistry:
        """The schemas this codec writes and reads with."""
        return self._registry

    @property
    def limits(self) -> DecodeLimits:
        """The bounds on decoded input."""
        return self._limits

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Encode ``record`` with the latest version of the schema ``name``.

        The record is validated first: every field must have a value of its
        type (fields with a default may be left out) and keys that are not
        fields of the top-level record are refused, so that a misspelt
        optional field is not silently dropped.

        Raises:
            EncodeError: The record does not fit the schema, or no schema is
                registered under ``name`` (the :class:`SchemaError` is the
                cause); one error class for everything encode refuses.
        """
        try:
            schema = self._registry.latest(name)
        except SchemaError as exc:
            raise EncodeError(f"cannot encode {name}: {exc}") from exc
        if not isinstance(record, Mapping):
            raise EncodeError(f"a {name} record must be a mapping, not {type(record).__name__}")
        unknown = set(record) - {fld["name"] for fld in schema.parsed["fields"]}
        if unknown:
            raise EncodeError(f"{name} has no fields {sorted(map(str, unknown))}")
        buffer = io.BytesIO()
        try:
            # Asked to raise, fastavro builds an error (its schema dumped to JSON)
            # for every union branch a value does not take, even when a later
            # branch fits: ten times the cost of the check. Check quietly first;
            # only a record that does not fit is checked again for the details.
            if not validate(record, schema.parsed, raise_errors=False):
                validate(record, schema.parsed, raise_errors=True)
            schemaless_writer(buffer, schema.parsed, record)
        except ValidationError as exc:
            problems = "; ".join(str(error) for error in exc.errors)
            raise EncodeError(f"record does not fit {name}: {problems}") from exc
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
            raise EncodeError(f"record does not fit {name}: {exc}") from exc
        return _frame(schema.fingerprint, buffer.getvalue())

    def decode(
        self,
        data: bytes,
        *,
        expected: str | None = None,
        max_bytes: int | None = None,
        max_items: int | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Decode a value written in single-object encoding.

        Args:
            data: The bytes exactly as received; they are not trusted.
            expected: If given, the full schema name the value must have.
            max_bytes: Bound for this call instead of ``limits.max_value_bytes``
                (the envelope codec reads stamps with ``max_stamp_bytes``).
            max_items: Bound for this call instead of ``limits.max_items``.

        Returns:
            The full name of the record's schema and the record, read with the
            latest registered version of that name.

        Raises:
            DecodeError: For every failure: too large or too short, wrong
                marker, unknown fingerprint, unexpected name, bytes that do
                not fit the writer schema (truncated, lengths or counts larger
                than the bytes left, too many items, invalid UTF-8...), a
                writer version the latest one cannot resolve, or trailing
                bytes. ``raw`` is ``data``.
        """
        limit = self._limits.max_value_bytes if max_bytes is None else max_bytes
        if not isinstance(data, bytes):
            raise DecodeError(f"a value must be bytes, not {type(data).__name__}", raw=None)
        if len(data) > limit:
            raise DecodeError(
                f"message of {len(data)} bytes exceeds the {limit}-byte limit", raw=data
            )
        fingerprint, offset = _unframe(data)
        try:
            writer = self._registry.by_fingerprint(fingerprint)
        except SchemaError:
            raise DecodeError(f"unknown writer schema {fingerprint:#018x}", raw=data) from None
        if expected is not None and writer.name != expected:
            raise DecodeError(f"expected a {_excerpt(expected)}, got a {writer.name}", raw=data)
        budget = Budget(self._limits.max_items if max_items is None else max_items)
        try:
            end = self._scanner(writer)(data, offset, budget)
        except Malformed as exc:
            raise DecodeError(f"cannot read {writer.name}: {exc}", raw=data) from None
        except IndexError:
            raise DecodeError(f"cannot read {writer.name}: truncated", raw=data) from None
        if end != len(data):
            raise DecodeError(
                f"{len(data) - end} trailing bytes after the {writer.name} record", raw=data
            )
        reader = self._registry.latest(writer.name)
        return writer.name, _read_body(data, offset, writer, reader)

    def _scanner(self, writer: RegisteredSchema) -> Scan:
        try:
            return self._scanners[writer.fingerprint]
        except KeyError:
            scan = compile_scanner(writer.parsed)
            self._scanners[writer.fingerprint] = scan
            return scan


def _excerpt(text: str, size: int = 80) -> str:
    """``text`` cut to ``size`` characters, for error messages about untrusted input."""
    return text if len(text) <= size else text[: size - 3] + "..."


def _read_body(
    data: bytes, offset: int, writer: RegisteredSchema, reader: RegisteredSchema
) -> dict[str, Any]:
    buffer = io.BytesIO(data)
    buffer.seek(offset)
    # Same schema: skip resolution (fastavro would deep-compare the two dicts).
    reader_schema = None if reader.fingerprint == writer.fingerprint else reader.parsed
    try:
        record = schemaless_reader(buffer, writer.parsed, reader_schema)
    except Exception as exc:
        # Untrusted bytes can make the reader raise almost anything (EOFError,
        # IndexError, UnicodeDecodeError, ValueError, OverflowError,
        # struct.error, SchemaResolutionError...). Each means "cannot be read",
        # and a consumer must get one error class, never crash on a poison
        # message. The message names the kind only: fastavro's may quote bytes.
        raise DecodeError(
            f"cannot read {writer.name} ({writer.fingerprint:#018x}): {_problem(exc)}", raw=data
        ) from exc
    trailing = len(data) - buffer.tell()
    if trailing:
        raise DecodeError(f"{trailing} trailing bytes after the {writer.name} record", raw=data)
    if not isinstance(record, dict):
        raise DecodeError(f"{writer.name} did not decode to a record", raw=data)
    return record


def _problem(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    if isinstance(exc, EOFError):
        return "truncated"
    if isinstance(exc, IndexError):
        return "an enum or union index is out of range"
    if isinstance(exc, (OverflowError, ValueError)):
        return f"a value is out of range ({type(exc).__name__})"
    return type(exc).__name__
