"""The FastAGI way in: Asterisk's `AGI(agi://AGI_HOST:AGI_PORT/<script>)` connects here.

Scripts (the dialplan in `dialplan/optout-ivr.conf` and `optout-precheck.conf` calls them):
- `optout`: the caller pressed the opt-out digit. The channel's facts (AGI headers, `NAME=value`
  arguments, `GET VARIABLE` for what is missing) go to the intake (agent/intake.py), which journals the
  opt-out and ends the call with the AGI `HANGUP` command on this connection.
- `precheck`: the dial guard (agent/dial_guard.py) for the number in argument 1 (else the channel variable
  OPTOUT_NUMBER): `SET VARIABLE OPTOUT_BLOCKED 1|0`. An invalid or missing number answers 1 (blocked: nobody
  can show it is clear). When the lookup fails the variable is left unset, and the dialplan applies its
  policy: blocked (fail closed) unless the global OPTOUT_PRECHECK_FAIL_OPEN=1.

panoramisk's `Application` (the design's library) keeps the routes and its `Request` sends the commands,
but what it gets wrong is replaced here:
- its connection handler spins forever on a client that closes before the blank line ending the headers,
  reads without a size or time limit, refuses bytes that are not UTF-8 (a Latin-1 caller name) and swallows
  cancellation: here every connection has a header deadline and size limit, a line that is not UTF-8 is
  read as Latin-1, and every error is contained to its connection;
- its reply parser turns Asterisk's asynchronous `HANGUP` notice (the caller hung up) into an error: here
  the notice is noted and the command's own reply is read after it.
A press is never lost for a failed `GET VARIABLE` (the record keeps what is known) and never refused for
lack of connection slots: slow peers that have not finished their headers make room for new ones, and a
connection whose headers have arrived (read, or waiting in its buffer) is never the one cut off. The
connection limit defaults to the process's open-file limit (RLIMIT_NOFILE, soft) less FD_HEADROOM
descriptors kept for everything else (database pool, Redis, ARI, AMI, the journal, HTTP).

Arguments. Asterisk splits `AGI(url,arg1,arg2,...)` with its standard application-argument parser after
substituting variables: on `,` outside double quotes, parentheses and square brackets, removing `"` and
treating `\\` as an escape; each argument is then sent verbatim as an `agi_arg_N: value` header line,
so a CR or LF in a value starts a new header. A variable holding `,` `"` `(` `[` `\\` or a line break
therefore re-shapes the arguments. The shipped dialplan passes each value base64-encoded behind a `.`
(`NAME:b64=${BASE64_ENCODE(.${NAME})}`; the `.` keeps BASE64_ENCODE from warning on an empty value), which no
parser can split. Plain `NAME=value` arguments are still read (custom dialplans), and a name given twice
(by either form), or an `agi_arg_N` header sent twice, is refused, never silently overridden: none of that
request's arguments is trusted and every value is read from the channel with `GET VARIABLE`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import resource
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from panoramisk.fast_agi import Application, Request
from panoramisk.utils import parse_agi_result

from agent import metrics
from agent.constants import Origin
from agent.dial_guard import DialGuard, Verdict
from agent.errors import AgiProtocolError, TelephonyError
from agent.intake import Intake
from agent.lifecycle import Resource, within
from agent.optout import HangupInfo
from agent.telephony import CHANNEL_VARS, REMOTE_URI, REQUEST_URI, ChannelFacts, dialled_number, known

log = logging.getLogger("agent.agi")
PRECHECK_NAMES = (*CHANNEL_VARS, "NUMBER")
"""The precheck's `NAME=` arguments: the number to check, and the call's ids."""

MAX_HEADER_LINES = 128
MAX_LINE_BYTES = 4096
FD_HEADROOM = 256
"""File descriptors the connection limit leaves for everything else in the process."""
ENCODED = ":b64"
"""Suffix of an argument name whose value is base64 of `.` + the value (the module docstring)."""
Route = Callable[["AgiRequest"], Awaitable[None]]


def default_max_connections() -> int:
    """The FastAGI connection limit: the soft RLIMIT_NOFILE less FD_HEADROOM (at least 16)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 65536
    return max(16, soft - FD_HEADROOM)


class Headers(dict[str, str]):
    """FastAGI request headers, and the names that came more than once (the first value is kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.repeated: set[str] = set()


@dataclass
class _Waiter:
    """A connection still reading its headers: when it came, its streams, what it has read so far."""

    since: float
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    tail: bytes = b"\n"
    """The last bytes it consumed (a blank line may straddle them and what is still unread)."""
    complete: bool = False

    def headers_in(self) -> bool:
        """Its headers have reached this machine: read, or waiting whole in its stream's buffer or in the
        socket (its task has not run since they came)."""
        if self.complete:
            return True
        pending = bytes(getattr(self.reader, "_buffer", b"")) + self._unread_in_socket()
        text = (self.tail[-2:] + pending).replace(b"\r\n", b"\n")
        return b"\n\n" in text

    def _unread_in_socket(self) -> bytes:
        transport_socket = self.writer.get_extra_info("socket")
        if transport_socket is None:
            return b""
        try:
            with transport_socket.dup() as sock:  # a peek at the kernel's buffer; nothing is consumed
                return bytes(sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing there (EAGAIN), or the socket is gone
            return b""


def decode(raw: bytes) -> str:
    """A line from Asterisk: UTF-8, or Latin-1 where it is not (every byte is a Latin-1 character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class AgiRequest(Request):  # type: ignore[misc] # panoramisk ships no types
    """panoramisk's Request, reading replies past Asterisk's asynchronous `HANGUP` notice, and keeping
    replies in step with commands: the late reply of a command that timed out is read and dropped before
    the next command, never taken for that command's reply (a shifted GET VARIABLE could read one
    variable's value as another's: a contact id as the number to opt out).

    A reply spans lines when a variable's value holds a line break (Asterisk sends `GET VARIABLE`'s value
    verbatim: a dialer id `"x\n200 result=1 (+1...)"` would answer the *next* command). Such a reply is read
    to its end (a `(` value ends with `)`), and lines already waiting after a reply are read too; the value
    is then dropped (unset), so every later reply stays the reply of its own command."""

    hung_up = False
    owed = 0
    """Replies still due for commands that timed out."""

    async def settle(self) -> None:
        """Read and drop the replies still owed."""
        while self.owed:
            reply = await self._read_result()
            while reply.get("status_code") == 100:  # `100 Trying`: the reply itself follows
                reply = await self._read_result()
            self.owed -= 1

    async def exchange(self, line: str) -> dict[str, Any]:
        """Send `line` and read its reply (`settle` first)."""
        self.owed += 1  # until the reply is read (a timeout leaves it owed)
        result: dict[str, Any] = await self.send_command(line)
        self.owed -= 1
        return result

    async def _read_result(self) -> dict[str, Any]:
        for _ in range(8):
            raw = await self.reader.readline()
            if not raw.endswith(b"\n"):
                raise AgiProtocolError("connection closed while waiting for a reply")
            line = decode(raw).rstrip("\r\n")
            if line.strip() == "HANGUP":
                self.hung_up = True  # the caller hung up; the reply to our command follows
                continue
            garbled = False
            if line.startswith("200 ") and "(" in line and not line.endswith(")"):
                garbled = True  # a value with a line break: its reply ends at the line ending with ")"
                for _ in range(MAX_HEADER_LINES):
                    raw = await self.reader.readline()
                    if not raw.endswith(b"\n") or decode(raw).rstrip("\r\n").endswith(")"):
                        break
            garbled = await self._drop_waiting_lines() or garbled
            if garbled:
                log.warning("FastAGI reply spanning lines (a value with a line break): value dropped")
                return {"status_code": 200, "result": ("0", ""), "msg": "", "garbled": True}
            result: dict[str, Any] = parse_agi_result(line)
            return result
        raise AgiProtocolError("no reply among the lines Asterisk sent")

    async def _drop_waiting_lines(self) -> bool:
        """Read the whole lines already waiting after a reply (Asterisk sends nothing unasked but its `HANGUP`
        notice; they are read without waiting): True when any of them was something else, the tail of a reply
        that spanned lines."""
        other = False
        for _ in range(bytes(getattr(self.reader, "_buffer", b"")).count(b"\n")):
            line = decode(await self.reader.readline()).strip()
            if line == "HANGUP":
                self.hung_up = True
            else:
                other = True
        return other


class GuardedApplication(Application):  # type: ignore[misc] # panoramisk ships no types
    """panoramisk's Application with a connection handler that contains every failure to its connection."""

    def __init__(self, *, header_timeout: float, max_connections: int, max_waiting: int) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.header_timeout = header_timeout
        self._max = max_connections
        self._max_waiting = max_waiting
        self.connections: set[asyncio.Task[Any]] = set()
        self._waiting: dict[asyncio.Task[Any], _Waiter] = {}

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        peer = writer.get_extra_info("peername")
        script = None
        try:
            if len(self.connections) > self._max:
                log.error("FastAGI connection refused: %d connections open", len(self.connections))
                return
            self._make_room()
            waiter = self._waiting[task] = _Waiter(time.monotonic(), reader, writer)
            try:
                async with asyncio.timeout(self.header_timeout):  # in this task: no hand-over to race with
                    headers = await read_headers(reader, waiter)
            finally:
                self._waiting.pop(task, None)
            script = (headers.get("agi_network_script") or "").split("?", 1)[0].strip("/")
            if not script:
                raise AgiProtocolError("no agi_network_script in the request")
            route = self._route.get(script)
            if route is None:
                raise AgiProtocolError(f"no FastAGI script named {script!r} (known: {', '.join(self._route)})")
            await route(AgiRequest(self, headers, reader, writer, encoding="utf-8"))
        except (AgiProtocolError, TimeoutError, ConnectionError) as exc:
            log.warning("FastAGI request refused or cut short: %s", exc or type(exc).__name__,
                        extra={"peer": str(peer), "script": script})
        except Exception:
            log.exception("FastAGI script failed", extra={"peer": str(peer), "script": script})
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await within(writer.wait_closed(), 1.0)
            self.connections.discard(task)

    def _make_room(self) -> None:
        """Asterisk sends its headers at once; connections still reading theirs when too many wait are slow
        peers, and the oldest of them is cut off for the newcomer. One whose headers have arrived is never
        cut off (when all have, nobody is: the connection limit still holds)."""
        while len(self._waiting) >= self._max_waiting:
            slow = [t for t, w in self._waiting.items() if not w.headers_in()]
            if not slow:
                return
            oldest = min(slow, key=lambda t: self._waiting[t].since)
            self._waiting.pop(oldest)
            log.warning("FastAGI: %d connections still sending headers; cutting off the oldest", self._max_waiting)
            oldest.cancel()


async def read_headers(reader: asyncio.StreamReader, waiter: _Waiter | None = None) -> Headers:
    """The `agi_*: value` lines up to the blank line (a name sent twice keeps its first value and is listed
    in `repeated`). Raises AgiProtocolError on anything else."""
    headers = Headers()
    for _ in range(MAX_HEADER_LINES):
        try:
            raw = await reader.readline()
        except ValueError as exc:  # StreamReader's limit: a line longer than MAX_LINE_BYTES
            raise AgiProtocolError("FastAGI header line too long") from exc
        if waiter is not None:
            waiter.tail = raw[-2:] if raw else waiter.tail
        if not raw.endswith(b"\n"):
            raise AgiProtocolError("connection closed before the end of the FastAGI headers")
        line = decode(raw).rstrip("\r\n")
        if not line:
            if waiter is not None:
                waiter.complete = True
            return headers
        key, sep, value = line.partition(": ")
        if not sep or not key.startswith("agi_"):
            raise AgiProtocolError(f"not a FastAGI header line: {line[:60]!r}")
        if key in headers:
            headers.repeated.add(key)
        else:
            headers[key] = value
    raise AgiProtocolError(f"more than {MAX_HEADER_LINES} FastAGI header lines")


async def command(request: AgiRequest, line: str, *, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """Send one AGI command; its parsed `200` result. Raises AgiProtocolError on a failure or a closed socket."""
    try:
        if request.owed:
            await within(request.settle(), timeout)
        result = await within(request.exchange(line), timeout)
    except ValueError as exc:  # an unparsable reply line
        raise AgiProtocolError(f"unreadable reply to {line.split()[0]}") from exc
    except TimeoutError as exc:
        raise AgiProtocolError(f"no answer to {line.split()[0]} within {timeout}s") from exc
    except ConnectionError as exc:
        raise AgiProtocolError(f"connection lost during {line.split()[0]}") from exc
    if "error" in result:
        raise AgiProtocolError(f"{line.split()[0]} failed: {result['error']} {result.get('msg', '')}".strip())
    return result


async def get_variable(request: AgiRequest, name: str, *, timeout: float) -> str | None:  # noqa: ASYNC109
    """A channel variable or function: its value ("" when set and empty), None when unset or unreadable."""
    try:
        result = await command(request, f"GET VARIABLE {name}", timeout=timeout)
    except AgiProtocolError as exc:
        log.warning("GET VARIABLE %s failed, going on without it: %s", name, exc,
                    extra={"uniqueid": request.headers.get("agi_uniqueid")})
        return None
    value, data = result.get("result", ("0", ""))
    return str(data) if value == "1" else None


def agi_args(headers: dict[str, str]) -> list[str]:
    """agi_arg_1, agi_arg_2, ... in order."""
    out = []
    for i in range(1, 129):
        value = headers.get(f"agi_arg_{i}")
        if value is None:
            break
        out.append(value)
    return out


@dataclass(frozen=True)
class Arguments:
    """A request's arguments: `NAME=value` / `NAME:b64=...` ones by name, the others in order."""

    named: dict[str, str]
    """Values of the names in `names` ("" for one given empty)."""
    positional: list[str]
    refused: str | None = None
    """Why none of the request's arguments can be trusted (then `named` and `positional` are empty)."""


def read_arguments(headers: dict[str, str], names: Collection[str]) -> Arguments:
    """The request's arguments; `names` are the `NAME=` names it knows. A name given twice, or an argument
    header sent twice, refuses them all (module docstring)."""
    repeated = sorted(k for k in getattr(headers, "repeated", ()) if k.startswith("agi_arg_"))
    if repeated:
        return Arguments({}, [], f"argument header {', '.join(repeated)} sent more than once")
    named: dict[str, str] = {}
    positional: list[str] = []
    seen: list[str] = []
    for arg in agi_args(headers):
        key, sep, value = arg.partition("=")
        name = key.removesuffix(ENCODED)
        if not sep or name not in names:
            positional.append(arg)
            continue
        seen.append(name)
        if key.endswith(ENCODED):
            decoded = _decode_argument(value)
            if decoded is None:
                log.warning("FastAGI argument %s: not base64 of '.' + value; read from the channel instead", key)
                continue
            value = decoded
        named[name] = value
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        return Arguments({}, [], f"argument {', '.join(twice)} given more than once")
    return Arguments(named, positional)


def _decode_argument(value: str) -> str | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    text = decode(raw)
    return text[1:] if text.startswith(".") else None


class AgiServer(Resource):
    """The FastAGI server (async context manager): scripts `optout` and `precheck`."""

    def __init__(
        self, *, host: str, port: int, intake: Intake, guard: DialGuard, header_timeout: float = 2.0,
        command_timeout: float = 2.0, max_connections: int | None = None, max_waiting: int = 64,
    ) -> None:
        self._host = host
        self._port = port
        self._intake = intake
        self._guard = guard
        self._header_timeout = header_timeout
        self._command_timeout = command_timeout
        self._max_connections = max_connections or default_max_connections()
        """At most this many FastAGI connections at once (default: `default_max_connections()`)."""
        self._max_waiting = max_waiting
        self._app: GuardedApplication | None = None
        self._server: asyncio.Server | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def open(self) -> None:
        """Listen on host:port. Raises TelephonyError when the port cannot be bound."""
        app = GuardedApplication(header_timeout=self._header_timeout, max_connections=self._max_connections,
                                 max_waiting=self._max_waiting)
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
                await within(server.wait_closed(), 2.0)

    # --- optout ----------------------------------------------------------------------------------
    async def _optout(self, request: AgiRequest) -> None:
        received_at = datetime.now(UTC)
        this = asyncio.current_task()
        if this is not None:
            self._intake.arriving(this)  # a shutdown waits for the lookups below
        facts = await self._facts(request)
        pressed = self._intake.press(facts, origin=Origin.AGI, pressed_at=None, received_at=received_at,
                                     hang_up=lambda: self._hang_up(request))
        if pressed is None:  # the press was taken already (another way in saw it): the call still ends
            await self._hang_up(request)
            return
        # The connection is needed until the HANGUP is sent; storing goes on in the intake.
        await asyncio.wait([pressed.task, pressed.hung_up], return_when=asyncio.FIRST_COMPLETED)

    async def _facts(self, request: AgiRequest) -> ChannelFacts:
        """What the channel says about itself; never raises (a failed GET VARIABLE leaves a fact out)."""
        headers: dict[str, str] = request.headers
        uniqueid = headers.get("agi_uniqueid") or f"agi-{uuid.uuid4()}"
        arguments = read_arguments(headers, CHANNEL_VARS)
        if arguments.refused:
            log.warning("FastAGI optout request: %s; every value is read from the channel instead",
                        arguments.refused, extra={"uniqueid": headers.get("agi_uniqueid")})
        # `NAME=` arguments: the dialplan read them already ("" = unset)
        given = set(arguments.named)
        variables = {name: value for name, value in arguments.named.items() if value}
        for name in CHANNEL_VARS:
            if name not in given:  # GET VARIABLE works on a channel that has hung up, too
                found = await get_variable(request, name, timeout=self._command_timeout)
                if found:
                    variables[name] = found
        facts = ChannelFacts(
            uniqueid=uniqueid, name=headers.get("agi_channel", ""), variables=variables,
            caller_number=known(headers.get("agi_callerid")), exten=known(headers.get("agi_extension")),
            context=headers.get("agi_context"),
        )
        self._intake.arrived(facts, Origin.AGI)
        if "OPTOUT_NUMBER" not in variables:
            request_uri = await get_variable(request, REQUEST_URI, timeout=self._command_timeout)
            remote_uri = await get_variable(request, REMOTE_URI, timeout=self._command_timeout)
            facts = dataclasses.replace(facts, dialled=dialled_number(request_uri, remote_uri))
        return facts

    async def _hang_up(self, request: AgiRequest) -> HangupInfo:
        """The AGI HANGUP command; never raises."""
        requested = datetime.now(UTC)
        try:
            result = await command(request, "HANGUP", timeout=self._command_timeout)
        except AgiProtocolError as exc:
            gone = request.hung_up
            if not gone:
                log.error("AGI HANGUP failed: %s", exc, extra={"uniqueid": request.headers.get("agi_uniqueid")})
            return HangupInfo(requested_at=requested, method="agi", result="gone" if gone else f"error: {exc}"[:200])
        ok = result.get("result", ("", ""))[0] == "1"
        return HangupInfo(requested_at=requested, hungup_at=datetime.now(UTC) if ok else None, method="agi",
                          result="ok" if ok else "gone")

    # --- precheck --------------------------------------------------------------------------------
    async def _precheck(self, request: AgiRequest) -> None:
        started = time.perf_counter()
        headers: dict[str, str] = request.headers
        arguments = read_arguments(headers, PRECHECK_NAMES)
        named, args = arguments.named, arguments.positional
        raw: str | None
        if arguments.refused:
            # Which number Asterisk is about to dial is not known for sure: nobody can show it is clear.
            log.warning("FastAGI precheck request: %s; answering blocked", arguments.refused,
                        extra={"uniqueid": headers.get("agi_uniqueid")})
            raw = ""
        elif "NUMBER" in named:
            raw = named["NUMBER"].strip()
        else:
            raw = args[0].strip() if args and args[0].strip() else None
        if raw is None:
            raw = await get_variable(request, "OPTOUT_NUMBER", timeout=self._command_timeout)
        # The call's ids ride along as arguments (dialplan/optout-precheck.conf): no extra round trips. A
        # dialplan of the old shape passes them as arguments 2-4.
        old = [*args[1:4], None, None, None][:3]
        call_id, campaign_id, contact_id = (named.get(n, o) for n, o in zip(CHANNEL_VARS[:3], old, strict=True))
        answer = await self._guard.check(raw, via=Origin.AGI, field="ARG1", call_id=call_id or None,
                                         campaign_id=campaign_id or None, contact_id=contact_id or None)
        if answer.verdict is Verdict.INVALID:
            log.warning("precheck of an invalid or missing number: answering blocked (%s)", answer.problem,
                        extra={"uniqueid": headers.get("agi_uniqueid")})
        # UNKNOWN leaves OPTOUT_BLOCKED unset: the dialplan applies OPTOUT_PRECHECK_FAIL_OPEN (closed by default).
        if answer.verdict is not Verdict.UNKNOWN:
            blocked = answer.verdict is not Verdict.CLEAR
            await command(request, f"SET VARIABLE OPTOUT_BLOCKED {1 if blocked else 0}",
                          timeout=self._command_timeout)
        log.debug("precheck answered in %.1f ms", (time.perf_counter() - started) * 1000,
                  extra={"verdict": answer.verdict.value})
