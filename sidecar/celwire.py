"""The checked expression of a compiled CEL program, read from cel-cpp's serialized form.

`Expression.serialize()` gives a `google.protobuf.Any` holding a `cel.expr.CheckedExpr`
(cel-spec's checked.proto and syntax.proto). No Python package ships those messages, and
the few fields read here are stable parts of the published spec, so the protobuf wire
format is decoded directly: a tree of `Node`s and each node's offset in the source.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["CheckedExpression", "Node", "checked_expression"]

_Buffer = memoryview
_Fields = dict[int, list[int | _Buffer]]


class Node(NamedTuple):
    """One expression node, as far as a cost estimate needs it (a named tuple rather
    than a frozen dataclass: a ruleset decodes tens of thousands, and this is 3x faster
    to build).

    kind: const, ident, select, call, list, map or comprehension. `children`: a select's
    operand; a call's target (if any) then arguments; a list's items; a map's keys and
    values in turn; a comprehension's range, accumulator init, loop condition, loop
    step and result.
    """

    id: int
    kind: str
    name: str = ""  # identifier, selected field, or called function
    text: str | None = None  # the value of a string or bytes constant
    children: tuple[Node, ...] = ()
    test_only: bool = False  # has(x.f)
    iter_vars: tuple[str, ...] = ()
    accu_var: str = ""
    overloads: frozenset[str] = frozenset()  # a call's candidate overloads, as checked
    # A constant's type (null, bool, int, uint, double, string, bytes; "other" for the
    # rest, "invalid" for a string that is not UTF-8) and its value, for `sidecar.fastpath`.
    literal: str = ""
    value: object = None


def _varint(data: _Buffer, at: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at
        shift += 7


def _message(data: _Buffer) -> _Fields:
    """The fields of one message by number (written for speed: rules are priced at
    every load, and one-byte varints are by far the most common)."""
    fields: _Fields = {}
    at, end = 0, len(data)
    while at < end:
        key = data[at]
        at += 1
        if key >= 0x80:
            key, at = _varint(data, at - 1)
        wire = key & 7
        value: int | _Buffer
        if wire == 0:
            value = data[at]
            at += 1
            if value >= 0x80:
                value, at = _varint(data, at - 1)
        elif wire == 2:
            size = data[at]
            at += 1
            if size >= 0x80:
                size, at = _varint(data, at - 1)
            value = data[at : at + size]
            at += size
        elif wire == 1:
            value = struct.unpack_from("<Q", data, at)[0]
            at += 8
        elif wire == 5:
            value = struct.unpack_from("<I", data, at)[0]
            at += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        fields.setdefault(key >> 3, []).append(value)
    return fields


_EMPTY = memoryview(b"")


def _bytes(fields: _Fields, number: int) -> _Buffer:
    value = fields.get(number, [_EMPTY])[-1]
    return value if isinstance(value, memoryview) else _EMPTY


def _int(fields: _Fields, number: int) -> int:
    value = fields.get(number, [0])[-1]
    return value if isinstance(value, int) else 0


def _text(fields: _Fields, number: int) -> str:
    return str(_bytes(fields, number), "utf-8", "replace")


def _messages(fields: _Fields, number: int) -> list[_Buffer]:
    return [value for value in fields.get(number, []) if isinstance(value, memoryview)]


def _literal(constant: _Fields) -> tuple[str, object]:  # noqa: PLR0911
    """A Constant's type and exact value: null 1, bool 2, int64 3, uint64 4, double 5,
    string 6, bytes 7 (anything else: duration, timestamp)."""
    if 1 in constant:
        return "null", None
    if 2 in constant:
        return "bool", bool(_int(constant, 2))
    if 3 in constant:
        raw = _int(constant, 3) & 0xFFFF_FFFF_FFFF_FFFF
        return "int", raw - (1 << 64) if raw >= 1 << 63 else raw
    if 4 in constant:
        return "uint", _int(constant, 4)
    if 5 in constant:
        return "double", struct.unpack("<d", struct.pack("<Q", _int(constant, 5)))[0]
    if 6 in constant:
        try:
            return "string", str(_bytes(constant, 6), "utf-8")
        except UnicodeDecodeError:
            return "invalid", None
    if 7 in constant:
        return "bytes", bytes(_bytes(constant, 7))
    return "other", None


def _node(data: _Buffer, overloads: dict[int, frozenset[str]]) -> Node:  # noqa: PLR0911
    """One node and its subtree (one return per kind of expression)."""
    fields = _message(data)
    node_id = _int(fields, 2)
    if 3 in fields:  # Constant: string_value 6, bytes_value 7
        constant = _message(_bytes(fields, 3))
        text = None
        if 6 in constant:
            text = _text(constant, 6)
        elif 7 in constant:
            text = str(_bytes(constant, 7), "latin-1")
        literal, value = _literal(constant)
        return Node(node_id, "const", text=text, literal=literal, value=value)
    if 4 in fields:  # Ident: name 1
        return Node(node_id, "ident", name=_text(_message(_bytes(fields, 4)), 1))
    if 5 in fields:  # Select: operand 1, field 2, test_only 3
        select = _message(_bytes(fields, 5))
        operand = _node(_bytes(select, 1), overloads)
        return Node(node_id, "select", _text(select, 2), None, (operand,), bool(_int(select, 3)))
    if 6 in fields:  # Call: target 1, function 2, args 3
        call = _message(_bytes(fields, 6))
        target = [_node(_bytes(call, 1), overloads)] if 1 in call else []
        args = [_node(arg, overloads) for arg in _messages(call, 3)]
        return Node(
            node_id,
            "call",
            _text(call, 2),
            children=(*target, *args),
            overloads=overloads.get(node_id, frozenset()),
        )
    if 7 in fields:  # CreateList: elements 1
        items = _messages(_message(_bytes(fields, 7)), 1)
        return Node(node_id, "list", children=tuple(_node(item, overloads) for item in items))
    if 8 in fields:  # CreateStruct: entries 2 (Entry: map_key 3, value 4)
        children: list[Node] = []
        for entry in _messages(_message(_bytes(fields, 8)), 2):
            parts = _message(entry)
            children.extend(_node(_bytes(parts, n), overloads) for n in (3, 4) if n in parts)
        return Node(node_id, "map", children=tuple(children))
    if 9 in fields:  # Comprehension: iter_var 1, range 2, accu_var 3, init 4, cond 5,
        loop = _message(_bytes(fields, 9))  # step 6, result 7, iter_var2 8
        names = tuple(_text(loop, n) for n in (1, 8) if _text(loop, n))
        steps = tuple(_node(_bytes(loop, n), overloads) for n in (2, 4, 5, 6, 7))
        return Node(
            node_id, "comprehension", children=steps, iter_vars=names, accu_var=_text(loop, 3)
        )
    return Node(node_id, "const")


@dataclass(frozen=True, slots=True)
class CheckedExpression:
    """The expression tree of a compiled program; `offset` reads positions on demand
    (only a refusal needs one)."""

    root: Node
    source_info: bytes

    def offsets(self) -> dict[int, int]:
        """Every node's offset in the source, in code points, by node id."""
        info = _message(memoryview(self.source_info))  # SourceInfo: positions 4 (map)
        found = {}
        for entry in _messages(info, 4):
            parts = _message(entry)
            found[_int(parts, 1)] = _int(parts, 2)
        return found

    def offset(self, node_id: int) -> int:
        """The node's offset in the source, in code points (0 if unknown)."""
        info = _message(memoryview(self.source_info))  # SourceInfo: positions 4 (map)
        for entry in _messages(info, 4):
            parts = _message(entry)
            if _int(parts, 1) == node_id:
                return _int(parts, 2)
        return 0


def checked_expression(serialized: bytes) -> CheckedExpression:
    """The expression of a program serialized by `Expression.serialize()`."""
    envelope = _message(memoryview(serialized))  # google.protobuf.Any: type_url 1, value 2
    checked = _message(_bytes(envelope, 2))  # CheckedExpr: reference_map 2, expr 4,
    overloads: dict[int, frozenset[str]] = {}  # source_info 5
    for entry in _messages(checked, 2):  # map entry: key 1, Reference 2 (overload_id 3)
        parts = _message(entry)
        reference = _message(_bytes(parts, 2))
        if 3 in reference:
            overloads[_int(parts, 1)] = frozenset(str(o, "utf-8") for o in _messages(reference, 3))
    root = _node(_bytes(checked, 4), overloads)
    return CheckedExpression(root, bytes(_bytes(checked, 5)))
