"""Benchmark: peak memory of loading each hostile rule file (ATTACKS.md "Documents").

Each file is written to a temporary directory and loaded in a fresh child process by
the real loader (`read_rule_files` + `Loader().load`); when it loads, the snapshot is then
serialized as `GET /api/v1/rules` would (every ruleset's document to JSON), since that is
where an alias bomb of strings used to cost memory. The child reports its peak RSS
(`ru_maxrss`), the wall time and the outcome (loaded, or the first problem). The first
row is the baseline: a small good file.

Run (from the repository root):

    python -m bench.hostile_files
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HEAD = (
    "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: hostile}\nspec:\n"
    "  rules:\n  - id: r\n    condition: 'true'\n    points: 1\n"
)

CHILD = """
import json, resource, sys, time
from pathlib import Path
from sidecar.errors import LoadError
from sidecar.loader import Loader
from sidecar.sources.files import read_rule_files
started = time.perf_counter()
try:
    snapshot = Loader().load(read_rule_files([Path(sys.argv[1])])).snapshot
    served = sum(len(json.dumps(r.to_document())) for r in snapshot.rulesets.values())
    outcome = f"loaded, served as {served:,} bytes of JSON"
except LoadError as exc:
    message = str(exc.problems[0])
    outcome = f"refused ({len(message):,}-char message): {message}"
except Exception as exc:
    outcome = f"CRASH {type(exc).__name__}: {exc}"
elapsed = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": elapsed, "peak_mib": peak, "outcome": outcome[:150]}))
"""


def _good() -> str:
    return HEAD


def _scalar_alias_bomb() -> str:
    """The issue's file: 2,000 aliases of a 100 KB string."""
    rules = "".join(
        f"  - {{id: r{i}, condition: 'true', points: 1, metadata: {{v: *big}}}}\n"
        for i in range(2000)
    )
    return (
        "apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata: {id: hostile}\nspec:\n  rules:\n"
        f"  - {{id: a, condition: 'true', points: 1, metadata: {{v: &big {'x' * 100_000}}}}}\n"
        + rules
    )


def _billion_laughs() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def _huge_scalar() -> str:
    """One string just under the 4 MiB file limit, where any string is allowed."""
    return HEAD + f"    metadata: {{v: {'x' * (4 * 1024 * 1024 - 200)}}}\n"


def _huge_description() -> str:
    """The same string where the schema allows 4,096 characters."""
    return HEAD + f"    description: {'x' * (4 * 1024 * 1024 - 200)}\n"


def _many_values() -> str:
    """4 MiB of one-character values: no alias, no depth, just nodes."""
    count = (4 * 1024 * 1024 - 300) // 2
    return HEAD + "    metadata: {v: [" + "1," * (count - 1) + "1]}\n"


def _many_documents() -> str:
    return "---\n".join(
        HEAD.replace("hostile", f"s{i}").replace("id: r", f"id: r{i}") for i in range(1000)
    )


def _deep_nesting() -> str:
    return HEAD + "    metadata: " + "{a: " * 60 + "1" + "}" * 60 + "\n"


def _deeper_than_libyaml() -> str:
    return "[" * 1_000_000 + "]" * 1_000_000


def _deep_json() -> str:
    return "[" * 1_000_000 + "]" * 1_000_000


def _duplicate_keys() -> str:
    return HEAD + "    metadata: {" + ", ".join(["k: v"] * 100_000) + "}\n"


def _tags() -> str:
    return HEAD + "    metadata: {v: !!binary " + "QUFB" * 1_000_000 + "}\n"


def _lone_surrogate() -> str:
    return (
        '{"apiVersion": "rule-sidecar/v1", "kind": "RuleSet", "metadata": {"id": "hostile"},'
        ' "spec": {"rules": [{"id": "r", "condition": "true", "points": 1,'
        ' "description": "\\ud800"}]}}'
    )


def _big_int() -> str:
    return HEAD + "    metadata: {v: " + "9" * 1_000_000 + "}\n"


FILES: dict[str, tuple[str, Callable[[], str | bytes]]] = {
    "baseline (small good file)": ("good.yaml", _good),
    "aliases: 2,000 x a 100 KB string": ("scalar-bomb.yaml", _scalar_alias_bomb),
    "aliases: billion laughs (lists)": ("laughs.yaml", _billion_laughs),
    "huge scalar (4 MiB string)": ("huge.yaml", _huge_scalar),
    "huge description (4 MiB)": ("description.yaml", _huge_description),
    "4 MiB of tiny values (2 million)": ("values.yaml", _many_values),
    "1,000 documents in one file": ("docs.yaml", _many_documents),
    "deep nesting (60, within limit)": ("deep.yaml", _deep_nesting),
    "nesting 1,000,000 deep (YAML)": ("deeper.yaml", _deeper_than_libyaml),
    "nesting 1,000,000 deep (JSON)": ("deeper.json", _deep_json),
    "100,000 duplicate keys": ("dups.yaml", _duplicate_keys),
    "!!binary of 3 MB": ("binary.yaml", _tags),
    "integer of 1,000,000 digits": ("int.yaml", _big_int),
    "UTF-16 with BOM": ("utf16.yaml", lambda: HEAD.encode("utf-16")),
    "invalid UTF-8": ("bad-utf8.yaml", lambda: HEAD.encode() + b"\xff\xfe" * 1000),
    "NUL character": ("nul.yaml", lambda: HEAD.replace("hostile", "host\0ile")),
    "lone surrogate escape (JSON)": ("surrogate.json", _lone_surrogate),
    "UTF-8 BOM (accepted)": ("bom.yaml", lambda: codecs.BOM_UTF8 + HEAD.encode()),
}


def main() -> None:
    print(f"{'file':36} {'size':>10} {'peak RSS':>9} {'time':>7}  outcome")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, build) in FILES.items():
            content = build()
            data = content if isinstance(content, bytes) else content.encode()
            path = Path(tmp) / name
            path.write_bytes(data)
            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if child.returncode != 0:
                print(f"{label:36} {len(data):>10,} child failed: {child.stderr.strip()[-200:]}")
                continue
            row = json.loads(child.stdout)
            print(
                f"{label:36} {len(data):>10,} {row['peak_mib']:>6.0f} MiB"
                f" {row['seconds']:>6.2f}s  {row['outcome']}"
            )


if __name__ == "__main__":
    main()
