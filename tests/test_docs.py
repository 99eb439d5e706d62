"""SECURITY.md and RELIABILITY.md name the test behind every claim: each name must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# `tests/test_x.py`, `tests/test_x.py::Class`, `tests/test_x.py::Class::test_y`, and
# `::test_z` / `::Class` for another name in the file (and class) named just before.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py(?:::\w+)*|::\w+(?:::\w+)*)`")


def references(document: str) -> list[tuple[str, str, str | None]]:
    """(file, class or "", test or None) for each test reference in a document."""
    found: list[tuple[str, str, str | None]] = []
    file, cls = "", ""
    for match in REFERENCE.finditer((REPO / document).read_text("utf-8")):
        text = match.group(1)
        if text.startswith("tests/"):
            file, _, rest = text.partition("::")
            cls = ""
        else:
            rest = text[2:]
        names = [name for name in rest.split("::") if name]
        if names and not names[0].startswith("test_"):
            cls = names.pop(0)
        found.append((file, cls, names[0] if names else None))
    return found


@pytest.mark.parametrize("document", ["SECURITY.md", "RELIABILITY.md"])
def test_every_named_test_exists(document: str) -> None:
    """Each file, class and test function a document names is in the test suite."""
    named = references(document)
    assert len(named) >= 10
    for file, cls, test in named:
        source = (REPO / file).read_text("utf-8")
        if cls:
            start = re.search(rf"^class {cls}\b", source, re.M)
            assert start, f"{document}: {file}::{cls}"
            following = re.search(r"^(class|def) ", source[start.end() :], re.M)
            source = source[
                start.start() : start.end() + (following.start() if following else len(source))
            ]
        if test:
            assert re.search(rf"def {test}\(", source), f"{document}: {file}::{cls}::{test}"
