"""The floor for `bench.http_load`: a bare aiohttp + uvloop + orjson JSON handler that
reads the request body as JSON and answers a JSON object of about the size of an
evaluate answer, with no routing beyond one route, no middleware and no rules.

    python -m bench._bare_server PORT
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web

ANSWER = {
    "ruleset_id": "bench",
    "registry_version": 1,
    "revision": "0" * 16,
    "decision": "allow",
    "score": 42,
    "matched_rules": [{"id": f"rule-{index}", "points": index} for index in range(6)],
    "errors": [],
}


async def handle(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(
        body=orjson.dumps({**ANSWER, "fields": len(body["input"])}),
        content_type="application/json",
    )


def main() -> None:
    app = web.Application()
    app.router.add_post("/api/v1/rulesets/{ruleset_id}/evaluate", handle)
    app.router.add_get("/readyz", lambda request: web.json_response({"ready": True}))
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
