"""Trim the image's venv to what the sidecar runs, then compile byte code where it pays.

    /opt/rule-sidecar/bin/python trim-venv.py /opt/rule-sidecar     (the Dockerfile's builder)

The Kubernetes client (66 MB installed) is the bulk of the venv and is used only by the
ConfigMap API source (`--kubernetes-selector`). Its package imports lazily: its generated
API classes (one module per API group, `kubernetes/client/api`) load only when code
names one, its models (`kubernetes/client/models`) when an API module or a response does.
So what the source loads is known by building it: the ConfigMap source and its Event
recorder are built here as `serve` builds them (no API server is contacted), and

- the generated API modules they did not load are removed (only CoreV1Api is used);
  nothing imports them at import time, and naming one would fail, which no code does;
- the models all stay (a response may name any), but only the ones loaded get byte code.

Also removed: the client's asyncio twin (`kubernetes/aio`: nothing imports it), the
cel-expr-python extensions no sidecar module imports (each links its own copy of
cel-cpp, 5-7 MB apiece) and the packages' `tests` directories.

Byte code (pip's, from the install, is dropped first) is compiled with unchecked hashes,
valid whatever the files' modification times after COPY, so Python never needs to write
any at run time: for every module but the Kubernetes models the source does not load.
Standard library and the venv's own packages only; run by the venv's interpreter.
"""

from __future__ import annotations

import ast
import compileall
import py_compile
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import sidecar

CEL_EXTENSIONS = "cel_expr_python.ext"
# The Kubernetes client's generated code: kept or compiled only where the API source loads it.
GENERATED = re.compile(r"/kubernetes/client/(api|models)/")
GENERATED_APIS = Path("kubernetes", "client", "api")
UNCHECKED = py_compile.PycInvalidationMode.UNCHECKED_HASH


def imported_modules(package: Path) -> set[str]:
    """Every module an import statement anywhere in `package` names (function level too)."""
    found: set[str] = set()
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def unused_cel_extensions(site: Path, package: Path) -> list[Path]:
    """The files of every cel-expr-python extension module that `package` never imports."""
    used = imported_modules(package)
    directory = site.joinpath(*CEL_EXTENSIONS.split("."))
    unused = []
    for path in sorted(directory.glob("ext_*")):
        module = path.name.partition(".")[0]
        if f"{CEL_EXTENSIONS}.{module}" not in used:
            unused.append(path)
    return unused


def test_directories(site: Path) -> Iterator[Path]:
    """The `tests` packages inside the installed packages: run by nobody here."""
    for path in sorted(site.glob("*/**/tests")):
        if path.is_dir():
            yield path


def remove(path: Path) -> None:
    """A file or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def api_source_modules() -> list[str]:
    """The files of the modules loaded once the ConfigMap source and its Event recorder exist.

    Built as `rule-sidecar serve --kubernetes-selector` builds them (no API server is
    contacted), so the list follows the source's code.
    """
    from kubernetes import client  # noqa: PLC0415

    from sidecar.sources.kubernetes import ConfigMapSource, EventRecorder  # noqa: PLC0415

    api = client.ApiClient(client.Configuration())
    ConfigMapSource(api, namespace="default", label_selector="")
    EventRecorder(api, namespace="default", instance="build")
    files = (getattr(module, "__file__", None) for module in list(sys.modules.values()))
    return sorted(file for file in files if isinstance(file, str) and file.endswith(".py"))


def unused_apis(site: Path, loaded: set[str]) -> list[Path]:
    """The generated API modules the API source did not load."""
    return [
        path
        for path in sorted((site / GENERATED_APIS).glob("*.py"))
        if path.name != "__init__.py" and str(path) not in loaded
    ]


def main() -> None:
    sys.dont_write_bytecode = True
    venv = Path(sys.argv[1])
    (site,) = venv.glob("lib/python3*/site-packages")
    package = Path(sidecar.__file__).parent
    loaded = set(api_source_modules())
    for unused in [
        site / "kubernetes" / "aio",
        *unused_apis(site, loaded),
        *unused_cel_extensions(site, package),
        *test_directories(site),
    ]:
        print(f"trim-venv: removing {unused.relative_to(site)}")
        remove(unused)
    # Whatever pip compiled at install time goes: the byte code is this script's choice.
    for cache in sorted(venv.glob("lib/**/__pycache__")):
        remove(cache)
    compiled = compileall.compile_dir(
        venv / "lib", rx=GENERATED, quiet=1, force=True, workers=0, invalidation_mode=UNCHECKED
    )
    for path in sorted(loaded):
        if GENERATED.search(path):
            py_compile.compile(path, doraise=True, invalidation_mode=UNCHECKED)
    if not compiled:
        sys.exit("trim-venv: byte code compilation failed")


if __name__ == "__main__":
    main()
