"""Avro schemas for message values: a registry keyed by name and fingerprint.

A schema is identified on the wire by the CRC-64-AVRO fingerprint of its
Parsing Canonical Form. Several versions of one full name may be registered;
the latest is the reader schema, so each new version must read data written
with every earlier one (transitive backward compatibility). Schemas that are
unsafe for decoding untrusted bytes are refused: recursive types and arrays
of items that encode to zero bytes.

Schema files (``*.avsc``, one per file) load in path order with digits
compared as numbers: ``Greeting.avsc`` (version 1), ``Greeting.v2.avsc``,
..., ``Greeting.v10.avsc``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro.schema import to_parsing_canonical_form

from saga.compatibility import check_compatibility, label, parse
from saga.errors import IncompatibleSchemaError, SchemaError

__all__ = [
    "RegisteredSchema",
    "SchemaRegistry",
    "check_compatibility",
    "check_directory",
    "crc64_avro",
    "default_schema_directory",
]

_EMPTY64 = 0xC15D213AA4D7A795
_NAMED_KINDS = frozenset({"record", "error", "enum", "fixed"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _rabin_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return tuple(table)


_RABIN_TABLE = _rabin_table()


def crc64_avro(data: bytes) -> int:
    """Return the CRC-64-AVRO (Rabin) fingerprint of ``data``.

    This is the 64-bit fingerprint of the Avro specification; schemas are
    fingerprinted over the UTF-8 bytes of their Parsing Canonical Form. Single
    object encoding writes the result as 8 little-endian bytes.
    """
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _RABIN_TABLE[(fp ^ byte) & 0xFF]
    return fp


@dataclass(frozen=True, kw_only=True)
class RegisteredSchema:
    """One version of a schema, parsed once and kept for encoding and decoding."""

    name: str
    """Full name of the record, for example ``choreosaga.saga.Stamp``."""

    fingerprint: int
    """CRC-64-AVRO fingerprint of :attr:`canonical`."""

    parsed: dict[str, Any] = field(compare=False, repr=False)
    """The schema as parsed by fastavro; treat it as read-only."""

    canonical: str
    """The Parsing Canonical Form of the schema."""


class SchemaRegistry:
    """Avro record schemas keyed by full name (all versions) and by fingerprint.

    Each registered schema must be self-contained: it may not refer to named
    types defined in other registered schemas.
    """

    def __init__(self) -> None:
        self._by_fingerprint: dict[int, RegisteredSchema] = {}
        self._versions: dict[str, list[RegisteredSchema]] = {}

    def register(self, schema: dict[str, Any] | str) -> RegisteredSchema:
        """Parse and register a schema, as a new version of its full name.

        Registering a schema that is already registered (same fingerprint)
        changes nothing and returns the existing entry, even if newer versions
        of the name have been registered since.

        Args:
            schema: The schema as a JSON-like dict or as JSON text.

        Returns:
            The registered entry.

        Raises:
            SchemaError: The schema is invalid, not a record, or unsafe to
                decode (recursive, or with zero-byte array items).
            IncompatibleSchemaError: The schema cannot read data written with
                an earlier version of the same name.
        """
        entry = _load(schema)
        existing = self._by_fingerprint.get(entry.fingerprint)
        if existing is not None:
            if existing.canonical != entry.canonical:
                raise SchemaError(
                    f"fingerprint collision: {entry.name} and {existing.name} "
                    f"both have fingerprint {entry.fingerprint:#018x}"
                )
            return existing
        earlier = self._versions.get(entry.name, [])
        problems = [p for old in earlier for p in check_compatibility(entry.parsed, old.parsed)]
        if problems:
            raise IncompatibleSchemaError(
                f"new version of {entry.name} cannot read older data: "
                + "; ".join(dict.fromkeys(problems))
            )
        self._by_fingerprint[entry.fingerprint] = entry
        self._versions.setdefault(entry.name, []).append(entry)
        return entry

    def latest(self, name: str) -> RegisteredSchema:
        """Return the most recently registered version of ``name``.

        Raises:
            SchemaError: No schema of that name is registered.
        """
        versions = self._versions.get(name)
        if not versions:
            raise SchemaError(f"no schema named {name!r} is registered")
        return versions[-1]

    def by_fingerprint(self, fingerprint: int) -> RegisteredSchema:
        """Return the schema with this CRC-64-AVRO fingerprint.

        Raises:
            SchemaError: No schema with that fingerprint is registered.
        """
        try:
            return self._by_fingerprint[fingerprint]
        except KeyError:
            raise SchemaError(f"no schema with fingerprint {fingerprint:#018x}") from None

    def names(self) -> list[str]:
        """Return the full names of the registered schemas, sorted."""
        return sorted(self._versions)

    @classmethod
    def from_directory(cls, path: str | Path) -> SchemaRegistry:
        """Build a registry from every ``*.avsc`` file under ``path``, recursively.

        Files are registered in path order (digits compared as numbers), so
        ``Greeting.avsc`` is registered before ``Greeting.v2.avsc``.

        Raises:
            SchemaError: ``path`` is not a directory, or a file is refused; the
                message names the file. Incompatible versions raise
                :class:`IncompatibleSchemaError`.
        """
        registry = cls()
        for file in _schema_files(Path(path)):
            try:
                registry.register(_read(file))
            except SchemaError as exc:
                raise type(exc)(f"{file}: {exc}") from exc
        return registry

    @classmethod
    def default(cls) -> SchemaRegistry:
        """Build a registry from the project's own ``schemas/`` directory.

        The directory sits at the top of the source tree, next to ``saga/``,
        which is where an editable (``pip install -e .``) or source install
        finds it. A build that copies the schemas into ``saga/_schemas`` as
        package data is found too. Each call builds a new registry.

        Raises:
            SchemaError: Neither location exists, or a schema is refused.
        """
        return cls.from_directory(default_schema_directory())


def default_schema_directory() -> Path:
    """The project's schemas: inside the installed package, or the source tree.

    A regular install ships them as ``saga/_schemas``; an editable install
    (``pip install -e .``) reads ``schemas/`` at the top of the source tree.

    Raises:
        SchemaError: Neither location exists.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent / "schemas"):
        if candidate.is_dir():
            return candidate
    raise SchemaError(f"no schemas directory at {here / '_schemas'} nor {here.parent / 'schemas'}")


def check_directory(path: str | Path, *, full: bool = False) -> list[str]:
    """Return every problem with the schema files under ``path``.

    Each file is checked on its own (valid JSON, a valid and safe record
    schema), then each version of a name is checked against every earlier
    version of that name, in the order :meth:`SchemaRegistry.from_directory`
    registers them: the new version must read data written with the earlier
    ones (backward compatibility). With ``full``, the earlier versions must
    also read data written with the new one (forward compatibility, for
    consumers that upgrade after producers).

    Returns:
        Human readable problems, each prefixed by the file it concerns; empty
        when the directory would load.
    """
    problems: list[str] = []
    versions: dict[str, list[tuple[Path, RegisteredSchema]]] = {}
    try:
        files = _schema_files(Path(path))
    except SchemaError as exc:
        return [str(exc)]
    for file in files:
        try:
            entry = _load(_read(file))
        except SchemaError as exc:
            problems.append(f"{file}: {exc}")
            continue
        earlier = versions.setdefault(entry.name, [])
        for old_file, old in earlier:
            if old.fingerprint != entry.fingerprint:
                problems.extend(
                    f"{file}: cannot read data written with {old_file.name}: {problem}"
                    for problem in check_compatibility(entry.parsed, old.parsed)
                )
                if full:
                    problems.extend(
                        f"{file}: {old_file.name} cannot read data written with it: {problem}"
                        for problem in check_compatibility(old.parsed, entry.parsed)
                    )
        earlier.append((file, entry))
    return problems


def _load(schema: dict[str, Any] | str) -> RegisteredSchema:
    """Parse, check and fingerprint a schema without registering it."""
    parsed, named = parse(schema)
    if not isinstance(parsed, dict) or parsed.get("type") not in ("record", "error"):
        raise SchemaError("a message schema must be an Avro record")
    _check_structure(parsed, named)
    try:
        canonical = to_parsing_canonical_form(parsed)
    except (ValueError, TypeError, KeyError) as exc:
        raise SchemaError(f"invalid Avro schema: {exc!r}") from exc
    return RegisteredSchema(
        name=parsed["name"],
        fingerprint=crc64_avro(canonical.encode("utf-8")),
        parsed=parsed,
        canonical=canonical,
    )


def _check_structure(node: Any, named: dict[str, Any], stack: tuple[str, ...] = ()) -> None:
    """Refuse what fastavro lets through: bad names, and shapes unsafe to decode.

    Recursion is refused because nesting would be unbounded; arrays of items
    that encode to zero bytes because a tiny message could claim 2**60 items.
    """
    if isinstance(node, str):
        node = named.get(node)
    if isinstance(node, list):
        for branch in node:
            _check_structure(branch, named, stack)
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind in _NAMED_KINDS:
        name = node["name"]
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            raise SchemaError(f"recursive schemas are refused: {cycle}")
        _check_names(name, name.split("."), unique=False)
        stack = (*stack, name)
    if kind in ("record", "error"):
        _check_names(f"fields of {node['name']}", [fld["name"] for fld in node["fields"]])
        for fld in node["fields"]:
            _check_structure(fld["type"], named, stack)
    elif kind == "enum":
        _check_names(f"symbols of {node['name']}", node["symbols"])
    elif kind == "fixed" and not (isinstance(node["size"], int) and node["size"] >= 0):
        raise SchemaError(f"fixed {node['name']} has an invalid size {node['size']!r}")
    elif kind == "array":
        _check_structure(node["items"], named, stack)  # first: _can_be_empty needs no cycles
        if _can_be_empty(node["items"], named):
            raise SchemaError(f"array items {label(node['items'])} may encode to zero bytes")
    elif kind == "map":
        _check_structure(node["values"], named, stack)


def _check_names(what: str, names: list[Any], *, unique: bool = True) -> None:
    bad = [n for n in names if not (isinstance(n, str) and _NAME.fullmatch(n))]
    if bad or (unique and len(set(names)) != len(names)):
        raise SchemaError(f"invalid or duplicate names in {what}: {names}")


def _can_be_empty(schema: Any, named: dict[str, Any]) -> bool:
    """Whether a value of ``schema`` may encode to zero bytes (schema is acyclic)."""
    if isinstance(schema, str):
        return _can_be_empty(named[schema], named) if schema in named else schema == "null"
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "error"):
            return all(_can_be_empty(fld["type"], named) for fld in schema["fields"])
        if kind == "fixed":
            return bool(schema["size"] == 0)
        return kind not in ("enum", "array", "map") and _can_be_empty(kind, named)
    return False  # a union always writes its branch index


def _schema_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise SchemaError(f"no schema directory at {directory}")

    def key(file: Path) -> list[tuple[str, int]]:
        parts = re.split(r"(\d+)", file.relative_to(directory).as_posix())
        return [
            (parts[i], int(parts[i + 1]) if i + 1 < len(parts) else -1)
            for i in range(0, len(parts), 2)
        ]

    return sorted((file for file in directory.rglob("*.avsc") if file.is_file()), key=key)


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"cannot read schema file: {exc}") from exc
