"""The agent's HTTP API (aiohttp): /health, /ready, /metrics and POST /calls/{callId}/terminate."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.lifecycle import Resource

log = logging.getLogger("agent.http")

ReadinessProbe = Callable[[], dict[str, bool]]
CallTerminator = Callable[[str], Awaitable[bool]]


class AppServer(Resource):
    """An aiohttp application served on host:port (async context manager); port 0 picks a free one,
    then `bound_port` tells which."""

    def __init__(self, app: web.Application, *, host: str, port: int, name: str) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._name = name
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def open(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self.bound_port = int(self._runner.addresses[0][1])
        log.info("%s on http://%s:%d", self._name, self._host, self.bound_port)

    async def close(self) -> None:
        """Stop serving. Safe to call twice."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


class AgentHttp(AppServer):
    """Serves the agent's HTTP API on host:port (async context manager)."""

    def __init__(
        self, *, host: str, port: int, readiness: ReadinessProbe, terminate_call: CallTerminator | None,
        api_token: str | None,
    ) -> None:
        self._readiness = readiness
        self._terminate_call = terminate_call
        self._token = api_token
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/calls/{call_id}/terminate", self._terminate)
        super().__init__(app, host=host, port=port, name="agent HTTP API")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        parts = self._readiness()
        ready = all(parts.values())
        return web.json_response({"ready": ready, **parts}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _terminate(self, request: web.Request) -> web.Response:
        if self._token is None:
            return web.json_response({"error": "termination endpoint disabled: AGENT_API_TOKEN is not set"}, status=503)
        supplied = request.headers.get("Authorization", "")
        expected = f"Bearer {self._token}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        if self._terminate_call is None:
            return web.json_response({"error": "no telephony connection"}, status=503)
        call_id = request.match_info["call_id"]
        if not call_id or len(call_id) > 128:
            return web.json_response({"error": "field callId: must be 1 to 128 characters"}, status=400)
        if await self._terminate_call(call_id):
            return web.json_response({"terminated": True, "callId": call_id})
        return web.json_response({"error": f"no call with CALL_ID {call_id!r} on this Asterisk"}, status=404)
