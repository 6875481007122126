"""Ending a call from the bridge: `POST {ASTERISK_WORKER_URL}/calls/{callId}/hangup` on the worker's agent.

Non-critical: the opt-out is durable whether or not the call could be ended, so `hang_up` never raises; it
reports what happened as a HangupInfo, which the pipeline writes into the audit row.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx

from agent.optout import HangupInfo, utcnow

log = logging.getLogger("sns_bridge.hangup")

METHOD = "worker-api"


class WorkerHangup:
    """Asks the agent next to the Asterisk worker to hang a call up. The httpx client is the caller's."""

    def __init__(self, *, base_url: str, token: str | None, client: httpx.AsyncClient, timeout: float = 1.5) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = client
        self._timeout = timeout

    async def hang_up(self, call_id: str) -> HangupInfo:
        """Hang up call `call_id`. Never raises: failures come back as `result="error: ..."`."""
        url = f"{self._base}/calls/{quote(call_id, safe='')}/hangup"
        requested_at = utcnow()
        try:
            response = await self._client.post(url, headers=self._headers, timeout=self._timeout)
        except httpx.HTTPError as exc:
            log.warning("hanging up call %s through %s failed: %r", call_id, self._base, exc)
            return HangupInfo.failed(METHOD, exc, requested_at=requested_at)
        if response.status_code == 200:
            return HangupInfo(requested_at=requested_at, hungup_at=utcnow(), method=METHOD, result="ok")
        if response.status_code == 404:
            return HangupInfo(requested_at=requested_at, method=METHOD, result="not-found")
        log.warning("hanging up call %s: the worker answered HTTP %d", call_id, response.status_code)
        return HangupInfo(requested_at=requested_at, method=METHOD, result=f"error: HTTP {response.status_code}")
