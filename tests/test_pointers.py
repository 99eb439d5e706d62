"""JSON Pointers (RFC 6901) and the copy-on-write edits the decision log masks with."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidecar.api.decisionlog import DecisionIds
from sidecar.pointers import edited, parse_pointer, removal_order


class TestParse:
    @pytest.mark.parametrize(
        ("text", "tokens"),
        [
            ("/a", ("a",)),
            ("/a/b/0", ("a", "b", "0")),
            ("/a~1b", ("a/b",)),
            ("/m~0n", ("m~n",)),
            ("/~01", ("~1",)),  # RFC 6901 section 4: ~1 first, then ~0
            ("/", ("",)),
            ("/a//b", ("a", "", "b")),
        ],
    )
    def test_tokens(self, text: str, tokens: tuple[str, ...]):
        assert parse_pointer(text) == tokens

    @pytest.mark.parametrize("text", ["", "a/b", "/a~2", "/a~", "/~x"])
    def test_refused(self, text: str):
        with pytest.raises(ValueError, match=r"pointer|RFC 6901"):
            parse_pointer(text)


DOCUMENT: dict[str, Any] = {
    "customer": {"email": "a@example.com", "tags": ["x", {"secret": 1}]},
    "a/b": 1,
    "": {"empty": True},
    "n": None,
}


class TestEdited:
    def test_remove_and_replace_leave_the_original_whole(self):
        original = copy.deepcopy(DOCUMENT)
        removed, found = edited(DOCUMENT, parse_pointer("/customer/tags/1/secret"), None)
        assert found
        assert removed["customer"]["tags"] == ["x", {}]
        replaced, _ = edited(DOCUMENT, parse_pointer("/customer/email"), len)
        assert replaced["customer"]["email"] == 13
        assert original == DOCUMENT
        assert replaced["customer"]["tags"] is DOCUMENT["customer"]["tags"]  # shared

    @pytest.mark.parametrize(
        ("pointer", "expected"),
        [
            ("/a~1b", {"customer", "", "n"}),
            ("/", {"customer", "a/b", "n"}),
            ("/n", {"customer", "a/b", ""}),
        ],
    )
    def test_keys(self, pointer: str, expected: set[str]):
        result, found = edited(DOCUMENT, parse_pointer(pointer), None)
        assert found
        assert set(result) == expected

    @pytest.mark.parametrize(
        "pointer",
        [
            "/missing",
            "/customer/tags/2",
            "/customer/tags/01",
            "/customer/tags/-",
            "/customer/tags/+1",
            "/customer/email/x",
            "/n/x",
            "/a~1b/c",
        ],
    )
    def test_a_pointer_that_names_nothing_changes_nothing(self, pointer: str):
        result, found = edited(DOCUMENT, parse_pointer(pointer), None)
        assert not found
        assert result is DOCUMENT

    def test_not_a_container(self):
        assert edited([1, 2], parse_pointer("/0"), None) == ([2], True)
        assert edited("text", parse_pointer("/0"), None) == ("text", False)


def test_decision_ids_are_uuid7_and_increase():
    ids = DecisionIds()
    made = [ids() for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert all(value[14] == "7" and value[19] in "89ab" for value in made)


def test_removal_order_keeps_every_pointer_on_its_value():
    """Within one array the higher index first, and a place inside an item before the
    item: removing them in this order removes what each named in the original."""
    pointers = [parse_pointer(p) for p in ("/a/1", "/a/1/x", "/a/10", "/a/2", "/b", "/a/0")]
    ordered = removal_order(pointers)
    assert ["/" + "/".join(p) for p in ordered] == ["/a/10", "/a/2", "/a/1/x", "/a/1", "/a/0", "/b"]
    document: object = {"a": [{"x": i, "y": i} for i in range(11)], "b": 1}
    for pointer in ordered:
        document, found = edited(document, pointer, None)
        assert found
    assert document == {"a": [{"x": i, "y": i} for i in (3, 4, 5, 6, 7, 8, 9)]}
