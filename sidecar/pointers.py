"""JSON Pointers (RFC 6901) and copy-on-write edits of a JSON document at them.

The decision log removes or replaces fields of an input before it writes the input down,
and the engine may still be reading that very input: an edit here never changes the
document it is given. It copies only the containers on the path to what it changes and
shares everything else, so masking one field of a large input costs a few shallow copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Pointer", "edited", "parse_pointer", "removal_order"]

Pointer = tuple[str, ...]
"""A pointer's reference tokens, unescaped: `/a~1b/0` is `("a/b", "0")`."""


def parse_pointer(text: str) -> Pointer:
    """The tokens of `text`; ValueError when it is not a pointer to a member.

    The empty pointer (the whole document) is refused: there is nothing to remove it from.
    """
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not a JSON pointer: it must start with '/'")
    tokens = text[1:].split("/")
    for token in tokens:
        rest = token.replace("~0", "").replace("~1", "")
        if "~" in rest:
            raise ValueError(f"{text!r}: '~' must be followed by 0 or 1 (RFC 6901)")
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in tokens)


def removal_order(pointers: Iterable[Pointer]) -> tuple[Pointer, ...]:
    """The order in which removing each pointer's value leaves the others naming what
    they named before: removing an array item moves the items after it, so within one
    array the higher index goes first, and a place inside an item before the item."""

    def key(pointer: Pointer) -> tuple[tuple[int, int, str], ...]:
        steps = tuple(
            (0, -int(t), "") if t.isascii() and t.isdigit() else (1, 0, t) for t in pointer
        )
        return (*steps, (2, 0, ""))  # a pointer's end sorts after anything inside it

    return tuple(sorted(pointers, key=key))


_ABSENT: Any = object()


def _key(container: Any, token: str) -> Any:
    """The member `token` names in `container`: a key, an index as RFC 6901 writes it (no
    sign, no leading zero) within the array, or `_ABSENT`."""
    if isinstance(container, dict):
        return token if token in container else _ABSENT
    if not isinstance(container, list):
        return _ABSENT
    if not token.isascii() or not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        return _ABSENT
    index = int(token)
    return index if index < len(container) else _ABSENT


def edited(
    document: Any, pointer: Sequence[str], change: Callable[[Any], Any] | None
) -> tuple[Any, bool]:
    """`document` with the value at `pointer` removed (`change` None) or replaced by
    `change(value)`: (the new document, whether the pointer named a value). A pointer that
    names nothing leaves the document as it is (the same object)."""
    key = _key(document, pointer[0]) if pointer else _ABSENT
    if key is _ABSENT:
        return document, False
    inner: Any = None
    if len(pointer) > 1:
        inner, found = edited(document[key], pointer[1:], change)
        if not found:
            return document, False
    elif change is not None:
        inner = change(document[key])
    copy = document.copy()
    if len(pointer) == 1 and change is None:
        del copy[key]
    else:
        copy[key] = inner
    return copy, True
