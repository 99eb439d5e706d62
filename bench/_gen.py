"""Deterministic generator of realistic rule files and inputs for the benchmarks.

Not a benchmark itself: `load.py` and `evaluate.py` import it.

`generate_files(total_rules, rules_per_file=100, seed=0)` returns `SourceFile`s holding
YAML text, one `RuleSet` per file, with ruleset and rule ids unique across files. The
conditions are drawn from ~25 fraud-scoring templates over one common input shape
(see `sample_input`): numeric comparisons, `in` lists, `has(...) &&` guards, `.exists(...)`
over the `tags` list, `startsWith`/`endsWith`, field-to-field comparisons. Some rules
carry negative points (trust signals), some a priority, tags or metadata; every ruleset
has two decision bands (scaled to the rule count) and a default decision. No embedded
tests unless `tests=True`, which adds 3 per file whose expectations are computed by
Python twins of the templates (so a load with tests also cross-checks the generator
against the CEL engine).

Every field a condition reads without a `has()` guard is always present in
`sample_input(i)`, so generated conditions evaluate without errors.

Quick self-check (loads 1,000 rules with embedded tests, which must pass):

    /work/venv/bin/python -m bench._gen
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sidecar.rulefiles import SourceFile

__all__ = [
    "DEFAULT_DECISION",
    "GeneratedRule",
    "decision_bands",
    "expected",
    "generate_file",
    "generate_files",
    "generate_rules",
    "render_file",
    "ruleset_id",
    "sample_input",
]

COUNTRIES = ["US", "CA", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "MX", "NG", "IN", "RU", "CN"]
CURRENCIES = ["USD", "EUR", "GBP", "BRL", "NGN", "INR", "JPY"]
CHANNELS = ["web", "app", "pos", "api"]
SEGMENTS = ["retail", "smb", "enterprise", "vip"]
MCCS = ["5411", "5812", "5999", "5967", "7995", "4829", "6051", "5993", "5732", "4121"]
OSES = ["android", "ios", "windows", "macos", "linux"]
DOMAINS = ["example.com", "mail.test", "corp.example", "tempmail.test", "inbox.test"]
TAGS = [
    "new_device",
    "promo",
    "gift_card",
    "crypto",
    "vip_customer",
    "vip_merchant",
    "recurring",
    "first_purchase",
    "high_velocity",
    "risk_manual_review",
    "risk_watchlist",
    "loyalty",
]
IP_PREFIXES = ["10.", "192.168.", "172.16.", "100.64."]
TEAMS = ["risk", "payments", "trust-safety", "compliance"]

DEFAULT_DECISION = "allow"

Doc = dict[str, Any]
Predicate = Callable[[Doc], bool]


@dataclass(frozen=True, slots=True)
class GeneratedRule:
    """One rule as written to the file, plus the Python twin of its condition."""

    id: str
    name: str
    description: str
    condition: str
    points: int
    priority: int
    tags: tuple[str, ...]
    metadata: dict[str, str]
    check: Predicate


def _cel_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


# Each template returns (name stem, CEL condition, python twin, points sign).
Template = Callable[[random.Random], tuple[str, str, Predicate, int]]


def _amount_gt(r: random.Random) -> tuple[str, str, Predicate, int]:
    a = r.randrange(500, 20_000, 50)
    literal = f"{a}" if r.random() < 0.5 else f"{a}.0"
    return "large_amount", f"input.amount > {literal}", lambda d: d["amount"] > a, 1


def _amount_band(r: random.Random) -> tuple[str, str, Predicate, int]:
    lo = r.randrange(100, 1_000, 10)
    hi = lo + r.choice([50, 100, 500])
    cel = f"input.amount >= {lo}.0 && input.amount < {hi}.0"
    return "structuring_band", cel, lambda d: lo <= d["amount"] < hi, 1


def _country_in(r: random.Random) -> tuple[str, str, Predicate, int]:
    countries = r.sample(COUNTRIES, r.randint(2, 5))
    cel = f"input.country in {_cel_list(countries)}"
    return "high_risk_country", cel, lambda d: d["country"] in countries, 1


def _country_mismatch(r: random.Random) -> tuple[str, str, Predicate, int]:
    a = r.randrange(0, 500, 25)
    cel = f"input.country != input.ip_country && input.amount > {a}"
    return (
        "ip_country_mismatch",
        cel,
        lambda d: d["country"] != d["ip_country"] and d["amount"] > a,
        1,
    )


def _currency_amount(r: random.Random) -> tuple[str, str, Predicate, int]:
    c = r.choice(CURRENCIES)
    a = r.randrange(300, 10_000, 100)
    cel = f'input.currency == "{c}" && input.amount > {a}'
    return "currency_amount", cel, lambda d: d["currency"] == c and d["amount"] > a, 1


def _channel_attempts(r: random.Random) -> tuple[str, str, Predicate, int]:
    ch = r.choice(CHANNELS)
    n = r.randint(2, 4)
    cel = f'input.channel == "{ch}" && input.attempts >= {n}'
    return "retry_burst", cel, lambda d: d["channel"] == ch and d["attempts"] >= n, 1


def _new_account(r: random.Random) -> tuple[str, str, Predicate, int]:
    days = r.randint(1, 90)
    a = r.randrange(100, 2_000, 50)
    cel = f"input.user.account_age_days < {days} && input.amount > {a}.0"
    return (
        "new_account_spend",
        cel,
        lambda d: d["user"]["account_age_days"] < days and d["amount"] > a,
        1,
    )


def _unverified(r: random.Random) -> tuple[str, str, Predicate, int]:
    a = r.randrange(50, 1_000, 10)
    cel = f"!input.user.verified && input.amount > {a}"
    return "unverified_user", cel, lambda d: not d["user"]["verified"] and d["amount"] > a, 1


def _mcc_in(r: random.Random) -> tuple[str, str, Predicate, int]:
    mccs = r.sample(MCCS, r.randint(1, 4))
    cel = f"input.merchant.category in {_cel_list(mccs)}"
    return "risky_mcc", cel, lambda d: d["merchant"]["category"] in mccs, 1


def _merchant_risk(r: random.Random) -> tuple[str, str, Predicate, int]:
    x = r.randint(50, 95) / 100
    cel = f"input.merchant.risk_score > {x}"
    return "merchant_risk", cel, lambda d: d["merchant"]["risk_score"] > x, 1


def _night(r: random.Random) -> tuple[str, str, Predicate, int]:
    h1 = r.randint(0, 2)
    h2 = h1 + r.randint(3, 5)
    cel = f"input.hour >= {h1} && input.hour < {h2}"
    return "night_time", cel, lambda d: h1 <= d["hour"] < h2, 1


def _tag_exists(r: random.Random) -> tuple[str, str, Predicate, int]:
    tag = r.choice(TAGS)
    cel = f'input.tags.exists(t, t == "{tag}")'
    sign = -1 if tag in ("loyalty", "recurring") else 1
    return f"tag_{tag}", cel, lambda d: tag in d["tags"], sign


def _tag_prefix(r: random.Random) -> tuple[str, str, Predicate, int]:
    prefix = r.choice(["vip_", "risk_"])
    cel = f'input.tags.exists(t, t.startsWith("{prefix}"))'
    sign = -1 if prefix == "vip_" else 1
    return (
        f"tag_prefix_{prefix.rstrip('_')}",
        cel,
        lambda d: any(t.startswith(prefix) for t in d["tags"]),
        sign,
    )


def _tags_size(r: random.Random) -> tuple[str, str, Predicate, int]:
    n = r.randint(3, 5)
    return "many_tags", f"size(input.tags) >= {n}", lambda d: len(d["tags"]) >= n, 1


def _test_user(r: random.Random) -> tuple[str, str, Predicate, int]:
    prefix = r.choice(["test_", "qa_"])
    cel = f'input.user.id.startsWith("{prefix}")'
    return "test_account", cel, lambda d: d["user"]["id"].startswith(prefix), 1


def _email_domain(r: random.Random) -> tuple[str, str, Predicate, int]:
    domain = r.choice(DOMAINS)
    cel = f'input.user.email.endsWith("@{domain}")'
    sign = 1 if "temp" in domain or "inbox" in domain else -1
    return "email_domain", cel, lambda d: d["user"]["email"].endswith("@" + domain), sign


def _device_os(r: random.Random) -> tuple[str, str, Predicate, int]:
    os_name = r.choice(OSES)
    a = r.randrange(0, 1_000, 20)
    cel = f'has(input.device) && input.device.os == "{os_name}" && input.amount > {a}'
    return (
        "device_os",
        cel,
        lambda d: "device" in d and d["device"]["os"] == os_name and d["amount"] > a,
        1,
    )


def _device_ip(r: random.Random) -> tuple[str, str, Predicate, int]:
    prefix = r.choice(IP_PREFIXES)
    cel = f'has(input.device) && input.device.ip.startsWith("{prefix}")'
    return (
        "private_ip",
        cel,
        lambda d: "device" in d and d["device"]["ip"].startswith(prefix),
        1,
    )


def _emulator(r: random.Random) -> tuple[str, str, Predicate, int]:
    del r
    cel = "has(input.device) && has(input.device.emulator) && input.device.emulator"
    return (
        "emulator",
        cel,
        lambda d: "device" in d and bool(d["device"].get("emulator", False)),
        1,
    )


def _promo(r: random.Random) -> tuple[str, str, Predicate, int]:
    a = r.randint(5, 60)
    cel = f"has(input.promo_code) && input.amount < {a}.0"
    return "promo_abuse", cel, lambda d: "promo_code" in d and d["amount"] < a, 1


def _shipping(r: random.Random) -> tuple[str, str, Predicate, int]:
    del r
    cel = "has(input.shipping) && input.shipping.country != input.country && input.shipping.express"
    return (
        "express_cross_border",
        cel,
        lambda d: (
            "shipping" in d
            and d["shipping"]["country"] != d["country"]
            and d["shipping"]["express"]
        ),
        1,
    )


def _chargebacks(r: random.Random) -> tuple[str, str, Predicate, int]:
    n = r.randint(0, 2)
    cel = f'input.user.previous_chargebacks > {n} && input.user.segment != "vip"'
    return (
        "chargeback_history",
        cel,
        lambda d: d["user"]["previous_chargebacks"] > n and d["user"]["segment"] != "vip",
        1,
    )


def _trusted_segment(r: random.Random) -> tuple[str, str, Predicate, int]:
    segments = r.sample(SEGMENTS[1:], 2)
    cel = f"input.user.segment in {_cel_list(segments)} && input.user.verified"
    return (
        "trusted_segment",
        cel,
        lambda d: d["user"]["segment"] in segments and d["user"]["verified"],
        -1,
    )


def _old_account(r: random.Random) -> tuple[str, str, Predicate, int]:
    days = r.randrange(365, 1_500, 5)
    cel = f"input.user.account_age_days > {days} && input.user.previous_chargebacks == 0"
    return (
        "tenured_customer",
        cel,
        lambda d: d["user"]["account_age_days"] > days and d["user"]["previous_chargebacks"] == 0,
        -1,
    )


def _minor_gambling(r: random.Random) -> tuple[str, str, Predicate, int]:
    age = r.choice([18, 21])
    cel = f'input.user.age < {age} && input.merchant.category in ["7995", "5993"]'
    return (
        "underage_restricted",
        cel,
        lambda d: d["user"]["age"] < age and d["merchant"]["category"] in ("7995", "5993"),
        1,
    )


def _attempts(r: random.Random) -> tuple[str, str, Predicate, int]:
    n = r.randint(3, 5)
    return "many_attempts", f"input.attempts >= {n}", lambda d: d["attempts"] >= n, 1


TEMPLATES: tuple[Template, ...] = (
    _amount_gt,
    _amount_band,
    _country_in,
    _country_mismatch,
    _currency_amount,
    _channel_attempts,
    _new_account,
    _unverified,
    _mcc_in,
    _merchant_risk,
    _night,
    _tag_exists,
    _tag_prefix,
    _tags_size,
    _test_user,
    _email_domain,
    _device_os,
    _device_ip,
    _emulator,
    _promo,
    _shipping,
    _chargebacks,
    _trusted_segment,
    _old_account,
    _minor_gambling,
    _attempts,
)


# Comparing two input strings is priced at the longest strings the input limits allow
# (about 31 ms each): more than this many in one ruleset would pass the ruleset's cost
# limit (`sidecar.cost.RULESET_COST_LIMIT`, 250 ms), and the loader would refuse it.
_COSTLY: Final = frozenset({_country_mismatch, _shipping})
_MAX_COSTLY: Final = 6


def _tightened(check: Predicate, amount: int) -> Predicate:
    def tightened(document: Doc) -> bool:
        return check(document) and document["amount"] > amount

    return tightened


def ruleset_id(file_index: int) -> str:
    return f"rs-{file_index:05d}"


def generate_rules(
    file_index: int, rules_per_file: int = 100, seed: int = 0, *, revision: int = 0
) -> list[GeneratedRule]:
    """The rules of file `file_index`; `revision` changes one rule's threshold and points."""
    r = random.Random(f"{seed}:{file_index}")
    rules: list[GeneratedRule] = []
    costly = 0
    for n in range(rules_per_file):
        template = r.choice(TEMPLATES)
        while template in _COSTLY and costly >= _MAX_COSTLY:
            template = r.choice(TEMPLATES)
        costly += template in _COSTLY
        stem, condition, check, sign = template(r)
        points = sign * r.choice([5, 10, 10, 15, 20, 25, 40, 60])
        priority = r.choice([0, 0, 0, 0, 0, 10, 20, 50, -5])
        if n == 0 and revision:
            # A realistic edit: raise the threshold of a rule, change its weight.
            condition = f"({condition}) && input.amount > {revision}"
            check = _tightened(check, revision)
            points += revision
        tags = tuple(sorted(set(r.sample(["fraud", "aml", "kyc", "velocity", "geo"], 2))))
        metadata = {}
        if r.random() < 0.3:
            metadata = {"owner": r.choice(TEAMS), "ticket": f"RISK-{r.randint(100, 9999)}"}
        rules.append(
            GeneratedRule(
                id=f"r{file_index:05d}-{n:04d}",
                name=f"{stem.replace('_', ' ')} #{n}",
                description=f"Generated {stem} rule {n} of ruleset {ruleset_id(file_index)}.",
                condition=condition,
                points=points,
                priority=priority,
                tags=tags,
                metadata=metadata,
                check=check,
            )
        )
    return rules


def decision_bands(rule_count: int) -> list[dict[str, Any]]:
    """Two bands, highest first as the schema asks, scaled so that on `sample_input`s
    about 70% of inputs are allowed, 20% reviewed and 10% denied."""
    return [
        {"decision": "deny", "min_points": 3 * rule_count},
        {"decision": "review", "min_points": 2 * rule_count},
    ]


def expected(rules: list[GeneratedRule], document: Doc) -> tuple[int, list[str], str]:
    """What the engine must answer for `document`: total points, matched ids, decision."""
    matched = [rule for rule in rules if rule.check(document)]
    total = sum(rule.points for rule in matched)
    decision = next(
        (b["decision"] for b in decision_bands(len(rules)) if total >= b["min_points"]),
        DEFAULT_DECISION,
    )
    return total, [rule.id for rule in matched], decision


def _quote(text: str) -> str:
    """A YAML single-quoted scalar (CEL text here never needs more)."""
    return "'" + text.replace("'", "''") + "'"


def render_file(file_index: int, rules: list[GeneratedRule], *, tests: bool = False) -> SourceFile:
    """YAML text of one RuleSet document holding `rules`."""
    rs_id = ruleset_id(file_index)
    team = TEAMS[file_index % len(TEAMS)]
    lines = [
        "# Generated by bench/_gen.py; do not edit.",
        "apiVersion: rule-sidecar/v1",
        "kind: RuleSet",
        "metadata:",
        f"  id: {rs_id}",
        f"  name: Payments risk scoring {file_index}",
        f"  description: Benchmark ruleset {file_index}, owned by {team}.",
        "  labels:",
        f"    team: {team}",
        "    tier: critical" if file_index % 3 == 0 else "    tier: standard",
        "spec:",
        "  decisions:",
    ]
    for band in decision_bands(len(rules)):
        lines.append(f"    - decision: {band['decision']}")
        lines.append(f"      min_points: {band['min_points']}")
    lines.append(f"  default_decision: {DEFAULT_DECISION}")
    lines.append("  rules:")
    for k, rule in enumerate(rules):
        lines.append(f"    - id: {rule.id}")
        lines.append(f"      name: {_quote(rule.name)}")
        lines.append(f"      description: {rule.description}")
        if k % 7 == 3:
            # Some authors write long conditions as block scalars.
            lines.append("      condition: |-")
            lines.append(f"        {rule.condition}")
        else:
            lines.append(f"      condition: {_quote(rule.condition)}")
        lines.append(f"      points: {rule.points}")
        if rule.priority:
            lines.append(f"      priority: {rule.priority}")
        lines.append(f"      tags: [{', '.join(rule.tags)}]")
        if rule.metadata:
            lines.append("      metadata:")
            lines.extend(f"        {key}: {value}" for key, value in rule.metadata.items())
    if tests:
        lines.append("  tests:")
        for t in range(3):
            document = sample_input(file_index * 7 + t * 1_000_003)
            total, matched, decision = expected(rules, document)
            lines.append(f"    - name: generated case {t}")
            lines.append(f"      input: {json.dumps(document)}")
            lines.append("      expect:")
            lines.append(f"        total_points: {total}")
            lines.append(f"        decision: {decision}")
            if t == 0:
                lines.append(f"        matched: [{', '.join(matched)}]")
    return SourceFile(f"rules/ruleset-{file_index:05d}.yaml", ("\n".join(lines) + "\n").encode())


def generate_file(
    file_index: int,
    rules_per_file: int = 100,
    seed: int = 0,
    *,
    tests: bool = False,
    revision: int = 0,
) -> SourceFile:
    """One file; a different `revision` gives the same file with one rule edited."""
    rules = generate_rules(file_index, rules_per_file, seed, revision=revision)
    return render_file(file_index, rules, tests=tests)


def generate_files(
    total_rules: int, rules_per_file: int = 100, seed: int = 0, *, tests: bool = False
) -> list[SourceFile]:
    """`total_rules` rules in files of `rules_per_file` (the last one may be smaller)."""
    files = []
    for index, start in enumerate(range(0, total_rules, rules_per_file)):
        count = min(rules_per_file, total_rules - start)
        files.append(generate_file(index, count, seed, tests=tests))
    return files


def sample_input(i: int) -> Doc:
    """A varied, deterministic transaction document; every unguarded field is present."""
    r = random.Random(i * 2_654_435_761 + 97)
    country = r.choice(COUNTRIES)
    document: Doc = {
        "transaction_id": f"tx-{i:09d}",
        "amount": round(min(50_000.0, r.lognormvariate(5.0, 1.6)) + 0.5, 2),
        "currency": r.choice(CURRENCIES),
        "channel": r.choice(CHANNELS),
        "country": country,
        "ip_country": country if r.random() < 0.8 else r.choice(COUNTRIES),
        "hour": r.randint(0, 23),
        "attempts": min(6, int(r.expovariate(0.8))),
        "user": {
            "id": (r.choice(["test_", "qa_"]) if r.random() < 0.05 else "u-")
            + str(r.randint(1, 10**7)),
            "email": f"user{r.randint(1, 99999)}@{r.choice(DOMAINS)}",
            "age": r.randint(16, 90),
            "account_age_days": int(r.expovariate(1 / 400)),
            "verified": r.random() < 0.7,
            "segment": r.choice(SEGMENTS),
            "previous_chargebacks": r.choice([0, 0, 0, 0, 1, 2, 3]),
        },
        "merchant": {
            "id": f"m-{r.randint(1, 5000)}",
            "category": r.choice(MCCS),
            "country": r.choice(COUNTRIES),
            "risk_score": round(r.random(), 3),
        },
        "tags": r.sample(TAGS, r.randint(0, 5)),
    }
    if r.random() < 0.8:
        device: Doc = {
            "os": r.choice(OSES),
            "ip": (
                r.choice(IP_PREFIXES) + f"{r.randint(0, 255)}.{r.randint(1, 254)}"
                if r.random() < 0.3
                else ".".join(str(r.randint(11, 223)) for _ in range(4))
            ),
            "fingerprint": f"{r.getrandbits(64):016x}",
        }
        if r.random() < 0.5:
            device["emulator"] = r.random() < 0.1
        document["device"] = device
    if r.random() < 0.2:
        document["promo_code"] = f"PROMO{r.randint(1, 99)}"
    if r.random() < 0.3:
        document["shipping"] = {"country": r.choice(COUNTRIES), "express": r.random() < 0.4}
    return document


def _self_check() -> None:
    from sidecar.engine import evaluate
    from sidecar.loader import Loader

    files = generate_files(1_000, tests=True)
    result = Loader().load(files)  # embedded tests run here and must pass
    snapshot = result.snapshot
    print(f"loaded {len(snapshot.rules)} rules in {len(snapshot.rulesets)} rulesets")
    errors = decided = 0
    mismatches = 0
    rules = [generate_rules(index) for index in range(len(files))]
    for i in range(2_000):
        file_index = i % len(files)
        document = sample_input(i)
        evaluation = evaluate(snapshot, ruleset_id(file_index), document)
        errors += len(evaluation.errors)
        decided += evaluation.decision != DEFAULT_DECISION
        total, _, _ = expected(rules[file_index], document)
        mismatches += total != evaluation.total_points
    print(
        f"2000 evaluations: {errors} rule errors, {decided} non-allow decisions, "
        f"{mismatches} mismatches with the Python twins"
    )


if __name__ == "__main__":
    _self_check()
