"""The FastAGI agent: Asterisk's `AGI(agi://AGI_HOST:AGI_PORT/<script>)` connects here.

Scripts (the dialplan in `dialplan/optout-ivr.conf` and `optout-precheck.conf` calls them):
- `optout`: the caller pressed the opt-out digit. Hang up (AGI `HANGUP`) together with the journal write and
  record the opt-out (origin agi). The call is ended even when recording fails.
- `precheck`: `SET VARIABLE OPTOUT_BLOCKED 1|0` for the number in argument 1 (else channel variable
  OPTOUT_NUMBER). An invalid or missing number answers 1 (blocked: nobody can show it is clear). When the
  lookup fails the variable is left unset, and the dialplan applies its policy: blocked (fail closed) unless
  the global OPTOUT_PRECHECK_FAIL_OPEN=1.

panoramisk's `Application` (the design's library) keeps the routes and its `Request` sends the commands, but
its connection handler is replaced: the stock one spins forever on a client that closes before the blank line
ending the headers, reads without a size or time limit, breaks on bytes that are not UTF-8 and swallows
cancellation. Here every connection has a header deadline and size limit, every command a timeout, and every
error is contained to its connection (logged, socket closed); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from panoramisk.fast_agi import Application, Request

from agent import metrics
from agent.constants import Origin
from agent.errors import InvalidPhoneNumber, JournalError, OptOutError, TelephonyError
from agent.lifecycle import Resource
from agent.optout import HangupInfo, OptOutRecord
from agent.phone import mask
from agent.pipeline import OptOutPipeline
from agent.precheck import BlacklistChecker
from agent.telephony import CHANNEL_VARS, ChannelFacts, call_record

log = logging.getLogger("agent.agi")

MAX_HEADER_LINES = 128
MAX_LINE_BYTES = 4096
Route = Callable[[Request], Awaitable[None]]


class AgiProtocolError(TelephonyError):
    """The peer broke the FastAGI protocol: garbage, no script, closed mid-command, or too slow."""


class GuardedApplication(Application):  # type: ignore[misc] # panoramisk ships no types
    """panoramisk's Application with a connection handler that contains every failure to its connection."""

    def __init__(self, *, header_timeout: float, command_timeout: float, max_connections: int) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.header_timeout = header_timeout
        self.command_timeout = command_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self.connections: set[asyncio.Task[Any]] = set()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)
        peer = writer.get_extra_info("peername")
        script = None
        try:
            if self._slots.locked():
                log.error("FastAGI connection refused: %d connections already open", len(self.connections))
                return
            async with self._slots:
                headers = await asyncio.wait_for(read_headers(reader), self.header_timeout)
                script = (headers.get("agi_network_script") or "").split("?", 1)[0].strip("/")
                if not script:
                    raise AgiProtocolError("no agi_network_script in the request")
                route = self._route.get(script)
                if route is None:
                    raise AgiProtocolError(f"no FastAGI script named {script!r} (known: {', '.join(self._route)})")
                await route(Request(self, headers, reader, writer, encoding=self.default_encoding))
        except (AgiProtocolError, TimeoutError, ConnectionError) as exc:
            log.warning("FastAGI request refused or cut short: %s", exc or type(exc).__name__,
                        extra={"peer": str(peer), "script": script})
        except Exception:
            log.exception("FastAGI script failed", extra={"peer": str(peer), "script": script})
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self.connections.discard(task)


async def read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    """The `agi_*: value` lines up to the blank line. Raises AgiProtocolError on anything else."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        try:
            raw = await reader.readline()
        except ValueError as exc:  # StreamReader's limit: a line longer than MAX_LINE_BYTES
            raise AgiProtocolError("FastAGI header line too long") from exc
        if not raw.endswith(b"\n"):
            raise AgiProtocolError("connection closed before the end of the FastAGI headers")
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise AgiProtocolError("FastAGI headers are not UTF-8") from exc
        if not line:
            return headers
        key, sep, value = line.partition(": ")
        if not sep or not key.startswith("agi_"):
            raise AgiProtocolError(f"not a FastAGI header line: {line[:60]!r}")
        headers[key] = value
    raise AgiProtocolError(f"more than {MAX_HEADER_LINES} FastAGI header lines")


async def command(request: Request, line: str, *, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """Send one AGI command; its parsed `200` result. Raises AgiProtocolError on a failure or a closed socket."""
    try:
        result: dict[str, Any] = await asyncio.wait_for(request.send_command(line), timeout)
    except ValueError as exc:  # panoramisk parses an empty line (the socket closed) as int('')
        raise AgiProtocolError(f"connection closed during {line.split()[0]}") from exc
    except TimeoutError as exc:
        raise AgiProtocolError(f"no answer to {line.split()[0]} within {timeout}s") from exc
    if "error" in result:
        raise AgiProtocolError(f"{line.split()[0]} failed: {result['error']} {result.get('msg', '')}".strip())
    return result


async def get_variable(request: Request, name: str, *, timeout: float) -> str | None:  # noqa: ASYNC109
    """A channel variable (None when unset)."""
    result = await command(request, f"GET VARIABLE {name}", timeout=timeout)
    value, data = result.get("result", ("0", ""))
    return str(data) if value == "1" and data else None


def agi_args(headers: dict[str, str]) -> list[str]:
    """agi_arg_1, agi_arg_2, ... in order."""
    out = []
    for i in range(1, 64):
        value = headers.get(f"agi_arg_{i}")
        if value is None:
            break
        out.append(value)
    return out


class AgiServer(Resource):
    """The FastAGI server (async context manager): scripts `optout` and `precheck`."""

    def __init__(
        self, *, host: str, port: int, digit: str, region: str, pipeline: OptOutPipeline,
        checker: BlacklistChecker, header_timeout: float = 5.0, command_timeout: float = 2.0,
        check_timeout: float = 2.0, max_connections: int = 512,
    ) -> None:
        self._host = host
        self._port = port
        self._digit = digit
        self._region = region
        self._pipeline = pipeline
        self._checker = checker
        self._header_timeout = header_timeout
        self._command_timeout = command_timeout
        self._check_timeout = check_timeout
        self._max_connections = max_connections
        self._app: GuardedApplication | None = None
        self._server: asyncio.Server | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def open(self) -> None:
        """Listen on host:port. Raises TelephonyError when the port cannot be bound."""
        app = GuardedApplication(header_timeout=self._header_timeout, command_timeout=self._command_timeout,
                                 max_connections=self._max_connections)
        app.add_route("optout", self._optout)
        app.add_route("precheck", self._precheck)
        try:
            self._server = await asyncio.start_server(app.handler, self._host, self._port, limit=MAX_LINE_BYTES)
        except OSError as exc:
            raise TelephonyError(f"FastAGI cannot listen on {self._host}:{self._port}: {exc}") from exc
        self._app = app
        metrics.CONNECTED.labels("agi").set(1)
        log.info("FastAGI listening", extra={"host": self._host, "port": self._port})

    async def stop_accepting(self) -> None:
        """Stop taking new connections; the open ones go on."""
        if self._server is not None:
            self._server.close()
        metrics.CONNECTED.labels("agi").set(0)

    async def drain(self, within: float) -> None:
        """Wait for the open connections (their opt-outs) to finish."""
        if self._app is not None and self._app.connections:
            await asyncio.wait(list(self._app.connections), timeout=within)

    async def close(self) -> None:
        """Stop listening and cut the connections still open. Safe to call twice."""
        await self.stop_accepting()
        server, self._server = self._server, None
        if self._app is not None:
            for task in list(self._app.connections):
                task.cancel()
            if self._app.connections:
                await asyncio.wait(list(self._app.connections), timeout=2.0)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    # --- optout ----------------------------------------------------------------------------------
    async def _optout(self, request: Request) -> None:
        received_at = datetime.now(UTC)
        headers: dict[str, str] = request.headers
        hangup_started = False

        async def terminate() -> HangupInfo:
            nonlocal hangup_started
            hangup_started = True
            return await self._hangup(request, received_at)

        try:
            record = await self._record_of(request, headers, received_at)
        except (AgiProtocolError, OptOutError, ValueError) as exc:
            log.error("opt-out press could not be turned into a record; hanging up anyway: %s", exc,
                      extra={"uniqueid": headers.get("agi_uniqueid")})
            record = None
        try:
            if record is not None:
                await self._pipeline.submit(record, terminate=terminate)
        except JournalError as exc:
            log.critical("opt-out could not be journaled: %s", exc, extra={"event_id": record and record.event_id})
        finally:
            # The pipeline skips the hangup for an event already in flight (e.g. ARI saw the same press).
            if not hangup_started:
                await self._hangup(request, received_at)

    async def _record_of(self, request: Request, headers: dict[str, str], received_at: datetime) -> OptOutRecord:
        uniqueid = headers.get("agi_uniqueid")
        if not uniqueid:
            raise AgiProtocolError("no agi_uniqueid in the request")
        variables: dict[str, str] = {}
        for arg in agi_args(headers):
            name, sep, value = arg.partition("=")
            if sep and name in CHANNEL_VARS and value:
                variables[name] = value
        for name in CHANNEL_VARS:
            if name not in variables:
                found = await get_variable(request, name, timeout=self._command_timeout)
                if found:
                    variables[name] = found
        facts = ChannelFacts(
            uniqueid=uniqueid, name=headers.get("agi_channel", ""), variables=variables,
            caller_number=_known(headers.get("agi_callerid")), exten=_known(headers.get("agi_extension")),
            context=headers.get("agi_context"),
        )
        # AGI gives no time of the press itself; the connection's arrival is the nearest we know.
        return call_record(facts, origin=Origin.AGI, digit=self._digit, pressed_at=None, region=self._region,
                           received_at=received_at)

    async def _hangup(self, request: Request, received_at: datetime) -> HangupInfo:
        requested = datetime.now(UTC)
        try:
            result = await command(request, "HANGUP", timeout=self._command_timeout)
        except AgiProtocolError as exc:
            log.error("AGI HANGUP failed: %s", exc, extra={"uniqueid": request.headers.get("agi_uniqueid")})
            return HangupInfo(requested_at=requested, method="agi", result=f"error: {exc}"[:200])
        answered = datetime.now(UTC)
        metrics.PRESS_TO_HANGUP.labels("agi").observe((answered - received_at).total_seconds())
        ok = result.get("result", ("", ""))[0] == "1"
        return HangupInfo(requested_at=requested, hungup_at=answered if ok else None, method="agi",
                          result="ok" if ok else "gone")

    # --- precheck --------------------------------------------------------------------------------
    async def _precheck(self, request: Request) -> None:
        started = time.perf_counter()
        args = agi_args(request.headers)
        raw: str | None = args[0].strip() if args and args[0].strip() else None
        if raw is None:
            raw = await get_variable(request, "OPTOUT_NUMBER", timeout=self._command_timeout)
        blocked: bool | None
        if not raw:
            log.warning("precheck without a number: answering blocked",
                        extra={"uniqueid": request.headers.get("agi_uniqueid")})
            blocked = True
        else:
            try:
                [e164] = self._checker.normalise([raw])
                [blocked] = await asyncio.wait_for(self._checker.check([e164]), self._check_timeout)
            except InvalidPhoneNumber as exc:
                log.warning("precheck of an invalid number %s: answering blocked (%s)", mask(raw), exc.problem)
                blocked = True
            except (OptOutError, TimeoutError) as exc:
                # Leave OPTOUT_BLOCKED unset: the dialplan then applies OPTOUT_PRECHECK_FAIL_OPEN (closed by default).
                log.error("precheck of %s could not be answered: %s", mask(raw), exc or "timeout")
                blocked = None
        if blocked is not None:
            await command(request, f"SET VARIABLE OPTOUT_BLOCKED {1 if blocked else 0}",
                          timeout=self._command_timeout)
        log.debug("precheck answered in %.1f ms", (time.perf_counter() - started) * 1000,
                  extra={"blocked": blocked})


def _known(value: str | None) -> str | None:
    return None if not value or value in ("unknown", "<unknown>") else value
