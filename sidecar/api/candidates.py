"""A candidate to validate: the rule documents of a request body, as rule files.

`POST .../validate` takes the text of one rule file (`application/yaml`: documents
separated by `---`) or `{"documents": [...]}` (`application/json`), each element a
ruleset document or the YAML or JSON text of one. Each becomes a `SourceFile` that the
loader reads as it reads a source's, under a stable name, so that every problem is
located in what was sent: `request.yaml` for a YAML body; `request#N.json` for the N-th
element (from 1) given as an object, or as a string holding JSON; `request#N.yaml` for a
string holding YAML. An object element is its own text in the body, so its lines and
columns count from its opening brace; a string element is the text it holds.

The candidate as a whole is bounded as one rule file is (`FileLimits`): a JSON body of
more than `max_documents` elements, or of more than `max_bytes` of documents, is a
`limit.documents` or `read.too_large` problem of `request`, and nothing is compiled; the
N elements are then read each within an N-th of one file's limits (`FileLimits.share`:
documents, bytes, text through aliases, values), so that together they cost at most
what one file may. A YAML body is one file: the loader applies the same limits to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from sidecar.errors import InputError, Problem, ProblemCode
from sidecar.jsoncodec import loads
from sidecar.rulefiles import FileLimits, SourceFile

__all__ = ["BODY", "YAML_TYPES", "Candidate", "json_candidate", "yaml_candidate"]

BODY: Final = "request"
"""The name of the body as a whole, in the problems that concern all of it."""

YAML_TYPES: Final = frozenset(
    {"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"}
)
"""The content types read as YAML (`application/yaml` is RFC 9512's; the others are
what tools sent before it)."""

_JSON_TYPES: Final = {bool: "a boolean", int: "a number", float: "a number", list: "a list"}
_SPACE: Final = re.compile(r"[ \t\n\r]*")
_DECODER: Final = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Candidate:
    """The submitted documents as rule files, or the problems that keep them from being
    checked at all (then `files` is empty)."""

    files: tuple[SourceFile, ...]
    problems: tuple[Problem, ...] = ()
    # Each file's limits, when they are a share of one file's (see `FileLimits.share`);
    # None: the loader's own (a YAML body is one file).
    limits: FileLimits | None = None


def yaml_candidate(body: bytes) -> Candidate:
    """A YAML body: one rule file."""
    return Candidate((SourceFile(f"{BODY}.yaml", body),))


def json_candidate(body: bytes, limits: FileLimits) -> Candidate | None:
    """A JSON body's documents; None when it has no `documents` (an empty object is what
    a client of the validation of the sources sends). `InputError` (400) when the body
    is not a JSON object, or `documents` not a non-empty list of objects and strings."""
    try:
        data = loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: json nests too deep
        raise InputError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object")
    if "documents" not in data:
        return None
    if not isinstance(data["documents"], list) or not data["documents"]:
        raise InputError('"documents" must be a non-empty list', path="$.documents")
    try:
        elements = _elements(body.decode("utf-8"))
    except RecursionError:  # deeper than `json` goes (orjson went deeper)
        raise InputError("a document is nested too deeply", path="$.documents") from None
    if len(elements) > limits.max_documents:
        message = (
            f'"documents" holds {len(elements)} documents; a candidate, like a rule file, '
            f"holds at most {limits.max_documents}"
        )
        return _refused(message, ProblemCode.LIMIT_DOCUMENTS)
    files = tuple(_file(index, *element) for index, element in enumerate(elements, 1))
    size = sum(len(file.content) for file in files)
    if size > limits.max_bytes:
        message = (
            f"the documents are {size} bytes; a candidate, like a rule file, holds at "
            f"most {limits.max_bytes}"
        )
        return _refused(message, ProblemCode.READ_TOO_LARGE)
    return Candidate(files, limits=limits.share(len(files)))


def _refused(message: str, code: ProblemCode) -> Candidate:
    return Candidate((), (Problem(file=BODY, path="$.documents", message=message, code=code),))


def _file(number: int, value: Any, text: str) -> SourceFile:
    """One element as a rule file: an object as the text it is written as, a string as
    the text it holds (JSON when it opens like a JSON document, else YAML)."""
    if isinstance(value, dict):
        return SourceFile(f"{BODY}#{number}.json", text.encode("utf-8"))
    if not isinstance(value, str):
        raise InputError(
            "each document must be a ruleset document (an object) or its YAML or JSON "
            f"text (a string), not {_JSON_TYPES.get(type(value), 'null')}",
            path=f"$.documents[{number - 1}]",
        )
    opening = value.lstrip(" \t\r\n\ufeff")[:1]
    suffix = "json" if opening in ("{", "[") else "yaml"
    # A lone surrogate (`"\ud800"`) stays in the bytes, where the loader locates it.
    return SourceFile(f"{BODY}#{number}.{suffix}", value.encode("utf-8", "surrogatepass"))


def _elements(text: str) -> list[tuple[Any, str]]:
    """Each element of the top-level `documents` list (the last one, if the key is
    written twice, as the parser took it) with the text it is written as. `text` is
    known to be a JSON object that has one."""
    found: list[tuple[Any, str]] = []
    at = _skip(text, _skip(text, 0) + 1)  # past the opening brace
    while text[at] != "}":
        key, at = _DECODER.raw_decode(text, at)
        at = _skip(text, _skip(text, at) + 1)  # past the colon
        if key == "documents":
            found, at = _array(text, at)
        else:
            _, at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if text[at] == ",":
            at = _skip(text, at + 1)
    return found


def _array(text: str, at: int) -> tuple[list[tuple[Any, str]], int]:
    """The elements of the list that opens at `at`, and where the list ends."""
    items: list[tuple[Any, str]] = []
    at = _skip(text, at + 1)
    while text[at] != "]":
        start = at
        value, at = _DECODER.raw_decode(text, at)
        items.append((value, text[start:at]))
        at = _skip(text, at)
        if text[at] == ",":
            at = _skip(text, at + 1)
    return items, at + 1


def _skip(text: str, at: int) -> int:
    """The first position at or after `at` that is not JSON whitespace."""
    match = _SPACE.match(text, at)
    return match.end() if match else at
