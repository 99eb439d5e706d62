"""Rules that build on other rules: which rules a condition reads, and in what order a
ruleset's conditions can then be evaluated.

A condition reads another rule's outcome through the `rules` map: `rules["velocity-high"]`
(or `rules.velocity_high`, CEL's selection on a map) is true when that rule matched.
Only a constant rule id may be read. A dynamic key (`rules[input.name]`), iterating,
sizing or testing membership of `rules`, or any other use would make the rules a
condition depends on known only at evaluation: then they could be neither ordered before
it nor checked at load (unknown, disabled, shadow, cycles), so such a use is refused.

The references are taken from the expression tree cel-cpp checked (`sidecar.celwire`),
so a string that merely spells `rules["x"]` is never mistaken for one. The graph of one
ruleset is checked here without knowing what a rule is beyond its id, whether it is
enabled and whether it is a shadow rule; the layers (`layers`) are what evaluation
follows: every rule comes after the rules it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from sidecar.celwire import CheckedExpression, Node

__all__ = [
    "MAX_LAYERS",
    "RULES",
    "DependencyIssue",
    "Dependent",
    "DynamicReference",
    "Reference",
    "layers",
    "references",
    "resolve",
]

RULES: Final = "rules"
# How many rules may chain, each reading the next (a rule without dependencies is the
# first): real chains are a handful; one program nests at most 32 levels in cel-cpp.
MAX_LAYERS: Final = 32
"""The CEL variable holding the outcomes of the rules a condition depends on."""

_WHY: Final = (
    "dependencies must be static so that they can be ordered and checked at load; "
    'read another rule\'s outcome as rules["rule-id"]'
)


class Reference(NamedTuple):
    """A rule id a condition reads, and where (a code-point offset in the condition)."""

    rule_id: str
    offset: int


class DynamicReference(Exception):
    """A use of `rules` other than reading a constant rule id; `offset` is where."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


def references(checked: CheckedExpression, text: str) -> tuple[Reference, ...]:
    """The rule ids the expression (`text`, checked) reads, each once, in the order
    written; raises `DynamicReference` at the first use of `rules` that is not such a
    read."""
    found: dict[str, Reference] = {}
    offsets: dict[int, int] | None = None

    def offset(node: Node) -> int:
        nonlocal offsets
        if offsets is None:
            offsets = checked.offsets()
        return offsets.get(node.id, 0)

    stack = [checked.root]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        # The checker names `.rules` `rules`: only the text tells the leading dot.
        # Inside a comprehension whose variable is `rules`, it names `.rules` as written.
        if node.kind == "ident" and (
            node.name == f".{RULES}"
            or (node.name == RULES and text[: offset(node)].rstrip()[-1:] == ".")
        ):
            message = (
                "`.rules` (the map read past a comprehension variable named `rules`) cannot "
                "be bound to a rule's dependencies: name that variable otherwise and read "
                'rules["rule-id"]'
            )
            raise DynamicReference(message, offset(node))

    def visit(node: Node, shadowed: bool) -> None:
        if node.kind == "comprehension":
            inner = shadowed or RULES in node.iter_vars or node.accu_var == RULES
            for index, child in enumerate(node.children):
                visit(child, shadowed if index == 0 else inner)
            return
        if node.kind == "call" and node.name == "_[_]" and _is_rules(node.children[0], shadowed):
            key, at = node.children[1], offset(node.children[0])
            if key.kind != "const" or key.literal != "string":
                raise DynamicReference(f"rules[...] needs a constant rule id: {_WHY}", at)
            found.setdefault(str(key.value), Reference(str(key.value), at))
            return
        if node.kind == "select" and _is_rules(node.children[0], shadowed):
            if node.test_only:
                message = f"has(rules.{node.name}) tests the map: {_WHY}"
                raise DynamicReference(message, offset(node.children[0]))
            found.setdefault(node.name, Reference(node.name, offset(node.children[0])))
            return
        if _is_rules(node, shadowed):
            raise DynamicReference(f"`rules` is read as a whole here: {_WHY}", offset(node))
        for child in node.children:
            visit(child, shadowed)

    visit(checked.root, False)
    return tuple(found.values())


def _is_rules(node: Node, shadowed: bool) -> bool:
    """Whether the node is the `rules` variable, not hidden by a comprehension variable.

    Root-scoped `.rules` is refused (`references`): a ruleset's programs bind each layer's
    outcomes to `rules` with a comprehension variable of that name (`sidecar.conditions`),
    which the root-scoped name would see past."""
    return node.kind == "ident" and node.name == RULES and not shadowed


class Dependent(NamedTuple):
    """What the dependency check knows of a rule."""

    id: str
    references: tuple[Reference, ...]
    enabled: bool = True
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class DependencyIssue:
    """A reference refused: the rule (`index` into the rules given) and where in its
    condition."""

    index: int
    offset: int
    message: str


def resolve(
    ruleset_id: str, rules: Sequence[Dependent]
) -> tuple[tuple[tuple[int, ...], ...], list[DependencyIssue]]:
    """Each rule's direct dependencies (indexes into `rules`) and the references refused.

    A reference must name another rule of the same ruleset. An enabled rule may read
    only enabled rules (a disabled one is never evaluated, so it has no outcome), and an
    active rule only active ones: a shadow rule is on trial and must not change what
    counts, even through another rule; a shadow rule may read shadow rules (a new signal
    and the rules that combine it can be tried together). A disabled rule's references
    are checked for existence only, as its condition is compiled: enabling it later
    never surprises with an unknown id. The enabled rules must not form a cycle.
    """
    positions = {rule.id: index for index, rule in reversed(list(enumerate(rules)))}
    issues: list[DependencyIssue] = []
    direct: list[tuple[int, ...]] = []
    for index, rule in enumerate(rules):
        targets: list[int] = []
        for reference in rule.references:
            target = positions.get(reference.rule_id)
            message = _refusal(
                ruleset_id, rule, reference, None if target is None else rules[target]
            )
            if message is not None:
                issues.append(DependencyIssue(index, reference.offset, message))
            elif target is not None and rule.enabled:
                targets.append(target)
        direct.append(tuple(targets))
    cycles = _cycles(rules, direct)
    issues.extend(cycles or _too_deep(rules, direct))
    return tuple(direct), issues


def _too_deep(
    rules: Sequence[Dependent], direct: Sequence[tuple[int, ...]]
) -> list[DependencyIssue]:
    """The references that make a chain longer than `MAX_LAYERS`, at the first rule past
    it. Each layer is one more level of the program that evaluates the set (and one more
    program past cel-cpp's nesting limit), so a chain of thousands cost seconds and
    hundreds of MB the first time it ran."""
    layer = layers(direct)
    issues: list[DependencyIssue] = []
    for index, rule in enumerate(rules):
        if layer[index] != MAX_LAYERS:
            continue
        deepest = next(t for t in direct[index] if layer[t] == MAX_LAYERS - 1)
        at = next(r.offset for r in rule.references if r.rule_id == rules[deepest].id)
        message = (
            f'rules["{rules[deepest].id}"] makes a chain of {MAX_LAYERS + 1} rules, each'
            f" reading the next; rules chain at most {MAX_LAYERS} deep: read a rule"
            " earlier in the chain, or combine conditions into one rule"
        )
        issues.append(DependencyIssue(index, at, message))
    return issues


def _refusal(
    ruleset_id: str, rule: Dependent, reference: Reference, target: Dependent | None
) -> str | None:
    name = f'rules["{reference.rule_id}"]'
    if target is None:
        return (
            f"{name}: ruleset {ruleset_id!r} has no rule {reference.rule_id!r} "
            "(a condition reads only rules of its own ruleset)"
        )
    if target.id == rule.id:
        return f"{name}: a rule cannot read its own outcome"
    if not rule.enabled:
        return None
    if not target.enabled:
        return f"{name}: rule {target.id!r} is disabled, so it has no outcome to read"
    if target.shadow and not rule.shadow:
        return (
            f"{name}: rule {target.id!r} is a shadow rule; an active rule cannot depend on "
            "a rule on trial (make this rule a shadow rule too, or promote that one)"
        )
    return None


def _cycles(rules: Sequence[Dependent], direct: Sequence[tuple[int, ...]]) -> list[DependencyIssue]:
    """One issue per cycle among the dependencies, at the reference that closes it in
    the rule met first, naming its path (`a -> b -> a`). Iterative: a chain of thousands
    of rules must not exhaust the interpreter's stack."""
    issues: list[DependencyIssue] = []
    state = [0] * len(rules)  # 0 unvisited, 1 on the current path, 2 done
    for start in range(len(rules)):
        if state[start]:
            continue
        path = [start]
        pending = [iter(direct[start])]
        state[start] = 1
        while pending:
            following = next(pending[-1], None)
            if following is None:
                state[path.pop()] = 2
                pending.pop()
                continue
            if state[following] == 0:
                state[following] = 1
                path.append(following)
                pending.append(iter(direct[following]))
            elif state[following] == 1:
                cycle = [*path[path.index(following) :], following]
                names = " -> ".join(rules[i].id for i in cycle)
                closing = rules[path[-1]]
                offset = next(
                    r.offset for r in closing.references if r.rule_id == rules[following].id
                )
                issues.append(
                    DependencyIssue(
                        path[-1],
                        offset,
                        f'rules["{rules[following].id}"]: a cycle of dependencies, {names}: '
                        "no rule of a cycle can be evaluated before the others",
                    )
                )
    return issues


def layers(direct: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Each node's layer: 0 without dependencies, else one more than its deepest
    dependency's. The graph must be acyclic (`resolve` reported no cycle)."""
    layer: list[int | None] = [None] * len(direct)
    for start in range(len(direct)):
        stack = [start]
        while stack:
            node = stack[-1]
            if layer[node] is not None:
                stack.pop()
                continue
            waiting = [d for d in direct[node] if layer[d] is None]
            if waiting:
                stack.extend(waiting)
                continue
            layer[node] = 1 + max((layer[d] or 0 for d in direct[node]), default=-1)
            stack.pop()
    return tuple(value or 0 for value in layer)
