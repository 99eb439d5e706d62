"""The package's shape: data flows one way, and the public surface is what it says."""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

import sidecar

PACKAGE = Path(sidecar.__file__).parent

# Lowest first. A module may import only from modules in earlier layers (or its own).
LAYERS: list[set[str]] = [
    {
        "sidecar.errors",
        "sidecar.rulefiles",
        "sidecar.testing",
        "sidecar.client",
        "sidecar.celwire",
        "sidecar.pointers",
        "sidecar.jsoncodec",
    },
    {"sidecar.dependencies"},
    {"sidecar.cost"},
    {"sidecar.fastpath"},
    {"sidecar.conditions"},
    {"sidecar.model"},
    {"sidecar.snapshot", "sidecar.documents"},
    {"sidecar.explain"},
    {"sidecar.engine"},
    {"sidecar.tallies"},
    {"sidecar.checks"},
    {
        "sidecar.loader",
        "sidecar.sources",
        "sidecar.sources.files",
        "sidecar.sources.dbschema",
        "sidecar.state",
    },
    {"sidecar.sources.database", "sidecar.sources.kubernetes"},
    {"sidecar.registry", "sidecar.reading"},
    {"sidecar.editing"},
    {"sidecar.reloads"},
    {"sidecar.decision", "sidecar.scheduling"},
    {"sidecar.service", "sidecar.config", "sidecar.dbtools", "sidecar.gate"},
    {"sidecar.writes"},
    {"sidecar.replay"},
    {"sidecar.integration"},
    {
        "sidecar.api",
        "sidecar.api.limits",
        "sidecar.api.metrics",
        "sidecar.api.websocket",
        "sidecar.api.ui",
        "sidecar.api.renders",
        "sidecar.api.views",
        "sidecar.api.decisionlog",
        "sidecar.api.candidates",
    },
    {"sidecar.api.app"},
    {"sidecar.api.run"},
    {"sidecar.cli", "sidecar"},
]
LAYER_OF = {module: index for index, layer in enumerate(LAYERS) for module in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imported_modules(path: Path) -> frozenset[str]:
    """The sidecar modules a file imports (at any depth of the file); parsed once."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidecar"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sidecar"))
    return frozenset(found)


MODULES = sorted(PACKAGE.rglob("*.py"))


class TestLayers:
    """Sources → loader → snapshot → registry → engine/API: no module reaches back up."""

    def test_every_module_has_a_layer(self):
        """A new module must be placed in LAYERS, so its place is a decision."""
        assert {module_name(path) for path in MODULES} <= set(LAYER_OF)

    @pytest.mark.parametrize("path", MODULES, ids=module_name)
    def test_imports_only_go_down(self, path: Path):
        """Each module imports only modules of lower layers (or of its own package)."""
        name = module_name(path)
        for imported in imported_modules(path):
            if imported.startswith(f"{name}.") or name == "sidecar":
                continue
            assert LAYER_OF[imported] < LAYER_OF[name] or (
                LAYER_OF[imported] == LAYER_OF[name] and imported == name.rsplit(".", 1)[0]
            ), f"{name} imports {imported}, which is not below it"

    def test_validate_does_not_need_the_server(self):
        """`rule-sidecar validate` never imports the API package (it could be deleted)."""
        for path in MODULES:
            name = module_name(path)
            if LAYER_OF[name] <= LAYER_OF["sidecar.registry"]:
                assert not any(m.startswith("sidecar.api") for m in imported_modules(path)), name


def readme_table() -> list[str]:
    """The modules of the README's "How it is built" table, in its order."""
    text = (PACKAGE.parent / "README.md").read_text("utf-8")
    section = text.split("## How it is built", 1)[1]
    table = section[section.index("| module | role |") :].split("\n\n", 1)[0]
    return re.findall(r"^\| `(sidecar/[^`]*)` \|", table, flags=re.MULTILINE)


def table_module(row: str) -> str:
    """`sidecar/api/` -> `sidecar.api`; `sidecar/reading.py` -> `sidecar.reading`."""
    return row.removesuffix("/").removesuffix(".py").replace("/", ".")


class TestReadmeTable:
    """The README's module table is the layer list a newcomer reads: kept true here."""

    def test_rows_are_in_layer_order(self):
        layers = [LAYER_OF[table_module(row)] for row in readme_table()]
        assert layers == sorted(layers), list(zip(readme_table(), layers, strict=True))

    def test_every_module_is_in_the_table(self):
        """A module is named, or its package is (`sidecar/api/` covers `api/app.py`)."""
        named = {table_module(row) for row in readme_table()}
        for path in MODULES:
            name = module_name(path)
            if name != "sidecar":
                assert name in named or name.rsplit(".", 1)[0] in named, name


class TestExports:
    """Every name in an `__all__` exists, so the public surface cannot rot."""

    @pytest.mark.parametrize("path", MODULES, ids=module_name)
    def test_all_names_exist(self, path: Path):
        """`from module import *` gives exactly the names the module promises."""
        module = importlib.import_module(module_name(path))
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name!r}"

    def test_top_level_exports(self):
        """The package root re-exports the library's main types."""
        assert {"Loader", "RuleRegistry", "Snapshot", "evaluate", "LoadError"} <= set(
            sidecar.__all__
        )
