"""The examples: the checkout application against a real sidecar, and the Kubernetes
manifests (kustomize rendered by `kubectl kustomize`, validated like the chart)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from kube_support import (
    KUBERNETES_VALIDATE,
    find_tool,
    kubernetes_versions,
    validate_strict,
)
from server_support import Sidecar, command, eventually, free_port

from sidecar.cli import main
from sidecar.config import ENVIRONMENT, settings_from
from sidecar.sources.kubernetes import SERVICE_ACCOUNT_NAMESPACE
from sidecar.testing import ConfigMapDir

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PAYMENT = json.loads((EXAMPLES / "app" / "payment.json").read_text("utf-8"))
FRAUD_RULES = (EXAMPLES / "rules" / "payment-fraud.yaml").read_text("utf-8")


def fraud_rules(high_amount_points: int) -> str:
    """payment-fraud with another weight for `pf.high-amount`, and without its embedded
    tests (they pin today's weights: the sidecar would refuse the change, rightly)."""
    doc = yaml.safe_load(FRAUD_RULES)
    (rule,) = [rule for rule in doc["spec"]["rules"] if rule["id"] == "pf.high-amount"]
    rule["points"] = high_amount_points
    del doc["spec"]["tests"]
    return yaml.safe_dump(doc, sort_keys=False)


def load_checkout() -> ModuleType:
    """examples/app/checkout.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("checkout", EXAMPLES / "app" / "checkout.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


checkout = load_checkout()


class TestCheckoutApp:
    @pytest.fixture
    async def rules(self, tmp_path: Path) -> ConfigMapDir:
        mount = ConfigMapDir(tmp_path / "configmap")
        mount.publish({"payment-fraud.yaml": FRAUD_RULES})
        return mount

    @pytest.fixture
    async def sidecar(self, start_sidecar, rules: ConfigMapDir) -> Sidecar:
        sidecar: Sidecar = await start_sidecar(rules.root, monitor=True)
        return sidecar

    @pytest.fixture
    async def app(self, aiohttp_client, sidecar: Sidecar) -> Any:
        return await aiohttp_client(checkout.create_app(str(sidecar.client.make_url(""))))

    @staticmethod
    async def pay(app: Any) -> tuple[int, dict[str, Any]]:
        response = await app.post("/payments", json=PAYMENT)
        return response.status, await response.json()

    @staticmethod
    def seen(app: Any) -> Callable[[], Any]:
        async def status() -> dict[str, Any]:
            response = await app.get("/status")
            body: dict[str, Any] = await response.json()
            return body

        return status

    async def test_decisions_follow_rule_changes(self, app: Any, rules: ConfigMapDir):
        """The example payment is held for review; after a ConfigMap swap that raises a
        rule's points it is declined, and the app heard of the new version by WebSocket."""
        status, body = await self.pay(app)
        assert (status, body["outcome"]) == (202, "held for review")
        assert body["matched"] == ["pf.high-amount", "pf.ip-card-country-mismatch"]
        assert body["rules_version"] == 1
        await eventually(
            lambda: self._version(app, 1), message="the app heard the status on connect"
        )
        rules.publish({"payment-fraud.yaml": fraud_rules(60)})
        seen = await eventually(lambda: self._version(app, 2), message="rules_reloaded heard")
        assert seen["reloads_seen"] == 1
        status, body = await self.pay(app)
        assert (status, body["outcome"], body["risk_points"]) == (402, "declined", 75)
        assert body["rules_revision"] == seen["rules_revision"]

    async def test_a_refused_change_is_remembered_until_fixed(self, app: Any, rules: ConfigMapDir):
        """A broken change reaches the app as reload_failed with its location; payments
        are still decided by the last good rules; a good change clears it."""
        await eventually(lambda: self._version(app, 1), message="status on connect")
        rules.publish(
            {"payment-fraud.yaml": FRAUD_RULES.replace("input.amount >= 2000", "input.amount >=")}
        )
        seen = await eventually(lambda: self._failed(app), message="reload_failed heard")
        (error,) = seen["failed_reload"]
        assert error.startswith(f"{rules.root / 'payment-fraud.yaml'}:54: condition does not")
        status, body = await self.pay(app)
        assert (status, body["rules_version"]) == (202, 1)
        rules.publish({"payment-fraud.yaml": fraud_rules(26)})
        seen = await eventually(lambda: self._version(app, 2), message="fixed")
        assert seen["failed_reload"] == []

    async def test_healthz_reflects_the_sidecar(self, app: Any):
        """Ready while the sidecar serves rules."""
        response = await app.get("/healthz")
        assert response.status == 200
        assert (await response.json()) == {"ready": True, "sidecar": "healthy"}

    async def test_without_a_sidecar_payments_are_held(self, aiohttp_client):
        """Fail closed: nobody at the sidecar's address holds the payment for review and
        makes the app unready."""
        app = await aiohttp_client(checkout.create_app(f"http://127.0.0.1:{free_port()}"))
        status, body = await self.pay(app)
        assert (status, body) == (
            202,
            {"outcome": "held for review", "reason": "rules unavailable"},
        )
        assert (await app.get("/healthz")).status == 503

    async def test_a_malformed_payment_is_the_caller_s_fault(self, app: Any):
        """A body that is not JSON is a 400, not a hold."""
        response = await app.post("/payments", data=b"{not json")
        assert response.status == 400

    @classmethod
    async def _version(cls, app: Any, version: int) -> dict[str, Any] | None:
        seen: dict[str, Any] = await cls.seen(app)()
        return seen if seen["rules_version"] == version else None

    @classmethod
    async def _failed(cls, app: Any) -> dict[str, Any] | None:
        seen: dict[str, Any] = await cls.seen(app)()
        return seen if seen["failed_reload"] else None


K8S = EXAMPLES / "k8s"
KUBECTL = find_tool("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="no kubectl: run `bash .ci/install-kube-tools` or set KUBECTL"
)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`: what Argo CD or Flux would apply."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents if doc["kind"] == kind]
    return found


def sidecar_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec = one(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "rule-sidecar"]
    return container


def env_settings(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container["env"]}


OVERLAYS = {"base": K8S / "base", "api-source": K8S / "overlays" / "api-source"}


class TestKubernetesExample:
    def test_rules_are_the_bundled_ones(self):
        """The GitOps copy of payment-fraud is the bundled file (but for its schema path)."""
        copy = (K8S / "base" / "rules" / "payment-fraud.yaml").read_text("utf-8")
        assert copy.splitlines()[1:] == FRAUD_RULES.splitlines()[1:]
        assert (
            (K8S / "base" / "rules" / copy.split("$schema=")[1].splitlines()[0]).resolve().exists()
        )

    def test_the_ci_it_prescribes_passes(self):
        """Every `rule-sidecar` step of ci/rules.yaml passes on the example's rules."""
        workflow = yaml.safe_load((K8S / "ci" / "rules.yaml").read_text("utf-8"))
        steps = [step["run"] for step in workflow["jobs"]["check"]["steps"] if "run" in step]
        checks = [step for step in steps if step.startswith("rule-sidecar ")]
        assert [check.split()[1] for check in checks] == ["validate", "test"]
        for check in checks:
            result = subprocess.run(
                [*command(), *check.split()[1:]],
                cwd=K8S,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr

    @needs_kubectl
    def test_stable_config_map_name(self):
        """disableNameSuffixHash: the ConfigMap keeps its name, so a rule change updates it
        in place (no new pod template, no rollout), and it carries the API source label."""
        documents = kustomize(OVERLAYS["base"])
        rules = one(documents, "ConfigMap")
        assert rules["metadata"]["name"] == "checkout-rules"
        assert rules["metadata"]["namespace"] == "checkout"
        assert rules["metadata"]["labels"] == {"rule-sidecar/rules": "checkout"}
        assert set(rules["data"]) == {"payment-fraud.yaml"}
        spec = one(documents, "Deployment")["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "rules"]
        assert volume["configMap"] == {"name": "checkout-rules"}
        mount = {m["name"]: m for m in sidecar_container(documents)["volumeMounts"]}["rules"]
        assert "subPath" not in mount
        settings = settings_from(env_settings(sidecar_container(documents)))
        assert settings.rules_dirs == (Path(mount["mountPath"]),)

    @needs_kubectl
    def test_the_config_map_holds_valid_rules(self, tmp_path: Path):
        """What kustomize puts in the ConfigMap passes `rule-sidecar validate`."""
        rules = one(kustomize(OVERLAYS["base"]), "ConfigMap")
        for name, text in rules["data"].items():
            (tmp_path / name).write_text(text, encoding="utf-8")
        assert main(["validate", str(tmp_path)]) == 0

    @needs_kubectl
    def test_api_source_overlay(self):
        """The overlay reads through the API: its selector matches the ConfigMap, nothing
        mounts the rules, and the pod runs as an account that may read ConfigMaps, whose
        token only the sidecar mounts (the pod automounts none into the application)."""
        documents = kustomize(OVERLAYS["api-source"])
        container = sidecar_container(documents)
        env = env_settings(container)
        assert ENVIRONMENT["rules_dirs"] not in env
        settings = settings_from(env)
        key, value = (settings.kubernetes_selector or "").split("=")
        assert one(documents, "ConfigMap")["metadata"]["labels"][key] == value
        assert settings.kubernetes_events is True
        token_dir = str(SERVICE_ACCOUNT_NAMESPACE.parent)
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp", token_dir}
        spec = one(documents, "Deployment")["spec"]["template"]["spec"]
        assert sorted(v["name"] for v in spec["volumes"]) == ["kube-api-access", "tmp"]
        (access,) = [v["projected"] for v in spec["volumes"] if v["name"] == "kube-api-access"]
        assert [next(iter(source)) for source in access["sources"]] == [
            "serviceAccountToken",
            "configMap",
            "downwardAPI",
        ]
        assert spec["serviceAccountName"] == one(documents, "ServiceAccount")["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        assert one(documents, "ServiceAccount")["automountServiceAccountToken"] is False
        for other in spec["containers"]:
            if other is not container:
                assert token_dir not in {m["mountPath"] for m in other.get("volumeMounts", [])}
        role = one(documents, "Role")
        verbs = {r: rule["verbs"] for rule in role["rules"] for r in rule["resources"]}
        assert sorted(verbs["configmaps"]) == ["get", "list", "watch"]
        assert verbs["events"] == ["create"]

    @needs_kubectl
    @pytest.mark.skipif(KUBERNETES_VALIDATE is None, reason="kubernetes-validate not installed")
    @pytest.mark.parametrize("version", kubernetes_versions())
    @pytest.mark.parametrize("overlay", sorted(OVERLAYS))
    def test_manifests_validate(self, overlay: str, version: str, tmp_path: Path):
        """Both renderings pass `kubernetes-validate --strict` (oldest and newest)."""
        validate_strict(kustomize(OVERLAYS[overlay]), version, tmp_path)
