"""Avro schema resolution rules, checked: can a reader schema read a writer's data.

:func:`check_compatibility` walks a reader and a writer schema together and
reports every place where the reader, following the schema resolution rules of
the Avro specification, could not read a datum written with the writer.
:class:`saga.schemas.SchemaRegistry` uses it to keep each new version of a
schema able to read data written with every earlier one.

``parse`` and ``label`` are shared with :mod:`saga.schemas`, which parses and
names schemas the same way; they are not part of the public API.
"""

from __future__ import annotations

import json
from typing import Any

from fastavro import parse_schema
from fastavro.schema import SchemaParseException

from saga.errors import SchemaError

__all__ = ["check_compatibility"]

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_PROMOTIONS = {
    "int": ("long", "float", "double"),
    "long": ("float", "double"),
    "float": ("double",),
    "string": ("bytes",),
    "bytes": ("string",),
}


def check_compatibility(reader: dict[str, Any] | str, writer: dict[str, Any] | str) -> list[str]:
    """Return why ``reader`` cannot read every datum written with ``writer``.

    Follows the schema resolution rules of the Avro specification: record
    fields are matched by name (or reader field alias) and reader fields the
    writer lacks need a default; ``int`` promotes to ``long``, ``float`` and
    ``double``, ``long`` to ``float`` and ``double``, ``float`` to ``double``,
    and ``string`` and ``bytes`` to each other; every writer enum symbol must
    be a reader symbol unless the reader enum has a default; every branch of a
    writer union must be readable, and a reader union reads a writer type
    with its first branch that matches it; arrays and maps resolve their
    items and values; fixed sizes must be equal; named types match by
    unqualified name or by a reader alias. Logical types are ignored.

    Args:
        reader: The new schema, raw or parsed, as a dict or JSON text.
        writer: The schema the data was written with.

    Returns:
        Human readable problems; empty when the schemas are compatible.

    Raises:
        SchemaError: One of the schemas is invalid.
    """
    reader_parsed, reader_named = parse(reader)
    writer_parsed, writer_named = parse(writer)
    resolution = _Resolution(reader_named, writer_named)
    resolution.check(reader_parsed, writer_parsed, label(reader_parsed))
    return resolution.problems


class _Resolution:
    """Walks a reader and a writer schema together, collecting problems."""

    def __init__(self, reader_named: dict[str, Any], writer_named: dict[str, Any]) -> None:
        self.reader_named = reader_named
        self.writer_named = writer_named
        self.problems: list[str] = []
        self._seen: set[tuple[str, str]] = set()

    def check(self, reader: Any, writer: Any, path: str) -> None:
        r, w = _deref(reader, self.reader_named), _deref(writer, self.writer_named)
        if isinstance(w, list):
            for branch in w:
                self.check(r, branch, path)
            return
        if isinstance(r, list):
            for branch in r:
                if _matches(_deref(branch, self.reader_named), w):
                    self.check(branch, w, path)
                    return
            self.problems.append(f"{path}: no branch of {label(r)} can read {label(w)}")
            return
        rk, wk = _kind(r), _kind(w)
        if rk in _PRIMITIVES or wk in _PRIMITIVES or rk != wk:
            if not _matches(r, w):
                self.problems.append(f"{path}: {label(r)} cannot read {label(w)}")
        elif rk == "array":
            self.check(r["items"], w["items"], f"{path}[]")
        elif rk == "map":
            self.check(r["values"], w["values"], f"{path}{{}}")
        elif not _matches(r, w):
            self.problems.append(f"{path}: {r['name']} cannot read {w['name']} (names differ)")
        elif rk == "fixed" and r["size"] != w["size"]:
            self.problems.append(f"{path}: fixed size {r['size']} cannot read size {w['size']}")
        elif rk == "enum":
            missing = [s for s in w["symbols"] if s not in r["symbols"]]
            if missing and "default" not in r:
                self.problems.append(
                    f"{path}: writer symbols {missing} are unknown to the reader enum, "
                    "which has no default"
                )
        elif rk == "record" and (r["name"], w["name"]) not in self._seen:
            self._seen.add((r["name"], w["name"]))
            self._check_fields(r, w, path)

    def _check_fields(self, reader: dict[str, Any], writer: dict[str, Any], path: str) -> None:
        written = {fld["name"]: fld for fld in writer["fields"]}
        for fld in reader["fields"]:
            names = [fld["name"], *fld.get("aliases", [])]
            match = next((written[name] for name in names if name in written), None)
            if match is not None:
                self.check(fld["type"], match["type"], f"{path}.{fld['name']}")
            elif "default" not in fld:
                self.problems.append(
                    f"{path}: new field {fld['name']!r} has no default for data without it"
                )


def parse(schema: Any) -> tuple[Any, dict[str, Any]]:
    """Parse a raw or parsed schema (or its JSON text) with fastavro.

    Returns:
        The parsed schema and the named types it defines, by full name.

    Raises:
        SchemaError: The text is not JSON or the schema is not valid Avro.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SchemaError(f"schema is not valid JSON: {exc}") from exc
    named: dict[str, Any] = {}
    try:
        return parse_schema(schema, named), named
    except (SchemaParseException, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(f"invalid Avro schema: {exc!r}") from exc


def _deref(schema: Any, named: dict[str, Any]) -> Any:
    """Replace a named reference by its definition, a primitive dict by its name."""
    if isinstance(schema, str):
        return named.get(schema, schema)
    if isinstance(schema, dict) and schema.get("type") in _PRIMITIVES:
        return schema["type"]
    return schema


def _kind(schema: Any) -> str:
    kind = schema.get("type") if isinstance(schema, dict) else schema
    return "record" if kind == "error" else str(kind)


def _matches(reader: Any, writer: Any) -> bool:
    """Whether a reader type is chosen for a writer type (same kind and name, or promotion)."""
    rk, wk = _kind(reader), _kind(writer)
    if rk in _PRIMITIVES or wk in _PRIMITIVES:
        return rk == wk or rk in _PROMOTIONS.get(wk, ())
    if rk != wk or rk in ("array", "map"):
        return rk == wk
    short = writer["name"].rsplit(".", 1)[-1]
    aliases = reader.get("aliases", [])
    return bool(
        reader["name"].rsplit(".", 1)[-1] == short or {writer["name"], short} & set(aliases)
    )


def label(schema: Any) -> str:
    """Name a schema for a problem message: its full name, or its shape."""
    if isinstance(schema, list):
        return "[" + ", ".join(label(branch) for branch in schema) + "]"
    if isinstance(schema, dict):
        if "name" in schema:
            return str(schema["name"])
        if schema.get("type") in ("array", "map"):
            inner = schema.get("items", schema.get("values"))
            return f"{schema['type']}<{label(inner)}>"
        return label(schema.get("type"))
    return str(schema)
