"""Read rule files into documents that remember where each value was written.

YAML goes through PyYAML's C parser to a node tree; the tree is checked (no mapping or
list reachable twice, so an alias bomb cannot explode later; no duplicate keys; bounded
depth) and kept so that an error found later, by the schema or the CEL compiler, can be
pointed at its file, line and column. JSON is parsed by `json` (YAML 1.1 would read
`1e3` as a string) and located through the same node tree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import yaml

from sidecar.errors import Problem, format_path
from sidecar.model import Location

__all__ = [
    "DEFAULT_FILE_LIMITS",
    "Document",
    "FileLimits",
    "SourceFile",
    "parse_file",
]

_YAML_SUFFIXES: Final = (".yaml", ".yml")
_JSON_SUFFIXES: Final = (".json",)
RULE_FILE_SUFFIXES: Final = _YAML_SUFFIXES + _JSON_SUFFIXES

try:
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment,unused-ignore]
except AttributeError:  # PyYAML built without libyaml
    _Base = yaml.SafeLoader


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """Safe loading, with timestamps left as strings, as Kubernetes' YAML-to-JSON does:
    a rule's input is JSON, and `2024-03-10T03:12:00Z` must reach CEL as a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Base.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FileLimits:
    max_bytes: int = 4 * 1024 * 1024
    max_documents: int = 1_000
    max_depth: int = 64


DEFAULT_FILE_LIMITS: Final = FileLimits()


@dataclass(frozen=True, slots=True)
class SourceFile:
    """What every source hands the loader: a name for messages and the raw bytes.

    `located` False says the content was generated (a database row rendered as JSON):
    line and column would mean nothing to anyone, so they are not worked out, and
    problems are located by JSON path, ruleset and rule id instead.
    """

    name: str
    content: bytes
    located: bool = True


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
            Problem(file=name, message=f"file is {size} bytes, the limit is {limits.max_bytes}")
        ]
    try:
        text = _decode(source)
        if name.lower().endswith(_JSON_SUFFIXES):
            documents = _parse_json(name, text, limits, located=source.located)
        else:
            documents = list(_parse_yaml(name, text, limits))
    except _FileProblem as exc:
        return [], [exc.problem]
    if len(documents) > limits.max_documents:
        message = f"file has more than {limits.max_documents} documents"
        return [], [Problem(file=name, message=message)]
    return documents, []


def _decode(source: SourceFile) -> str:
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
            )
        ) from None


def _parse_yaml(name: str, text: str, limits: FileLimits) -> Iterator[Document]:
    loader = _Loader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_tree(name, node, limits)
            if index >= limits.max_documents:
                raise _FileProblem(
                    Problem(
                        file=name, message=f"file has more than {limits.max_documents} documents"
                    )
                )
            data = loader.construct_document(node)
            if data is not None:
                yield Document(data, name, index, node)
            index += 1
    except yaml.MarkedYAMLError as exc:
        raise _FileProblem(_yaml_problem(name, exc)) from None
    except yaml.YAMLError as exc:
        raise _FileProblem(Problem(file=name, message=f"YAML error: {exc}")) from None
    finally:
        loader.dispose()


def _yaml_problem(name: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    parts = [part for part in (exc.context, exc.problem) if part]
    message = "YAML syntax error: " + ", ".join(parts) if parts else "YAML syntax error"
    if mark is None:
        return Problem(file=name, message=message)
    return _marked(name, mark, (), message)


def _marked(name: str, mark: yaml.Mark, path: Sequence[str | int], message: str) -> Problem:
    """A problem at a YAML mark (0-based) given in 1-based line and column."""
    return Problem(
        file=name,
        line=mark.line + 1,
        column=mark.column + 1,
        path=format_path(path),
        message=message,
    )


def _check_tree(name: str, root: yaml.Node, limits: FileLimits) -> None:
    """Refuse shared collections (alias bombs), duplicate keys and excessive depth."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            continue
        if id(node) in seen:
            message = "an alias may not point at a mapping or a list (its anchor is here)"
            raise _FileProblem(_marked(name, node.start_mark, path, message))
        seen.add(id(node))
        if len(path) >= limits.max_depth:
            message = f"nested deeper than {limits.max_depth} levels"
            raise _FileProblem(_marked(name, node.start_mark, path, message))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*path, i)) for i, child in enumerate(node.value))
            continue
        keys: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in keys:
                    message = f"duplicate key {key.value!r}"
                    raise _FileProblem(_marked(name, key.start_mark, path, message))
                keys.add(key.value)
            stack.append((key, path))
            stack.append((value, (*path, key.value if isinstance(key, yaml.ScalarNode) else "?")))


def _parse_json(name: str, text: str, limits: FileLimits, *, located: bool) -> list[Document]:
    """A JSON file holds one document, or a list of documents."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise _FileProblem(
            Problem(
                file=name,
                line=exc.lineno,
                column=exc.colno,
                message=f"JSON syntax error: {exc.msg}",
            )
        ) from None
    except _DuplicateKey as exc:
        tree = _json_node(text) if located else None
        if tree is not None:
            _check_tree(name, tree, limits)  # raises the duplicate, with its position
        raise _FileProblem(Problem(file=name, message=f"duplicate key {exc.key!r}")) from None
    except RecursionError:
        raise _FileProblem(Problem(file=name, message="JSON nested too deeply")) from None
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


def _check_depth(name: str, data: Any, limits: FileLimits) -> None:
    """The depth limit, for data whose text is not located."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth >= limits.max_depth:
            raise _FileProblem(
                Problem(file=name, message=f"nested deeper than {limits.max_depth} levels")
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
