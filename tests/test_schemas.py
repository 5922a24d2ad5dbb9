"""Tests for the schema registry, fingerprints and compatibility checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from fastavro.schema import SchemaParseException, UnknownType, fingerprint
from hypothesis import given
from hypothesis import strategies as st

from saga.errors import IncompatibleSchemaError, SchemaError
from saga.schemas import (
    SchemaRegistry,
    check_compatibility,
    check_directory,
    crc64_avro,
)

SCHEMAS = Path(__file__).parent / "schemas"
EVOLUTION = SCHEMAS / "evolution"
BROKEN = SCHEMAS / "broken"
GREETING = "choreosaga.test.Greeting"


def record(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def fld(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


# --- fingerprints -----------------------------------------------------------

# Published in Apache Avro's share/test/data/schema-tests.txt as signed 64-bit
# integers; the Ruby implementation's test also gives "int" as 0x7275d51a3f395c8f.
PUBLISHED_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"boolean"', -6970731678124411036),
    ('"int"', 8247732601305521295),
    ('"long"', -3434872931120570953),
    ('"string"', -8142146995180207161),
    ('{"name":"foo","type":"fixed","size":15}', 1756455273707447556),
    (
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}',
        7843277075252814651,
    ),
]


@pytest.mark.parametrize(("canonical", "signed"), PUBLISHED_VECTORS)
def test_crc64_avro_matches_published_vectors(canonical: str, signed: int) -> None:
    assert crc64_avro(canonical.encode()) == signed & 0xFFFF_FFFF_FFFF_FFFF


def test_crc64_avro_of_int_is_the_published_hex_value() -> None:
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F


@given(st.text())
def test_crc64_avro_agrees_with_fastavro_which_prints_little_endian_bytes(text: str) -> None:
    ours = crc64_avro(text.encode("utf-8"))
    assert ours.to_bytes(8, "little").hex() == fingerprint(text, "CRC-64-AVRO")


def test_registered_fingerprint_is_that_of_the_parsing_canonical_form() -> None:
    schema = {"type": "record", "name": "foo", "doc": "ignored", "fields": [fld("f1", "boolean")]}
    entry = SchemaRegistry().register(schema)
    assert entry.canonical == PUBLISHED_VECTORS[-1][0]
    assert entry.fingerprint == PUBLISHED_VECTORS[-1][1]
    assert entry.name == "foo"


# --- the registry -----------------------------------------------------------


def test_registering_the_same_schema_twice_returns_the_existing_entry() -> None:
    registry = SchemaRegistry()
    first = registry.register(record("a.R", fld("x", "int")))
    # Same canonical form: JSON text, other whitespace, a doc string.
    again = registry.register(json.dumps(record("a.R", fld("x", "int"), doc="d"), indent=4))
    assert again is first
    assert registry.names() == ["a.R"]


def test_latest_is_the_last_version_and_older_ones_stay_readable_by_fingerprint() -> None:
    registry = SchemaRegistry()
    v1 = registry.register(record("a.R", fld("x", "int")))
    v2 = registry.register(record("a.R", fld("x", "int"), fld("y", "string", default="")))
    assert registry.latest("a.R") == v2
    assert registry.by_fingerprint(v1.fingerprint) == v1
    assert registry.register(record("a.R", fld("x", "int"))) is v1
    assert registry.latest("a.R") == v2  # re-registering v1 does not roll back


def test_unknown_name_and_fingerprint_are_schema_errors() -> None:
    registry = SchemaRegistry()
    with pytest.raises(SchemaError, match="no schema named"):
        registry.latest("a.Missing")
    with pytest.raises(SchemaError, match="fingerprint"):
        registry.by_fingerprint(42)


def test_registered_schema_is_frozen_and_hashable() -> None:
    entry = SchemaRegistry().register(record("a.R", fld("x", "int")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "other"  # type: ignore[misc]
    assert len({entry, entry}) == 1


def test_from_directory_registers_versions_in_path_order() -> None:
    registry = SchemaRegistry.from_directory(EVOLUTION)
    assert registry.names() == ["choreosaga.test.Farewell", GREETING]
    field_names = [f["name"] for f in registry.latest(GREETING).parsed["fields"]]
    assert field_names == ["text", "count", "sender", "language"]


def test_from_directory_compares_version_numbers_as_numbers(tmp_path: Path) -> None:
    fields = [fld("a", "int")]
    for version in range(1, 12):
        if version > 1:
            fields.append(fld(f"f{version}", "int", default=version))
        suffix = "" if version == 1 else f".v{version}"
        (tmp_path / f"R{suffix}.avsc").write_text(json.dumps(record("x.R", *fields)))
    latest = SchemaRegistry.from_directory(tmp_path).latest("x.R")
    assert latest.parsed["fields"][-1]["name"] == "f11"


def test_from_directory_names_the_refused_file() -> None:
    with pytest.raises(SchemaError, match=r"Greeting\.v2\.avsc") as info:
        SchemaRegistry.from_directory(BROKEN)
    assert isinstance(info.value, IncompatibleSchemaError)


def test_from_directory_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="no schema directory"):
        SchemaRegistry.from_directory(tmp_path / "nope")


def test_default_loads_the_project_schemas_directory() -> None:
    project_schemas = Path(__file__).resolve().parent.parent / "schemas"
    expected = SchemaRegistry.from_directory(project_schemas).names()
    assert SchemaRegistry.default().names() == expected


# --- refused schemas ----------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        record("a.Node", fld("next", ["null", "Node"])),
        record("a.Tree", fld("children", {"type": "array", "items": "Tree"})),
        record("a.Json", fld("fields", {"type": "map", "values": ["null", "Json"]})),
        record(
            "a.A",
            fld("b", ["null", record("B", fld("a", ["null", "A"]))]),
        ),
        record("a.R", fld("xs", {"type": "array", "items": record("I", fld("i", "I"))})),
    ],
    ids=["direct", "array", "map", "through-another-type", "inside-array-items"],
)
def test_recursive_schemas_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(SchemaError, match="recursive"):
        SchemaRegistry().register(schema)


def test_recursive_schema_file_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"choreosaga\.test\.Node -> choreosaga\.test\.Node"):
        SchemaRegistry().register((BROKEN / "choreosaga/test/Node.avsc").read_text())


def test_a_named_type_used_twice_is_not_recursion() -> None:
    money = {"type": "fixed", "name": "Money", "size": 8}
    entry = SchemaRegistry().register(record("a.a.R", fld("price", money), fld("tax", "Money")))
    assert entry.name == "a.a.R"


@pytest.mark.parametrize(
    "items", ["null", record("Empty"), record("Nulls", fld("n", "null"))], ids=str
)
def test_arrays_of_zero_byte_items_are_refused(items: Any) -> None:
    with pytest.raises(SchemaError, match="zero bytes"):
        SchemaRegistry().register(record("a.R", fld("xs", {"type": "array", "items": items})))


@pytest.mark.parametrize(
    ("schema", "cause"),
    [
        (record("a.R", fld("x", "int", default="nope")), SchemaParseException),
        (record("a.R", fld("x", "Unknown")), UnknownType),
        ('{"type": "record", "name": ', json.JSONDecodeError),
    ],
    ids=["bad-default", "unknown-type", "bad-json"],
)
def test_invalid_schemas_are_refused_with_the_cause_chained(
    schema: dict[str, Any] | str, cause: type[Exception]
) -> None:
    with pytest.raises(SchemaError) as info:
        SchemaRegistry().register(schema)
    assert isinstance(info.value.__cause__, cause)


@pytest.mark.parametrize(
    "schema",
    [
        '"int"',
        {"type": "enum", "name": "a.E", "symbols": ["A"]},
        record("a.R", fld("x", "int"), fld("x", "long")),
        record("a.1R", fld("x", "int")),
        record("a.R", fld("x-y", "int")),
        record("a.R", fld("e", {"type": "enum", "name": "E", "symbols": ["A", "A"]})),
        record("a.R", fld("f", {"type": "fixed", "name": "F", "size": -1})),
    ],
    ids=["primitive", "enum", "duplicate-field", "bad-name", "bad-field", "dup-symbol", "size"],
)
def test_schemas_that_are_not_valid_message_records_are_refused(schema: Any) -> None:
    with pytest.raises(SchemaError):
        SchemaRegistry().register(schema)


# --- compatibility ----------------------------------------------------------

ENUM = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
FIXED4 = {"type": "fixed", "name": "F", "size": 4}


def one(type_: Any, **extra: Any) -> dict[str, Any]:
    return record("a.R", fld("v", type_, **extra))


COMPATIBLE = [
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
    ("int", ["null", "int"]),
    ("int", ["null", "long"]),
    (["null", "int"], ["null", "int", "string"]),
    (ENUM, {**ENUM, "symbols": ["A", "B", "C"]}),
    (ENUM, {**ENUM, "symbols": ["A"], "default": "A"}),
    ({"type": "array", "items": "int"}, {"type": "array", "items": "long"}),
    ({"type": "map", "values": "float"}, {"type": "map", "values": "double"}),
    (FIXED4, FIXED4),
    ({**FIXED4, "name": "x.F"}, {**FIXED4, "name": "y.F"}),  # unqualified names match
    ({**ENUM, "name": "Old"}, {**ENUM, "aliases": ["Old"]}),
    ({"type": "long", "logicalType": "timestamp-millis"}, "long"),
]

INCOMPATIBLE = [
    ("long", "int", "int cannot read long"),
    ("double", "float", "float cannot read double"),
    ("string", "int", "int cannot read string"),
    (["null", "string"], "string", "string cannot read null"),
    ("int", ["null", "string"], "no branch"),
    (ENUM, {**ENUM, "symbols": ["A"]}, "['B']"),
    ({"type": "array", "items": "long"}, {"type": "array", "items": "int"}, "v[]"),
    ({"type": "map", "values": "string"}, {"type": "map", "values": "int"}, "v{}"),
    (FIXED4, {**FIXED4, "size": 8}, "fixed size 8 cannot read size 4"),
    (FIXED4, {**FIXED4, "name": "G"}, "names differ"),
    (ENUM, FIXED4, "a.F cannot read a.E"),
    ({"type": "array", "items": "int"}, {"type": "map", "values": "int"}, "cannot read"),
]


@pytest.mark.parametrize(("writer", "reader"), COMPATIBLE, ids=str)
def test_compatible_changes(writer: Any, reader: Any) -> None:
    assert check_compatibility(one(reader), one(writer)) == []


@pytest.mark.parametrize(("writer", "reader", "problem"), INCOMPATIBLE, ids=str)
def test_incompatible_changes_are_explained(writer: Any, reader: Any, problem: str) -> None:
    problems = check_compatibility(one(reader), one(writer))
    assert len(problems) == 1
    assert problem in problems[0]
    assert problems[0].startswith("a.R.v")


def test_fields_are_matched_by_name_and_added_ones_need_a_default() -> None:
    writer = record("a.R", fld("old", "int"), fld("dropped", "string"))
    assert check_compatibility(record("a.R", fld("old", "int")), writer) == []
    assert (
        check_compatibility(record("a.R", fld("old", "int"), fld("new", "int", default=0)), writer)
        == []
    )
    assert check_compatibility(record("a.R", fld("renamed", "int", aliases=["old"])), writer) == []
    assert check_compatibility(record("a.R", fld("old", "int"), fld("new", "int")), writer) == [
        "a.R: new field 'new' has no default for data without it"
    ]


def test_nested_records_are_checked_field_by_field() -> None:
    writer = record("a.R", fld("inner", record("I", fld("x", "string"))))
    reader = record("a.R", fld("inner", record("I", fld("x", "string"), fld("y", "int"))))
    assert check_compatibility(reader, writer) == [
        "a.R.inner: new field 'y' has no default for data without it"
    ]


def test_register_refuses_an_incompatible_version_and_keeps_the_previous_one() -> None:
    registry = SchemaRegistry()
    v1 = registry.register((BROKEN / "choreosaga/test/Greeting.avsc").read_text())
    for bad, problem in [("Greeting.v2.avsc", "'language'"), ("Greeting.v3.avsc", "text")]:
        with pytest.raises(IncompatibleSchemaError, match=problem):
            registry.register((BROKEN / "choreosaga/test" / bad).read_text())
    assert registry.latest(GREETING) == v1


def test_register_checks_against_every_earlier_version_not_only_the_latest() -> None:
    registry = SchemaRegistry()
    registry.register(record("a.R", fld("id", "int"), fld("note", "string")))
    registry.register(record("a.R", fld("id", "int")))  # drops note: fine
    # Compatible with v2, but v1 data has a string "note" that an int cannot read.
    v3 = record("a.R", fld("id", "int"), fld("note", "int", default=0))
    assert check_compatibility(v3, record("a.R", fld("id", "int"))) == []
    with pytest.raises(IncompatibleSchemaError, match="int cannot read string"):
        registry.register(v3)


def test_check_directory_lists_every_problem_with_its_file() -> None:
    problems = check_directory(BROKEN)
    assert len(problems) == 5
    joined = "\n".join(problems)
    assert "Greeting.v2.avsc: cannot read data written with Greeting.avsc" in joined
    assert "new field 'language' has no default" in joined
    assert "Greeting.v3.avsc: cannot read data written with Greeting.avsc" in joined
    assert "Greeting.v3.avsc: cannot read data written with Greeting.v2.avsc" in joined
    assert "Node.avsc: recursive schemas are refused" in joined
    assert "NotJson.avsc: schema is not valid JSON" in joined


def test_check_directory_is_empty_for_a_good_directory(tmp_path: Path) -> None:
    assert check_directory(EVOLUTION) == []
    assert check_directory(tmp_path / "missing") == [
        f"no schema directory at {tmp_path / 'missing'}"
    ]
