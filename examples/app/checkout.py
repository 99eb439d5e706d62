"""An example application: a checkout service that asks its rule-sidecar about every
payment, over localhost, with `sidecar.client`.

- `POST /payments` scores the payment with the sidecar's `payment-fraud` rules and answers
  201 (accepted), 202 (held for review) or 402 (declined), with the matched rules and the
  registry version and revision that decided, so every decision can be traced to rules.
- It follows the sidecar's WebSocket (`AsyncRuleClient.events`, which reconnects and
  resumes by itself): it logs each reload, keeps the version it last heard of, and keeps
  a failed reload's errors until a good reload clears them (`GET /status`). When the
  stream cannot say what was missed (`ResyncRequired`: the sidecar restarted, or the app
  was away too long), it re-reads the version instead of trusting what it kept.
- `GET /healthz` is ready while the sidecar serves rules (healthy or degraded).
- When the sidecar cannot answer, the payment is held for review: a fraud check fails
  closed. (A feature flag would fail open; choose per use.)

Run it beside a sidecar (from the repository root):

    rule-sidecar serve &                          # the bundled rules on 127.0.0.1:8000
    python examples/app/checkout.py               # this app on 127.0.0.1:8080
    curl -s -X POST localhost:8080/payments -d @examples/app/payment.json

Settings: RULE_SIDECAR_URL (default http://127.0.0.1:8000, which the Helm chart and the
manifests in examples/k8s set), CHECKOUT_HOST, CHECKOUT_PORT, RULE_SIDECAR_TOKEN_FILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from sidecar.client import AsyncRuleClient, Event, ResyncRequired, SidecarError

RULESET = "payment-fraud"
OUTCOMES = {
    "allow": (201, "accepted"),
    "review": (202, "held for review"),
    "deny": (402, "declined"),
}

logger = logging.getLogger("checkout")


@dataclass
class RulesSeen:
    """What the WebSocket has told this app about the rules it runs on."""

    version: int | None = None
    revision: str | None = None
    reloads: int = 0
    failed_reload: list[str] = field(default_factory=list)

    def follow(self, event: Event) -> None:
        kind, data = event.event_type, event.data
        if kind == "status":
            self.version = data["registry"]["version"]
            self.revision = data["registry"]["revision"]
        elif kind == "rules_reloaded":
            self.version, self.revision = data["version_after"], data["revision"]
            self.reloads += 1
            self.failed_reload = []
            logger.info("rules reloaded: version %s (%s)", self.version, self.revision)
        elif kind == "reload_failed":
            self.failed_reload = [
                f"{error['file']}:{error['line']}: {error['message']}" for error in data["errors"]
            ]
            logger.warning("a rule change was refused; still on version %s", self.version)

    async def reread(self, client: AsyncRuleClient) -> None:
        """Events were missed and cannot be told: ask for what serves now."""
        info = await client.get_registry_info()
        self.version, self.revision = info["version"], info["revision"]
        logger.warning("rule events were missed; re-read: version %s", self.version)


CLIENT = web.AppKey("client", AsyncRuleClient)
SEEN = web.AppKey("seen", RulesSeen)


async def score_payment(request: web.Request) -> web.Response:
    try:
        payment = await request.json()
    except ValueError:
        return web.json_response({"error": "the body must be a JSON payment"}, status=400)
    try:
        result = await request.app[CLIENT].execute_rules_from_registry(payment, RULESET)
    except SidecarError as exc:
        if exc.status in (400, 422):  # the payment itself is malformed for the rules
            return web.json_response({"error": str(exc)}, status=400)
        logger.error("rule sidecar unavailable (%s): holding the payment for review", exc)
        return web.json_response(
            {"outcome": "held for review", "reason": "rules unavailable"}, status=202
        )
    status, outcome = OUTCOMES[result["decision"]]
    return web.json_response(
        {
            "outcome": outcome,
            "risk_points": result["total_points"],
            "matched": [rule["id"] for rule in result["matched"]],
            "rules_version": result["registry_version"],
            "rules_revision": result["revision"],
        },
        status=status,
    )


async def status(request: web.Request) -> web.Response:
    seen = request.app[SEEN]
    return web.json_response(
        {
            "rules_version": seen.version,
            "rules_revision": seen.revision,
            "reloads_seen": seen.reloads,
            "failed_reload": seen.failed_reload,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    try:
        health = await request.app[CLIENT].health()
    except SidecarError as exc:
        return web.json_response({"ready": False, "reason": str(exc)}, status=503)
    ready = health["status"] != "unhealthy"
    return web.json_response(
        {"ready": ready, "sidecar": health["status"]}, status=200 if ready else 503
    )


async def follow_events(app: web.Application) -> AsyncIterator[None]:
    """Listen to the sidecar's reload events for the app's whole life."""

    async def listen() -> None:
        client, seen = app[CLIENT], app[SEEN]
        last_seq: int | None = None  # with `instance`: where to resume after an error
        instance: str | None = None
        while True:
            try:
                async for event in client.events(last_seq=last_seq, instance=instance):
                    last_seq, instance = event.seq, event.instance
                    if isinstance(event, ResyncRequired):
                        await seen.reread(client)
                    else:
                        seen.follow(event)
            except SidecarError as exc:  # refused, or an answer that is not the sidecar's
                logger.error("rule events unavailable (%s); subscribing again", exc)
                await asyncio.sleep(5)

    task = asyncio.create_task(listen())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await app[CLIENT].close()


def create_app(sidecar_url: str, *, token: str | None = None) -> web.Application:
    app = web.Application()
    app[CLIENT] = AsyncRuleClient(sidecar_url, token=token)
    app[SEEN] = RulesSeen()
    app.cleanup_ctx.append(follow_events)
    app.router.add_post("/payments", score_payment)
    app.router.add_get("/status", status)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token_file = os.environ.get("RULE_SIDECAR_TOKEN_FILE")
    token = Path(token_file).read_text("utf-8").strip() if token_file else None
    app = create_app(os.environ.get("RULE_SIDECAR_URL", "http://127.0.0.1:8000"), token=token)
    host = os.environ.get("CHECKOUT_HOST", "127.0.0.1")
    web.run_app(app, host=host, port=int(os.environ.get("CHECKOUT_PORT", "8080")))


if __name__ == "__main__":
    main()
