"""The examples: the checkout application against a real sidecar, and the Kubernetes
manifests (kustomize rendered by `kubectl kustomize`, validated like the chart)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

pytest.register_assert_rewrite("server_support")

from server_support import Sidecar, eventually, free_port  # noqa: E402

from sidecar.testing import ConfigMapDir  # noqa: E402

pytest_plugins = ["server_support"]

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
