"""Avro codec for message values, in Avro single-object encoding.

A value is ``C3 01`` (the marker), the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema, then the Avro binary encoding of the record
(see the Avro specification, "Single object encoding"). Any Avro library can
read it given the schema. The framing lives in two private functions so that
another one (the Confluent wire format) can replace it later.

Decoding takes untrusted bytes: every way they can fail surfaces as one
:class:`~saga.errors.DecodeError` that keeps the bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from saga.errors import ConfigurationError, DecodeError, EncodeError, SchemaError
from saga.schemas import RegisteredSchema, SchemaRegistry

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "AvroCodec"]

DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest value :meth:`AvroCodec.decode` accepts by default (8 MiB)."""

_MARKER = b"\xc3\x01"
_HEADER_SIZE = len(_MARKER) + 8


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
        max_message_bytes: Larger values are refused by :meth:`decode` before
            any parsing.
    """

    def __init__(
        self,
        registry: SchemaRegistry,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if max_message_bytes < _HEADER_SIZE:
            raise ConfigurationError(
                f"max_message_bytes must be at least {_HEADER_SIZE}, got {max_message_bytes}"
            )
        self._registry = registry
        self._max_message_bytes = max_message_bytes

    @property
    def registry(self) -> SchemaRegistry:
        """The schemas this codec writes and reads with."""
        return self._registry

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
            validate(record, schema.parsed, raise_errors=True)
            schemaless_writer(buffer, schema.parsed, record)
        except ValidationError as exc:
            problems = "; ".join(str(error) for error in exc.errors)
            raise EncodeError(f"record does not fit {name}: {problems}") from exc
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
            raise EncodeError(f"record does not fit {name}: {exc}") from exc
        return _frame(schema.fingerprint, buffer.getvalue())

    def decode(self, data: bytes, *, expected: str | None = None) -> tuple[str, dict[str, Any]]:
        """Decode a value written in single-object encoding.

        Args:
            data: The bytes exactly as received; they are not trusted.
            expected: If given, the full schema name the value must have.

        Returns:
            The full name of the record's schema and the record, read with the
            latest registered version of that name.

        Raises:
            DecodeError: For every failure: too large or too short, wrong
                marker, unknown fingerprint, unexpected name, bytes that do
                not fit the writer schema (truncated, absurd lengths, invalid
                UTF-8...), a writer version the latest one cannot resolve, or
                trailing bytes. ``raw`` is ``data``.
        """
        if len(data) > self._max_message_bytes:
            raise DecodeError(
                f"message of {len(data)} bytes exceeds the {self._max_message_bytes}-byte limit",
                raw=data,
            )
        fingerprint, offset = _unframe(data)
        try:
            writer = self._registry.by_fingerprint(fingerprint)
        except SchemaError as exc:
            raise DecodeError(f"unknown writer schema: {exc}", raw=data) from exc
        if expected is not None and writer.name != expected:
            raise DecodeError(f"expected a {expected}, got a {writer.name}", raw=data)
        reader = self._registry.latest(writer.name)
        return writer.name, _read_body(data, offset, writer, reader)


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
        # IndexError, UnicodeDecodeError, ValueError, OverflowError, MemoryError,
        # struct.error, SchemaResolutionError...). Each means "cannot be read", and
        # a consumer must get one error class, never crash on a poison message.
        raise DecodeError(
            f"cannot read {writer.name} ({writer.fingerprint:#018x}): {exc!r}", raw=data
        ) from exc
    trailing = len(data) - buffer.tell()
    if trailing:
        raise DecodeError(f"{trailing} trailing bytes after the {writer.name} record", raw=data)
    if not isinstance(record, dict):
        raise DecodeError(f"{writer.name} did not decode to a record", raw=data)
    return record
