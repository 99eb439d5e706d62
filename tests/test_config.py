"""`sidecar.config`: settings from environment variables and flags, checked once."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import build_parser, flag_settings
from sidecar.config import (
    DEFAULT_SETTINGS,
    ENVIRONMENT,
    FLAGS,
    Settings,
    SettingsError,
    declaration,
    settings_from,
)


class TestDefaults:
    """Without any variable the documented defaults apply."""

    def test_empty_environment_gives_the_defaults(self):
        """No variables: the seed's defaults and localhost:8000."""
        settings = settings_from({})
        assert settings == DEFAULT_SETTINGS == Settings()
        assert (settings.host, settings.port) == ("127.0.0.1", 8000)
        assert settings.hot_reload_enabled is True
        assert settings.interval_seconds == 30.0
        assert settings.validation_enabled is True
        assert settings.max_age_seconds == 300.0
        assert settings.rules_dirs == ()

    def test_every_field_has_a_variable(self):
        """Each setting has exactly one variable; the seed's four keep their names."""
        names = {field.name for field in dataclasses.fields(Settings)}
        assert set(ENVIRONMENT) == names
        assert len(set(ENVIRONMENT.values())) == len(names)
        assert all(v.startswith(("RULE_SIDECAR_", "HOT_RELOAD_")) for v in ENVIRONMENT.values())
        assert {
            ENVIRONMENT["hot_reload_enabled"],
            ENVIRONMENT["interval_seconds"],
            ENVIRONMENT["validation_enabled"],
            ENVIRONMENT["max_age_seconds"],
        } == {
            "HOT_RELOAD_ENABLED",
            "HOT_RELOAD_INTERVAL_SECONDS",
            "HOT_RELOAD_VALIDATION_ENABLED",
            "HOT_RELOAD_MAX_AGE_SECONDS",
        }

    def test_settings_are_frozen(self):
        """Settings cannot change after parsing."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            DEFAULT_SETTINGS.port = 1  # type: ignore[misc]

    def test_unrelated_variables_are_ignored(self):
        """Variables that are not settings change nothing."""
        assert settings_from({"PATH": "/bin", "RULE_SIDECAR_NOPE": "1"}) == DEFAULT_SETTINGS


class TestParsing:
    """Every variable type is parsed into its field's type."""

    @pytest.mark.parametrize(
        ("variable", "text", "field", "expected"),
        [
            ("RULE_SIDECAR_HOST", "0.0.0.0", "host", "0.0.0.0"),
            ("RULE_SIDECAR_PORT", "9000", "port", 9000),
            ("RULE_SIDECAR_METRICS_HOST", "0.0.0.0", "metrics_host", "0.0.0.0"),
            ("RULE_SIDECAR_METRICS_PORT", "9090", "metrics_port", 9090),
            ("RULE_SIDECAR_DATABASE_URL", "sqlite:///r.db", "database_url", "sqlite:///r.db"),
            ("RULE_SIDECAR_ADMIN_TOKEN_FILE", "/run/t", "admin_token_file", Path("/run/t")),
            ("RULE_SIDECAR_STATE_DIR", "/var/lib/s", "state_dir", Path("/var/lib/s")),
            ("HOT_RELOAD_ENABLED", "false", "hot_reload_enabled", False),
            ("HOT_RELOAD_INTERVAL_SECONDS", "2.5", "interval_seconds", 2.5),
            ("HOT_RELOAD_INTERVAL_SECONDS", "10", "interval_seconds", 10.0),
            ("HOT_RELOAD_VALIDATION_ENABLED", "no", "validation_enabled", False),
            ("HOT_RELOAD_MAX_AGE_SECONDS", "60", "max_age_seconds", 60.0),
            ("RULE_SIDECAR_DEBOUNCE_MS", "20", "debounce_ms", 20),
            ("RULE_SIDECAR_MAX_BODY_BYTES", "4096", "max_body_bytes", 4096),
            ("RULE_SIDECAR_RELOAD_RATE_PER_MINUTE", "5", "reload_rate_per_minute", 5),
            ("RULE_SIDECAR_HISTORY_LIMIT", "7", "history_limit", 7),
            ("RULE_SIDECAR_LOG_LEVEL", "debug", "log_level", "debug"),
        ],
    )
    def test_variable(self, variable: str, text: str, field: str, expected: Any):
        """The variable's text becomes the field's typed value."""
        settings = settings_from({variable: text})
        value = getattr(settings, field)
        assert value == expected
        assert type(value) is type(expected)

    def test_rules_dirs_are_path_separated(self):
        """RULE_SIDECAR_RULES_DIR holds several directories; empty parts are skipped."""
        text = os.pathsep.join(["/etc/rules", "", "relative/dir"])
        settings = settings_from({"RULE_SIDECAR_RULES_DIR": text})
        assert settings.rules_dirs == (Path("/etc/rules"), Path("relative/dir"))

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("1", True),
            ("true", True),
            ("YES", True),
            (" On ", True),
            ("0", False),
            ("False", False),
            ("no", False),
            ("off", False),
        ],
    )
    def test_booleans(self, text: str, expected: bool):
        """The usual spellings of true and false, any case, surrounding blanks ignored."""
        assert settings_from({"HOT_RELOAD_ENABLED": text}).hot_reload_enabled is expected

    def test_blank_values_mean_unset(self):
        """An empty or blank variable keeps the default."""
        settings = settings_from({"RULE_SIDECAR_PORT": "  ", "HOT_RELOAD_ENABLED": ""})
        assert (settings.port, settings.hot_reload_enabled) == (8000, True)

    def test_values_are_stripped(self):
        """Blanks around a value are ignored."""
        assert settings_from({"RULE_SIDECAR_PORT": " 8080\n"}).port == 8080


class TestOverrides:
    """Flags (overrides) win over variables; a flag not given leaves the variable."""

    def test_flag_wins_over_variable(self):
        """An override replaces the environment's value."""
        settings = settings_from(
            {"RULE_SIDECAR_PORT": "8001", "RULE_SIDECAR_HOST": "0.0.0.0"}, {"port": 9000}
        )
        assert (settings.port, settings.host) == (9000, "0.0.0.0")

    def test_none_means_not_given(self):
        """An override of None leaves the variable's value."""
        settings = settings_from(
            {"RULE_SIDECAR_STATE_DIR": "/var/s"}, {"state_dir": None, "rules_dirs": None}
        )
        assert settings.state_dir == Path("/var/s")
        assert settings.rules_dirs == ()

    def test_flag_rules_dirs_replace_the_variable(self):
        """`--rules-dir` flags replace RULE_SIDECAR_RULES_DIR entirely."""
        settings = settings_from(
            {"RULE_SIDECAR_RULES_DIR": "/from/env"}, {"rules_dirs": (Path("/from/flag"),)}
        )
        assert settings.rules_dirs == (Path("/from/flag"),)

    def test_overridden_values_are_checked_too(self):
        """A bad flag value is refused like a bad variable."""
        with pytest.raises(SettingsError):
            settings_from({}, {"port": 70000})


class TestErrors:
    """Values that cannot be used raise SettingsError naming the variable."""

    @pytest.mark.parametrize(
        ("variable", "text"),
        [
            ("RULE_SIDECAR_PORT", "abc"),
            ("RULE_SIDECAR_PORT", "80.5"),
            ("RULE_SIDECAR_METRICS_PORT", "metrics"),
            ("HOT_RELOAD_ENABLED", "maybe"),
            ("HOT_RELOAD_VALIDATION_ENABLED", "2"),
            ("HOT_RELOAD_INTERVAL_SECONDS", "soon"),
            ("HOT_RELOAD_MAX_AGE_SECONDS", "5m"),
            ("RULE_SIDECAR_DEBOUNCE_MS", "1.5"),
            ("RULE_SIDECAR_MAX_BODY_BYTES", "1MB"),
            ("RULE_SIDECAR_RELOAD_RATE_PER_MINUTE", "many"),
            ("RULE_SIDECAR_HISTORY_LIMIT", "ten"),
        ],
    )
    def test_unparsable_value(self, variable: str, text: str):
        """A value of the wrong type names the variable and the value."""
        with pytest.raises(SettingsError) as raised:
            settings_from({variable: text})
        assert variable in str(raised.value)
        assert repr(text) in str(raised.value)

    def test_settings_error_is_a_value_error(self):
        """Callers that catch ValueError catch SettingsError too."""
        assert issubclass(SettingsError, ValueError)

    @pytest.mark.parametrize(
        ("variable", "text"),
        [
            ("HOT_RELOAD_INTERVAL_SECONDS", "0"),
            ("HOT_RELOAD_INTERVAL_SECONDS", "-5"),
            ("RULE_SIDECAR_PORT", "70000"),
            ("RULE_SIDECAR_MAX_BODY_BYTES", "100"),
        ],
    )
    def test_out_of_range_value_names_the_variable(self, variable: str, text: str):
        """A parsable value outside its range is refused, naming the variable."""
        with pytest.raises(SettingsError) as raised:
            settings_from({variable: text})
        assert variable in str(raised.value)

    @pytest.mark.parametrize(
        ("variable", "text"),
        [
            ("RULE_SIDECAR_RELOAD_RATE_PER_MINUTE", "0"),
            ("RULE_SIDECAR_HISTORY_LIMIT", "-1"),
            ("RULE_SIDECAR_METRICS_PORT", "70000"),
            ("HOT_RELOAD_INTERVAL_SECONDS", "nan"),
            ("RULE_SIDECAR_LOG_LEVEL", "verbose"),
        ],
    )
    def test_unusable_value_is_refused(self, variable: str, text: str):
        """A value the sidecar cannot run with is a SettingsError naming the variable."""
        with pytest.raises(SettingsError) as raised:
            settings_from({variable: text})
        assert variable in str(raised.value)


README = Path(__file__).parent.parent / "README.md"
# A row of the README's settings table: "| `--flag` / `VARIABLE` ... | default | meaning |"
ROW = re.compile(r"^\| (?P<names>[^|]*`[A-Z_]+[^|]*) \| (?P<default>[^|]*) \| [^|]*\|$", re.M)


def _readme_rows() -> dict[str, tuple[str, str]]:
    """Each variable the README's table names -> (the row's names cell, its default)."""
    rows: dict[str, tuple[str, str]] = {}
    for row in ROW.finditer(README.read_text("utf-8")):
        for variable in re.findall(r"`((?:RULE_SIDECAR|HOT_RELOAD)_[A-Z_]*)`", row["names"]):
            rows[variable] = (row["names"], row["default"].strip())
    return rows


def _shown(value: Any) -> str | None:
    """How the README shows a default; None where it describes it in words."""
    if value is None or value == ():
        return None
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


class TestDeclarations:
    """Each setting is declared once; the variables, the flags, `--help` and the README's
    table all follow from the declarations."""

    @pytest.mark.parametrize("name", [field.name for field in dataclasses.fields(Settings)])
    def test_the_readme_table_gives_every_setting_with_its_flag_and_default(self, name: str):
        """A setting added or changed in `config.py` and not in the README fails here."""
        spec = declaration(name)
        rows = _readme_rows()
        assert spec.variable in rows, f"{spec.variable} is not in the README's settings table"
        names, default = rows[spec.variable]
        if spec.flag is not None:
            assert f"`{spec.flag}" in names, f"the README does not give {spec.flag}"
        shown = _shown(getattr(DEFAULT_SETTINGS, name))
        if shown is not None:
            assert default == shown, f"{spec.variable}: README says {default}, code {shown}"

    def test_the_readme_table_names_no_setting_that_does_not_exist(self):
        """A row left behind by a removed or renamed setting fails here."""
        assert set(_readme_rows()) - set(ENVIRONMENT.values()) == set()

    @pytest.mark.slow  # starts `rule-sidecar serve --help`
    def test_serve_takes_a_flag_for_each_setting_declared_with_one(self):
        """`rule-sidecar serve --help` lists each flag with its variable and default."""
        shown = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "serve", "--help"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "COLUMNS": "400"},
        ).stdout
        options = {
            block.split()[0]: " ".join(block.split())
            for block in re.split(r"\n(?=  -)", shown.split("options:", 1)[1])
            if block.strip()
        }
        assert FLAGS
        for name in FLAGS:
            spec = declaration(name)
            assert spec.flag is not None
            line = options[spec.flag]
            assert f"[{spec.variable}" in line
            default = getattr(DEFAULT_SETTINGS, name)
            if default not in (None, ()):
                assert f"default {default}]" in line

    def test_a_repeated_flag_adds_to_the_list(self, tmp_path: Path):
        """`--rules-dir` may be given several times, each a ':'-separated list like the
        variable; together they replace the variable."""
        args = build_parser().parse_args(
            ["serve", "--rules-dir", "/a", "--rules-dir", f"/b{os.pathsep}/c"]
        )
        assert flag_settings(args, {"RULE_SIDECAR_RULES_DIR": "/env"}).rules_dirs == (
            Path("/a"),
            Path("/b"),
            Path("/c"),
        )

    def test_a_refusal_names_the_flag_and_the_variable(self):
        """The message says both ways the value may have been given."""
        with pytest.raises(SettingsError) as raised:
            settings_from({}, {"rules_dirs": (), "port": -1})
        assert str(raised.value).startswith("--port / RULE_SIDECAR_PORT=-1")


NUMBERS = [f.name for f in dataclasses.fields(Settings) if f.type in ("int", "float", "int | None")]


class TestBounds:
    """Every number has a ceiling: a huge value would disable what it bounds or overflow
    where it is used (found by an outside attack: a history limit of 1e23 crashed `serve`
    with a traceback, a debounce of 1e23 ms made the watcher fail forever)."""

    @pytest.mark.parametrize("name", NUMBERS)
    def test_a_huge_value_is_refused_naming_the_variable(self, name: str):
        """Each numeric setting refuses 10^23 with a SettingsError naming its variable."""
        variable = ENVIRONMENT[name]
        with pytest.raises(SettingsError) as raised:
            settings_from({variable: "99999999999999999999999"})
        assert variable in str(raised.value)

    @pytest.mark.parametrize("text", ["\uff15", "1_000", "\u0663", "0x10", "1 2"])
    def test_only_ascii_digits_are_a_number(self, text: str):
        """`int()` reads full-width and Arabic-Indic digits and underscores: a setting
        does not."""
        with pytest.raises(SettingsError):
            settings_from({"RULE_SIDECAR_PORT": text})
        with pytest.raises(SettingsError):
            settings_from({"HOT_RELOAD_INTERVAL_SECONDS": text})

    @pytest.mark.slow  # starts `rule-sidecar serve`
    def test_a_huge_history_limit_is_refused_by_serve_in_one_line(self):
        """The attacker's reproduction: exit 2 and one line naming the variable."""
        done = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", "serve", "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "RULE_SIDECAR_HISTORY_LIMIT": "99999999999999999999999"},
        )
        assert done.returncode == 2
        assert done.stderr.startswith("rule-sidecar: RULE_SIDECAR_HISTORY_LIMIT=")
        assert "Traceback" not in done.stderr
