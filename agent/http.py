"""The agent's HTTP API (aiohttp).

    GET  /health                  the process answers
    GET  /ready                   200 when every way in is connected and the journal can be written (503
                                  otherwise); the body also reports the store and the cache
    GET  /metrics                 Prometheus
    POST /calls/{callId}/hangup   end the call whose CALL_ID is callId (bearer token); `/terminate` is the
                                  old name of the same endpoint, kept for existing callers
    POST /calls                   the dial guard: check the number (failing closed), then originate to the
                                  endpoint built from that number (OPTOUT_DIAL_ENDPOINT, agent/dial_guard.py)

Every error answer is JSON `{"error": "..."}` naming the field and the problem where there is one. Every
identifier (callId, campaignId, contactId, the path's callId, variable values) must pass the identifier rule
(agent/optout.py): it is set on the channel, where Asterisk's dialplan would re-read a `,` or a line break.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.constants import Origin
from agent.dial_guard import DialGuard, Verdict, dial_endpoint, dial_template_problem
from agent.errors import ConfigError, TelephonyError
from agent.lifecycle import Resource
from agent.optout import ID_MAX, HangupInfo, id_problem, text_problem

log = logging.getLogger("agent.http")

Probe = Callable[[], dict[str, bool]]
CallHangup = Callable[[str], Awaitable[list[HangupInfo]]]
Originate = Callable[[str, dict[str, str], str | None], Awaitable[str]]
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ENDPOINT = re.compile(r"[A-Za-z0-9_-]{1,32}/\S{1,255}")
RESERVED_VARIABLES = frozenset({"CALL_ID", "CAMPAIGN_ID", "CONTACT_ID", "OPTOUT_NUMBER"})


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


def answer(code: int, /, **body: Any) -> web.Response:
    return web.json_response(body, status=code)


class CallRequest(BaseModel):
    """The body of `POST /calls`."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    number: str = Field(max_length=64)
    endpoint: str | None = Field(default=None, max_length=300)
    """Optional: the endpoint is built from the checked number; one sent must be that same endpoint."""
    call_id: str | None = Field(default=None, alias="callId", max_length=ID_MAX)
    campaign_id: str | None = Field(default=None, alias="campaignId", max_length=ID_MAX)
    contact_id: str | None = Field(default=None, alias="contactId", max_length=ID_MAX)
    caller_id: str | None = Field(default=None, alias="callerId", max_length=128)
    variables: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("number", "endpoint", "caller_id")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and (problem := text_problem(value, 300)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("call_id", "campaign_id", "contact_id")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and (problem := id_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENDPOINT.fullmatch(value):
            raise ValueError("must look like TECH/RESOURCE, e.g. PJSIP/+15551234567@trunk")
        return value

    @field_validator("variables")
    @classmethod
    def _variables(cls, value: dict[str, str]) -> dict[str, str]:
        for name, var in value.items():
            if not _VARIABLE.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not a channel variable name")
            if name in RESERVED_VARIABLES:
                raise ValueError(f"{name} is set by the agent from the body's own fields")
            if var and (problem := id_problem(var, 1024)) is not None:
                raise ValueError(f"{name} {problem}")
        return value


def _field_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    return f"field {loc}: {err['msg'].lower().removeprefix('value error, ')}"


class AgentHttp(AppServer):
    """Serves the agent's HTTP API on host:port (async context manager)."""

    def __init__(
        self, *, host: str, port: int, readiness: Probe, advisory: Probe | None = None,
        hang_up_call: CallHangup | None = None, originate: Originate | None = None, guard: DialGuard | None = None,
        api_token: str | None, dial_endpoint: str | None = None,
    ) -> None:
        """`dial_endpoint`: OPTOUT_DIAL_ENDPOINT, the template `POST /calls` dials through (unset: it answers
        503). Raises ConfigError when it is not a usable template."""
        if dial_endpoint is not None and (problem := dial_template_problem(dial_endpoint)) is not None:
            raise ConfigError(f"OPTOUT_DIAL_ENDPOINT {dial_endpoint!r} {problem}")
        self._dial_endpoint = dial_endpoint
        self._readiness = readiness
        self._advisory = advisory
        self._hang_up_call = hang_up_call
        self._originate = originate
        self._guard = guard
        self._token = api_token
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/calls/{call_id}/hangup", self._hangup)
        app.router.add_post("/calls/{call_id}/terminate", self._hangup)
        app.router.add_post("/calls", self._place_call)
        super().__init__(app, host=host, port=port, name="agent HTTP API")

    async def _health(self, request: web.Request) -> web.Response:
        return answer(200, status="ok")

    async def _ready(self, request: web.Request) -> web.Response:
        parts = self._readiness()
        ready = all(parts.values())
        extra = self._advisory() if self._advisory is not None else {}
        return answer(200 if ready else 503, ready=ready, **parts, **extra)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _refused(self, request: web.Request) -> web.Response | None:
        """401/503 unless the request carries the bearer token."""
        if self._token is None:
            return answer(503, error="this endpoint is off: AGENT_API_TOKEN is not set")
        supplied = request.headers.get("Authorization", "")
        expected = f"Bearer {self._token}"
        if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), expected.encode()):
            return answer(401, error="missing or wrong bearer token")
        return None

    async def _hangup(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        if self._hang_up_call is None:
            return answer(503, error="no telephony connection that can hang up calls (ARI is off)")
        call_id = request.match_info["call_id"]
        if (problem := id_problem(call_id)) is not None:
            return answer(400, error=f"field callId: {problem}")
        results = await self._hang_up_call(call_id)
        if not results:
            return answer(404, error=f"no call with CALL_ID {call_id!r} on this Asterisk")
        if any(r.result in ("ok", "gone") for r in results):
            return answer(200, hungUp=True, callId=call_id, channels=len(results))
        return answer(502, error=f"Asterisk did not hang up call {call_id!r}: {results[0].result}")

    async def _place_call(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        if self._guard is None or self._originate is None:
            return answer(503, error="no telephony connection that can place calls (ARI is off)")
        if self._dial_endpoint is None:
            return answer(503, error="placing calls needs OPTOUT_DIAL_ENDPOINT (the endpoint the checked number is "
                                     "dialled through, e.g. PJSIP/{number}@trunk)")
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            return answer(400, error="body: not JSON")
        if not isinstance(body, dict):
            return answer(400, error=f"body: expected a JSON object, got {type(body).__name__}")
        try:
            call = CallRequest.model_validate(body)
        except ValidationError as exc:
            return answer(400, error=_field_error(exc))
        call_id = call.call_id or f"call-{uuid.uuid4().hex}"
        verdict = await self._guard.check(call.number, via=Origin.ARI, call_id=call_id, campaign_id=call.campaign_id,
                                          contact_id=call.contact_id)
        if verdict.verdict is Verdict.BLACKLISTED:
            return answer(409, error="blacklisted", callId=call_id)
        if verdict.verdict is Verdict.INVALID:
            return answer(400, error=verdict.problem)
        if verdict.verdict is Verdict.UNKNOWN or verdict.number is None:
            return answer(503, error="the blacklist cannot be checked now; no call was placed")
        endpoint = dial_endpoint(self._dial_endpoint, verdict.number)
        if call.endpoint is not None and call.endpoint != endpoint:
            return answer(400, error=f"field endpoint: {call.endpoint!r} is not the endpoint of the checked number "
                                     f"({endpoint!r}); leave it out: the guard dials the number it checked")
        variables = {**call.variables, "CALL_ID": call_id, "OPTOUT_NUMBER": verdict.number}
        variables.update({k: v for k, v in (("CAMPAIGN_ID", call.campaign_id), ("CONTACT_ID", call.contact_id)) if v})
        try:
            channel_id = await self._originate(endpoint, variables, call.caller_id)
        except TelephonyError as exc:
            status = 400 if "HTTP 400" in str(exc) else 502
            return answer(status, error=f"field endpoint: {exc}" if status == 400 else str(exc))
        return answer(201, callId=call_id, channelId=channel_id)
