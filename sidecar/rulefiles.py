"""What a source hands the loader: rule files as bytes with a name, and the limits
every reader of one file enforces.

Sources depend on this module only, not on the parser: a source reads bytes and names
them; what the bytes mean is the loader's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_FILE_LIMITS",
    "JSON_SUFFIXES",
    "RULE_FILE_SUFFIXES",
    "YAML_SUFFIXES",
    "FileLimits",
    "SourceFile",
]

YAML_SUFFIXES: Final = (".yaml", ".yml")
JSON_SUFFIXES: Final = (".json",)
# The names a directory source reads as rule files (any case).
RULE_FILE_SUFFIXES: Final = YAML_SUFFIXES + JSON_SUFFIXES


@dataclass(frozen=True, slots=True, kw_only=True)
class FileLimits:
    """Per file. `max_bytes` bounds the text too once aliases are expanded: a file may
    not hold, through aliases, more scalar text than it could hold written out."""

    max_bytes: int = 4 * 1024 * 1024
    max_documents: int = 1_000
    max_depth: int = 64
    # Values (scalars, aliases, lists, mappings) of one file: a composed node costs about
    # 500 bytes, so 4 MiB of `[1,1,1,...]` would be a gigabyte before any check. Rule
    # files average 25-40 bytes a value: 400,000 is about what 4 MiB of rules holds.
    max_values: int = 400_000

    def share(self, parts: int) -> FileLimits:
        """The limits of each of `parts` files that together may cost what one file may
        (the documents of one validate request): every bound that adds up across files
        divided among them; the depth, a bound of one document, kept."""
        if parts <= 1:
            return self
        return FileLimits(
            max_bytes=max(1, self.max_bytes // parts),
            max_documents=max(1, self.max_documents // parts),
            max_depth=self.max_depth,
            max_values=max(1, self.max_values // parts),
        )


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
