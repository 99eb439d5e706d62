"""A small client for applications that query the sidecar over localhost.

It mirrors the seed's integration helpers (`execute_rules_from_registry`,
`get_rules_from_registry`, `validate_registry_rules`, `get_registry_info`,
`is_registry_fresh`) over HTTP, and subscribes to reload events over the WebSocket,
reconnecting by itself and resuming from the last sequence number it saw.

`AsyncRuleClient` is the one implementation. `RuleClient` is its synchronous face for
code without an event loop: it runs the same coroutines on a private loop in a
background thread (never a second copy of the logic).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp

__all__ = ["AsyncRuleClient", "RuleClient", "SidecarError"]

DEFAULT_URL = "http://localhost:8000"
_HOT = "/api/v1/rules/hot-reload"
_T = TypeVar("_T")


class SidecarError(Exception):
    """The sidecar answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body


class AsyncRuleClient:
    """Talks to one sidecar. Use as `async with AsyncRuleClient() as client:`."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 5.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncRuleClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def _request(
        self, method: str, path: str, body: Any = None, *, answers: frozenset[int] = frozenset()
    ) -> Any:
        """The JSON answer; `answers` are error statuses whose body is the answer itself
        (a failed reload's record, an unhealthy health report), not an error."""
        try:
            async with self._client().request(method, self.base_url + path, json=body) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SidecarError(0, f"sidecar at {self.base_url} not reachable: {exc!r}") from exc
        try:
            data = json.loads(text)
        except ValueError:
            raise SidecarError(response.status, f"not a JSON answer: {text[:200]!r}") from None
        if response.status >= 400 and response.status not in answers:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise SidecarError(response.status, error.get("message", response.reason or ""), data)
        return data

    # The seed's helpers

    async def execute_rules_from_registry(self, data: Any, ruleset_id: str | int) -> dict[str, Any]:
        """Evaluate one input: matched, total_points, decision, registry_version, errors."""
        result: dict[str, Any] = await self._request(
            "POST", f"/api/v1/rulesets/{ruleset_id}/evaluate", {"input": data}
        )
        return result

    async def evaluate_many(self, inputs: list[Any], ruleset_id: str | int) -> dict[str, Any]:
        """Evaluate a batch against one registry version."""
        result: dict[str, Any] = await self._request(
            "POST", f"/api/v1/rulesets/{ruleset_id}/evaluate", {"inputs": inputs}
        )
        return result

    async def get_rules_from_registry(
        self, ruleset_id: str | int | None = None, *, include_disabled: bool = False
    ) -> list[dict[str, Any]]:
        path = "/api/v1/rules" + (f"?ruleset_id={ruleset_id}" if ruleset_id is not None else "")
        rules: list[dict[str, Any]] = (await self._request("GET", path))["rules"]
        return [rule for rule in rules if include_disabled or rule["enabled"]]

    async def get_registry_info(self) -> dict[str, Any]:
        """version, revision, rule_count, ruleset_count, last_reload."""
        info: dict[str, Any] = (await self._request("GET", f"{_HOT}/status"))["registry"]
        return info

    async def is_registry_fresh(self, max_age_seconds: float = 300) -> bool:
        """Whether the sidecar read every source successfully, and confirmed what it
        serves, within `max_age_seconds` (whether or not the rules changed)."""
        status = await self._request("GET", f"{_HOT}/status")
        last = status.get("last_successful_check_time")
        if not last:
            return False
        age = datetime.now(UTC) - datetime.fromisoformat(last)
        return age.total_seconds() <= max_age_seconds

    async def validate_registry_rules(self) -> dict[str, Any]:
        """Load every source as a reload would, without publishing: valid, errors."""
        result: dict[str, Any] = await self._request("POST", f"{_HOT}/validate")
        return result

    async def reload(self, *, force: bool = False, validate: bool = True) -> dict[str, Any]:
        """The reload record; a failed reload (HTTP 422) is a record too, with its errors."""
        result: dict[str, Any] = await self._request(
            "POST",
            f"{_HOT}/reload",
            {"force": force, "validate": validate},
            answers=frozenset({422}),
        )
        return result

    async def health(self) -> dict[str, Any]:
        """The health report, also when it says unhealthy (HTTP 503)."""
        health: dict[str, Any] = await self._request(
            "GET", "/health/hot-reload", answers=frozenset({503})
        )
        return health

    # Events

    async def events(
        self, *, instance: str | None = None, last_seq: int | None = None, max_backoff: float = 10.0
    ) -> AsyncIterator[dict[str, Any]]:
        """Every WebSocket message, forever: reconnects with jittered backoff and resumes
        from the last position seen (`instance` and `seq`: a `resync_required` message says
        when that is too old or from before a restart; re-read the registry then)."""
        backoff = 0.1
        while True:
            query = ""
            if instance is not None and last_seq is not None:
                query = f"?instance={instance}&last_seq={last_seq}"
            url = self.base_url.replace("http", "ws", 1) + "/ws/hot-reload" + query
            try:
                async with self._client().ws_connect(url, heartbeat=30.0) as socket:
                    backoff = 0.1
                    async for message in socket:
                        if message.type is not aiohttp.WSMsgType.TEXT:
                            break
                        event: dict[str, Any] = json.loads(message.data)
                        # Every message carries the seq of the last broadcast, so any
                        # of them (a status too) is a point to resume from.
                        last_seq = event.get("seq", last_seq)
                        instance = event.get("instance", instance)
                        yield event
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, max_backoff)


class RuleClient:
    """Synchronous face of `AsyncRuleClient`, for code without an event loop."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 5.0
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rule-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncRuleClient(base_url, token=token, timeout=timeout)

    def __enter__(self) -> RuleClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def execute_rules_from_registry(self, data: Any, ruleset_id: str | int) -> dict[str, Any]:
        return self._run(self._async.execute_rules_from_registry(data, ruleset_id))

    def evaluate_many(self, inputs: list[Any], ruleset_id: str | int) -> dict[str, Any]:
        return self._run(self._async.evaluate_many(inputs, ruleset_id))

    def get_rules_from_registry(
        self, ruleset_id: str | int | None = None, *, include_disabled: bool = False
    ) -> list[dict[str, Any]]:
        return self._run(
            self._async.get_rules_from_registry(ruleset_id, include_disabled=include_disabled)
        )

    def get_registry_info(self) -> dict[str, Any]:
        return self._run(self._async.get_registry_info())

    def is_registry_fresh(self, max_age_seconds: float = 300) -> bool:
        return self._run(self._async.is_registry_fresh(max_age_seconds))

    def validate_registry_rules(self) -> dict[str, Any]:
        return self._run(self._async.validate_registry_rules())

    def reload(self, *, force: bool = False, validate: bool = True) -> dict[str, Any]:
        return self._run(self._async.reload(force=force, validate=validate))

    def health(self) -> dict[str, Any]:
        return self._run(self._async.health())
