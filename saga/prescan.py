"""A bounded pre-scan of Avro binary data against its writer schema.

fastavro (1.13, its C and Python readers alike) trusts the block counts of
arrays and maps: it appends items until the count is reached or the bytes
run out, and reads and ignores the byte size that follows a negative count.
A value of 1 MiB of zero bytes under a count of ``2**62`` makes it build a
million Python objects before it fails (measured under tracemalloc: 5 s and
60 MB for the ``steps`` of a stamp). It also indexes unions and enum symbols
with whatever index it reads, so a negative one silently picks a branch or a
symbol from the end. Bytes and strings are safe: it reads them from an
in-memory buffer, which never returns more than what is left.

So every value is first walked over the bytes without building anything:
every length and block count is checked against the bytes left (an item
takes at least one byte: the registry refuses arrays of items that encode to
nothing), the byte size of a negative-count block must match its items, enum
and union indexes must be in range, and the total number of items is
bounded. Only then does fastavro read the record. Errors say what is wrong
in sizes and counts, never quoting the bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saga.errors import SchemaError

__all__ = ["Budget", "Malformed", "Scan", "compile_scanner"]

Scan = Callable[[bytes, int, "Budget"], int]
"""Walk one value starting at an offset; return the offset after it."""


class Malformed(Exception):
    """The bytes do not fit the writer schema; the message says how, without quoting them."""


class Budget:
    """How many more array items and map entries one value may hold."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise Malformed("too many array items and map entries")


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """Read a zig-zag varint (at most 10 bytes); IndexError when the bytes run out."""
    byte = data[pos]
    pos += 1
    n = byte & 0x7F
    shift = 7
    while byte & 0x80:
        if shift > 63:
            raise Malformed("a variable-length integer is longer than 10 bytes")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
    if n >> 64:
        raise Malformed("an integer is out of the 64-bit range")
    return (n >> 1) ^ -(n & 1), pos


# The scanners below read one-byte varints inline: most are, and a call per
# varint doubles the cost of a scan.


def _scan_long(data: bytes, pos: int, budget: Budget) -> int:
    if data[pos] < 0x80:
        return pos + 1
    return _long(data, pos)[1]


def _scan_int(data: bytes, pos: int, budget: Budget) -> int:
    if data[pos] < 0x80:
        return pos + 1
    value, pos = _long(data, pos)
    if not -(2**31) <= value < 2**31:
        raise Malformed("an int is out of the 32-bit range")
    return pos


def _scan_length(data: bytes, pos: int, budget: Budget) -> int:
    byte = data[pos]
    if byte < 0x80:
        size = (byte >> 1) ^ -(byte & 1)
        pos += 1
    else:
        size, pos = _long(data, pos)
    if size < 0:
        raise Malformed(f"negative length {size}")
    if size > len(data) - pos:
        raise Malformed(f"a length of {size} is more than the {len(data) - pos} bytes left")
    return pos + size


def _skip(size: int) -> Scan:
    def scan(data: bytes, pos: int, budget: Budget) -> int:
        end = pos + size
        if end > len(data):
            raise IndexError
        return end

    return scan


def _scan_nothing(data: bytes, pos: int, budget: Budget) -> int:
    return pos


_FIXED_SIZES = {"null": 0, "boolean": 1, "float": 4, "double": 8}


@dataclass(frozen=True)
class _Node:
    """A compiled schema node: its scanner, least encoded size, and size if constant."""

    scan: Scan
    least: int
    size: int | None


def compile_scanner(schema: Any) -> Scan:
    """A scanner for a parsed writer schema (acyclic, as the registry ensures)."""
    return _compile(schema, {}).scan


def _compile(schema: Any, named: dict[str, _Node]) -> _Node:
    if isinstance(schema, str):
        if schema in named:
            return named[schema]
        kind: Any = schema
        schema = {"type": schema}
    elif isinstance(schema, list):
        return _union([_compile(branch, named) for branch in schema])
    else:
        kind = schema["type"]
        if isinstance(kind, (dict, list)):
            return _compile(kind, named)
    if kind in _FIXED_SIZES:
        size = _FIXED_SIZES[kind]
        return _Node(_scan_nothing if size == 0 else _skip(size), size, size)
    if kind == "int":
        return _Node(_scan_int, 1, None)
    if kind == "long":
        return _Node(_scan_long, 1, None)
    if kind in ("bytes", "string"):
        return _Node(_scan_length, 1, None)
    if kind == "fixed":
        size = int(schema["size"])
        named[schema["name"]] = node = _Node(_skip(size), size, size)
        return node
    if kind == "enum":
        named[schema["name"]] = node = _Node(_enum(len(schema["symbols"])), 1, None)
        return node
    if kind in ("record", "error"):
        fields = [_compile(fld["type"], named) for fld in schema["fields"]]
        named[schema["name"]] = node = _record(fields)
        return node
    if kind == "array":
        return _blocks(_compile(schema["items"], named), key=False)
    if kind == "map":
        return _blocks(_compile(schema["values"], named), key=True)
    raise SchemaError(f"cannot scan Avro type {kind!r}")


def _enum(symbols: int) -> Scan:
    def scan(data: bytes, pos: int, budget: Budget) -> int:
        byte = data[pos]
        if byte < 0x80:
            index = (byte >> 1) ^ -(byte & 1)
            pos += 1
        else:
            index, pos = _long(data, pos)
        if not 0 <= index < symbols:
            raise Malformed(f"enum index {index} is out of range")
        return pos

    return scan


def _union(branches: list[_Node]) -> _Node:
    scans = [branch.scan for branch in branches]

    def scan(data: bytes, pos: int, budget: Budget) -> int:
        byte = data[pos]
        if byte < 0x80:
            index = (byte >> 1) ^ -(byte & 1)
            pos += 1
        else:
            index, pos = _long(data, pos)
        if not 0 <= index < len(scans):
            raise Malformed(f"union index {index} is out of range")
        return scans[index](data, pos, budget)

    return _Node(scan, 1 + min((b.least for b in branches), default=0), None)


def _record(fields: list[_Node]) -> _Node:
    least = sum(node.least for node in fields)
    if all(node.size is not None for node in fields):
        return _Node(_skip(least) if least else _scan_nothing, least, least)
    scans = [node.scan for node in fields]

    def scan(data: bytes, pos: int, budget: Budget) -> int:
        for field_scan in scans:
            pos = field_scan(data, pos, budget)
        return pos

    return _Node(scan, least, None)


def _blocks(item: _Node, *, key: bool) -> _Node:
    """Arrays (``key`` False) and maps: blocks of items, ended by a zero count."""
    least = max(1, item.least + (1 if key else 0))
    size = None if key or item.size is None else item.size
    item_scan = item.scan
    what = "map entries" if key else "array items"

    def scan(data: bytes, pos: int, budget: Budget) -> int:
        while True:
            count, pos = _long(data, pos)
            if count == 0:
                return pos
            block_end = None
            if count < 0:
                # A negative count is followed by the block's size in bytes.
                count = -count
                block_size, pos = _long(data, pos)
                left = len(data) - pos
                if not 0 <= block_size <= left:
                    raise Malformed(f"a block size of {block_size} for {left} bytes left")
                block_end = pos + block_size
            if count * least > len(data) - pos:
                raise Malformed(
                    f"a block of {count} {what} cannot fit in the {len(data) - pos} bytes left"
                )
            budget.take(count)
            if size is not None:
                pos += count * size
            else:
                for _ in range(count):
                    if key:
                        pos = _scan_length(data, pos, budget)
                    pos = item_scan(data, pos, budget)
            if block_end is not None and pos != block_end:
                raise Malformed(f"a block of {what} does not match its declared byte size")

    return _Node(scan, 1, None)
