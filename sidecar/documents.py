"""Read rule files into documents that remember where each value was written.

YAML goes through PyYAML's C parser to a node tree; the tree is checked (no mapping or
list reachable twice, so an alias bomb cannot explode later; no duplicate keys; bounded
depth; bounded expanded text, every scalar counted each time an alias reaches it, so a
small file of aliases to one big string cannot become gigabytes in every answer that
serializes it) and kept so that an error found later, by the schema or the CEL compiler,
can be pointed at its file, line and column. JSON is parsed by `json` (YAML 1.1 would read
`1e3` as a string) and located through the same node tree. Before any tree is composed,
the number of values is bounded (a composed node costs about 500 bytes).

Values are JSON's, whatever the syntax: a rule file is served, digested and saved as
JSON, so YAML's other types (`!!binary`, `!!set`, `!!omap`, `!!pairs`, an explicit
`!!timestamp`), non-finite numbers, numbers too long to convert and JSON escapes of lone
surrogates are refused where they are written, and mapping keys become strings (`1: a` is
`"1": a`, as Kubernetes reads it).
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

import yaml

from sidecar.errors import Problem, ProblemCode, excerpt, format_path
from sidecar.model import Location
from sidecar.rulefiles import DEFAULT_FILE_LIMITS, JSON_SUFFIXES, FileLimits, SourceFile

__all__ = [
    "Document",
    "parse_file",
    "unservable_number",
    "yaml_text",
]


try:
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment,unused-ignore]
except AttributeError:  # PyYAML built without libyaml
    _Base = yaml.SafeLoader

try:
    _Dumper: type[yaml.SafeDumper] = yaml.CSafeDumper  # type: ignore[assignment,unused-ignore]
except AttributeError:
    _Dumper = yaml.SafeDumper


def yaml_text(documents: Sequence[Any]) -> str:
    """JSON values as YAML documents (`---` between them), keys in their order: what
    `db export` writes and `GET /api/v1/rulesets/{id}` gives as `application/yaml`, and
    what `parse_file` reads back to equal values."""
    return yaml.dump_all(
        documents, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """Safe loading of JSON values only, with timestamps left as strings, as Kubernetes'
    YAML-to-JSON does: a rule's input is JSON, and `2024-03-10T03:12:00Z` must reach CEL
    as a string."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
        """JSON objects: string keys, each once (after `1` became `"1"`)."""
        if not isinstance(node, yaml.MappingNode):
            raise _not_json(node, f"expected a mapping, found {node.id}")
        own = sum(1 for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge")
        self.flatten_mapping(node)  # `<<` merges go first; the mapping's own keys win
        merged = len(node.value) - own
        mapping: dict[str, Any] = {}
        written: set[str] = set()
        for index, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                if not isinstance(key, bool | int | float | None):
                    raise _not_json(key_node, "a mapping key must be a string or a number")
                key = json.dumps(key)
            if index >= merged:
                if key in written:
                    raise _not_json(
                        key_node, f"duplicate key {excerpt(key)}", code=ProblemCode.DUPLICATE_KEY
                    )
                written.add(key)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value: int = super().construct_yaml_int(node)
        except ValueError as exc:  # more digits than Python converts (sys.int_info)
            raise _not_json(node, f"number not readable: {exc}") from None
        if not INT_MIN <= value <= INT_MAX:
            raise _not_json(node, _beyond_64_bits(node.value))
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value: float = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise _not_json(node, f"{excerpt(node.value)} is not a JSON number (not finite)")
        return value

    def construct_not_json(self, node: yaml.Node) -> None:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _not_json(node, f"the tag {tag} is not allowed: rule files hold JSON values")


# Integers JSON answers can carry (orjson's range): one beyond them would validate, go
# live and then make every registry read and `/changes` answer 500.
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1


def _beyond_64_bits(written: str) -> str:
    return (
        f"the integer {excerpt(written, 40)} is beyond 64 bits: numbers in rules must lie"
        f" between {INT_MIN} and {INT_MAX} (write a larger one as a string)"
    )


class _NotJson(yaml.constructor.ConstructorError):
    """A value JSON does not have, or a duplicate key once keys are strings."""

    def __init__(self, node: yaml.Node, problem: str, code: ProblemCode) -> None:
        super().__init__(None, None, problem, node.start_mark)
        self.code = code


def _not_json(
    node: yaml.Node, problem: str, *, code: ProblemCode = ProblemCode.NOT_JSON
) -> _NotJson:
    return _NotJson(node, problem, code)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Base.yaml_implicit_resolvers.items()
}
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
for _tag in ("binary", "set", "omap", "pairs", "timestamp"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _Loader.construct_not_json)


class Document:
    """One parsed document of a file, able to locate any JSON path inside it."""

    __slots__ = ("_node", "data", "file", "index")

    def __init__(self, data: Any, file: str, index: int, node: yaml.Node | None) -> None:
        self.data = data
        self.file = file
        self.index = index
        self._node = node

    def locate(self, path: Sequence[str | int]) -> Location:
        """The deepest node along `path` that exists (its parent if a key is missing)."""
        node = self._node
        if node is None:
            return Location(self.file)
        for step in path:
            child = _child(node, step)
            if child is None:
                break
            node = child
        return Location(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def locate_key(self, path: Sequence[str | int], key: str) -> Location:
        """Where the key `key` of the mapping at `path` is written."""
        node = self.node_at(path)
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                    mark = key_node.start_mark
                    return Location(self.file, mark.line + 1, mark.column + 1)
        return self.locate(path)

    def node_at(self, path: Sequence[str | int]) -> yaml.Node | None:
        node = self._node
        for step in path:
            if node is None:
                return None
            node = _child(node, step)
        return node


def _child(node: yaml.Node, step: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(step):
                return value  # type: ignore[no-any-return]
    elif (
        isinstance(node, yaml.SequenceNode)
        and isinstance(step, int)
        and 0 <= step < len(node.value)
    ):
        return node.value[step]  # type: ignore[no-any-return]
    return None


class _FileProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def parse_file(
    source: SourceFile, limits: FileLimits = DEFAULT_FILE_LIMITS
) -> tuple[list[Document], list[Problem]]:
    """Documents of one file, or the problems that stop it from being read."""
    name = source.name
    if len(source.content) > limits.max_bytes:
        size = len(source.content)
        return [], [
            Problem(
                file=name,
                message=f"file is {size} bytes, the limit is {limits.max_bytes}",
                code=ProblemCode.READ_TOO_LARGE,
            )
        ]
    try:
        text = _decode(source)
        if name.lower().endswith(JSON_SUFFIXES):
            documents = _parse_json(name, text, limits, located=source.located)
        else:
            documents = list(_parse_yaml(name, text, limits))
    except _FileProblem as exc:
        return [], [exc.problem]
    if len(documents) > limits.max_documents:
        message = f"file has more than {limits.max_documents} documents"
        return [], [Problem(file=name, message=message, code=ProblemCode.LIMIT_DOCUMENTS)]
    return documents, []


_OTHER_ENCODINGS: Final = {
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}


def _decode(source: SourceFile) -> str:
    for bom, encoding in _OTHER_ENCODINGS.items():  # UTF-32 LE first: it starts like UTF-16 LE
        if source.content.startswith(bom):
            message = (
                f"the file is {encoding} (it starts with a byte order mark): rule files are UTF-8"
            )
            raise _FileProblem(
                Problem(file=source.name, message=message, code=ProblemCode.ENCODING)
            )
    try:
        return source.content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = source.content[: exc.start]
        line = before.count(b"\n") + 1
        line_start = before[before.rfind(b"\n") + 1 :]
        column = len(line_start.decode("utf-8", errors="replace")) + 1
        raise _FileProblem(
            Problem(
                file=source.name,
                line=line,
                column=column,
                message=f"not valid UTF-8 (byte 0x{source.content[exc.start]:02x})",
                code=ProblemCode.ENCODING,
            )
        ) from None


def _parse_yaml(name: str, text: str, limits: FileLimits) -> Iterator[Document]:
    _check_values(name, text, limits)
    loader = _Loader(text)
    budget = _TextBudget(limits.max_bytes)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            try:
                _check_tree(name, node, limits, budget)
            except _Expanded:
                raise _FileProblem(_expansion_problem(name, text, limits)) from None
            if index >= limits.max_documents:
                raise _FileProblem(
                    Problem(
                        file=name,
                        message=f"file has more than {limits.max_documents} documents",
                        code=ProblemCode.LIMIT_DOCUMENTS,
                    )
                )
            data = loader.construct_document(node)
            if data is not None:
                yield Document(data, name, index, node)
            index += 1
    except yaml.MarkedYAMLError as exc:
        raise _FileProblem(_yaml_problem(name, exc)) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. NUL
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"character U+{exc.character:04X} is not allowed in YAML"
        raise _FileProblem(
            Problem(
                file=name,
                line=line,
                column=column,
                message=message,
                code=ProblemCode.YAML_SYNTAX,
            )
        ) from None
    except yaml.YAMLError as exc:
        message = f"YAML error: {exc}"
        raise _FileProblem(
            Problem(file=name, message=message, code=ProblemCode.YAML_SYNTAX)
        ) from None
    finally:
        loader.dispose()


# Every value but a document's root is preceded by one of these (a flow separator, a
# block entry, a key or value indicator, an opening bracket); one mark can introduce two
# values (`key:` and its null). Counting them bounds the values from above, in C.
_VALUE_MARKS: Final = (",", ":", "-", "[", "{", "?")


def _check_values(name: str, text: str, limits: FileLimits) -> None:
    """Refuse a file of more values than `max_values` before composing any node: counted
    exactly from the parser's events (constant memory) when the text could hold that many."""
    if 2 * sum(text.count(mark) for mark in _VALUE_MARKS) + 2 <= limits.max_values:
        return
    loader = _Loader(text)
    values = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.NodeEvent):
                values += 1
                if values > limits.max_values and event.start_mark is not None:
                    message = f"more than {limits.max_values} values in one file"
                    raise _FileProblem(
                        _marked(name, event.start_mark, (), message, ProblemCode.LIMIT_VALUES)
                    )
    except yaml.YAMLError:
        return  # the parse proper reports it, located
    finally:
        loader.dispose()


def _yaml_problem(name: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    parts = [part for part in (exc.context, exc.problem) if part]
    constructing = isinstance(exc, yaml.constructor.ConstructorError)
    kind = "not a JSON value" if constructing else "YAML syntax error"
    message = f"{kind}: " + ", ".join(parts) if parts else kind
    if isinstance(exc, _NotJson):
        code = exc.code
    else:
        code = ProblemCode.NOT_JSON if constructing else ProblemCode.YAML_SYNTAX
    if mark is None:
        return Problem(file=name, message=message, code=code)
    return _marked(name, mark, (), message, code)


class _Mark(Protocol):
    """A position of PyYAML's Python parser or of its C one (two unrelated classes)."""

    line: int
    column: int


def _marked(
    name: str, mark: _Mark, path: Sequence[str | int], message: str, code: ProblemCode
) -> Problem:
    """A problem at a YAML mark (0-based) given in 1-based line and column."""
    return Problem(
        file=name,
        line=mark.line + 1,
        column=mark.column + 1,
        path=format_path(path),
        message=message,
        code=code,
    )


class _Expanded(Exception):
    """The expanded text went over the budget (located afterwards, from the events)."""


class _TextBudget:
    """Scalar text left for one file, every alias counting its anchor's text again."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise _Expanded


def _check_tree(
    name: str, root: yaml.Node, limits: FileLimits, budget: _TextBudget | None = None
) -> None:
    """Refuse shared collections (alias bombs), duplicate keys, excessive depth and (with
    a budget) more expanded text than the file may hold."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            if budget is not None:
                budget.spend(len(node.value))
            continue
        if id(node) in seen:
            message = "an alias may not point at a mapping or a list (its anchor is here)"
            raise _FileProblem(
                _marked(name, node.start_mark, path, message, ProblemCode.SHARED_ALIAS)
            )
        seen.add(id(node))
        if len(path) >= limits.max_depth:
            message = f"nested deeper than {limits.max_depth} levels"
            raise _FileProblem(
                _marked(name, node.start_mark, path, message, ProblemCode.LIMIT_DEPTH)
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, i)) for i, child in enumerate(node.value))
            continue
        keys: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in keys:
                    message = f"duplicate key {excerpt(key.value)}"
                    raise _FileProblem(
                        _marked(name, key.start_mark, path, message, ProblemCode.DUPLICATE_KEY)
                    )
                keys.add(key.value)
            stack.append((key, path))
            stack.append((value, (*path, key.value if isinstance(key, yaml.ScalarNode) else "?")))


def _expansion_problem(name: str, text: str, limits: FileLimits) -> Problem:
    """Where the expanded text first passes the limit: the alias, read from the events
    (a composed alias is its anchor's node and has lost its own position)."""
    message = (
        f"aliases expand the file past {limits.max_bytes} characters of text"
        " (each alias counts its anchor's text again)"
    )
    sizes: dict[str, int] = {}
    open_anchors: list[tuple[str | None, int]] = []
    total = 0
    loader = _Loader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.ScalarEvent):
                total += len(event.value)
                if event.anchor is not None:
                    sizes[event.anchor] = len(event.value)
            elif isinstance(event, yaml.AliasEvent) and event.anchor is not None:
                total += sizes.get(event.anchor, 0)
                if total > limits.max_bytes and event.start_mark is not None:
                    return _marked(
                        name,
                        event.start_mark,
                        (),
                        f"{message}: *{event.anchor}",
                        ProblemCode.LIMIT_EXPANSION,
                    )
            elif isinstance(event, yaml.CollectionStartEvent):
                open_anchors.append((event.anchor, total))
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, start = open_anchors.pop()
                if anchor is not None:
                    sizes[anchor] = total - start
    finally:
        loader.dispose()
    return Problem(file=name, message=message, code=ProblemCode.LIMIT_EXPANSION)


def _parse_json(name: str, text: str, limits: FileLimits, *, located: bool) -> list[Document]:
    """A JSON file holds one document, or a list of documents."""
    if located:  # its positions come from a composed node tree
        _check_values(name, text, limits)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _FileProblem(
            Problem(
                file=name,
                line=exc.lineno,
                column=exc.colno,
                message=f"JSON syntax error: {exc.msg}",
                code=ProblemCode.JSON_SYNTAX,
            )
        ) from None
    except _DuplicateKey as exc:
        tree = _json_node(text) if located else None
        if tree is not None:
            _check_tree(name, tree, limits)  # raises the duplicate, with its position
        message = f"duplicate key {excerpt(exc.key)}"
        raise _FileProblem(
            Problem(file=name, message=message, code=ProblemCode.DUPLICATE_KEY)
        ) from None
    except RecursionError:
        message = "JSON nested too deeply"
        raise _FileProblem(
            Problem(file=name, message=message, code=ProblemCode.LIMIT_DEPTH)
        ) from None
    except ValueError as exc:  # NaN, Infinity; an integer longer than Python converts
        message = f"not a JSON number: {exc}"
        raise _FileProblem(Problem(file=name, message=message, code=ProblemCode.NOT_JSON)) from None
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(name, data)
    if _LONG_NUMBER.search(text):
        problem = unservable_number(name, data, _json_node(text) if located else None)
        if problem is not None:
            raise _FileProblem(problem)
    if not located:
        _check_depth(name, data, limits)
        documents = data if isinstance(data, list) else [data]
        return [Document(item, name, i, None) for i, item in enumerate(documents)]
    root = _json_node(text)
    if root is not None:
        _check_tree(name, root, limits)
    if isinstance(data, list):
        nodes = root.value if isinstance(root, yaml.SequenceNode) else []
        return [
            Document(item, name, i, nodes[i] if i < len(nodes) else None)
            for i, item in enumerate(data)
        ]
    return [Document(data, name, 0, root)]


# Valid UTF-8 text holds no surrogate; JSON's `\ud800` escape can still make one, which
# no UTF-8 answer, digest or saved copy could then encode.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _check_surrogates(name: str, data: Any) -> None:
    """Refuse a string (or key) holding a lone surrogate, naming its path."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path))
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(value[exc.start])
                message = f"\\u{code:04x} is half of a surrogate pair, not a character"
                raise _FileProblem(
                    Problem(
                        file=name,
                        path=format_path(path),
                        message=message,
                        code=ProblemCode.NOT_JSON,
                    )
                ) from None


# What a number beyond 64 bits or beyond a double's range needs to be written (JSON
# reads `1e400` as infinity); most files have none, and are not walked.
_LONG_NUMBER: Final = re.compile(r"\d{19}|[eE][+-]?\d{3}")


def unservable_number(name: str, data: Any, root: yaml.Node | None = None) -> Problem | None:
    """The first integer beyond 64 bits or number beyond a double's range in `data`, as a
    problem at its path (and, given the document's node tree, its line and column)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((item, (*path, key)) for key, item in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            if not INT_MIN <= value <= INT_MAX:
                return _number_problem(name, path, root, _beyond_64_bits(str(value)))
        elif isinstance(value, float) and not math.isfinite(value):
            message = "a number beyond a double's range (not finite)"
            return _number_problem(name, path, root, message)
    return None


def _number_problem(
    name: str, path: tuple[str | int, ...], root: yaml.Node | None, message: str
) -> Problem:
    at = Document(None, name, 0, root).locate(path)
    return Problem(
        file=name,
        line=at.line,
        column=at.column,
        path=format_path(path),
        message=message,
        code=ProblemCode.NOT_JSON,
    )


def _check_depth(name: str, data: Any, limits: FileLimits) -> None:
    """The depth limit, for data whose text is not located."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth >= limits.max_depth:
            raise _FileProblem(
                Problem(
                    file=name,
                    message=f"nested deeper than {limits.max_depth} levels",
                    code=ProblemCode.LIMIT_DEPTH,
                )
            )
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _json_node(text: str) -> yaml.Node | None:
    """JSON's flow syntax is YAML too: compose it only to learn positions."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> float:
    """`json` reads NaN and Infinity, which JSON itself does not have."""
    raise ValueError(f"{name} is not a number in JSON")
