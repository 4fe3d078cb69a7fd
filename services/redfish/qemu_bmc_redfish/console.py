"""A machine's serial console in the browser: ``GET /console/{machine}`` is a page with xterm.js
(vendored under ``static/``, served from ``/console/static/``, no CDN) connected to the WebSocket
``/console/{machine}/ws``, which carries the console's raw bytes both ways, as a pty would (the
Redfish specification's WebSocket serial console): first the recent output the machine service
keeps (``console.get``), then every ``console.out`` as it comes, and what is typed goes to
``console.in``.

Both need a login on the machine, as Redfish does: HTTP Basic (a browser asks for it on the 401
challenge) or ``X-Auth-Token``. A browser does not always send its Basic credentials on a
WebSocket handshake, so the page carries a ticket: a random, one-use, short-lived stand-in for the
login that served it, kept in a JetStream bucket so that the WebSocket may reach any replica of
the Redfish service. A user without ConfigureComponents (ReadOnly) sees the console and cannot
type on it.

A browser sends its credentials (Basic, cookies) with a WebSocket handshake whatever page opens
it, so the WebSocket is refused (HTTP 403, before it opens) when its ``Origin`` is not the origin
of the service itself (the scheme, host and port the request came to, from its ``Host`` header):
another site's page cannot use a logged-in browser to reach the console (cross-site WebSocket
hijacking). A client that sends no ``Origin`` (not a browser) is not refused for it. The page's
Content-Security-Policy lets it load its own scripts and styles and connect back to its own
origin only, and no other site may frame it."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec
import nats.errors
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleHistory, ConsoleInput, ConsoleOutput, ConsoleWritten
from starlette.websockets import WebSocketDisconnect

from .auth import PRIVILEGES, Login
from .errors import RedfishError
from .sessions import token_hash

if TYPE_CHECKING:
    from .resources import Redfish

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
TICKET_LIFETIME = 60.0  # seconds a page's ticket opens its WebSocket
TICKETS_BUCKET = "qemu_bmc_redfish_console_tickets"
INPUT_CHUNK = 4096  # ConsoleInput's max_length
QUEUE_SIZE = 4096  # console.out messages waiting for a slow browser; past that the oldest go
POLICY_VIOLATION = 1008  # WebSocket close code: refused (before accept: HTTP 403)
#: The console page's own scripts and styles (xterm.js adds <style> elements: 'unsafe-inline' for
#: styles only), WebSocket and fetches back to its own origin; no other site may frame it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DEFAULT_PORTS = {"http": 80, "https": 443}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="/console/static/xterm/xterm.css">
<link rel="stylesheet" href="/console/static/console.css">
</head>
<body>
<div id="bar"><span id="title">{title}</span> <span id="status">connecting</span></div>
<div id="terminal" data-machine="{machine}" data-ticket="{ticket}" data-interactive="{interactive}"></div>
<script src="/console/static/xterm/xterm.js"></script>
<script src="/console/static/addon-fit/addon-fit.js"></script>
<script src="/console/static/console.js"></script>
</body>
</html>
"""


class Ticket(msgspec.Struct):
    """What a ticket stands for: a login on one machine, issued at a wall-clock time."""

    machine: str
    user: str
    role: str
    slot: int
    session: str | None
    issued: float


class Tickets:
    """One-use tickets, for TICKET_LIFETIME seconds, in a JetStream bucket: a page served by one
    replica opens its WebSocket on any other. The bucket holds the ticket's SHA-256, never the
    ticket; its ``max_age`` removes the tickets nobody redeemed."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await bus.key_value(self.nc, TICKETS_BUCKET, "qemu-bmc web console tickets",
                                           ttl=TICKET_LIFETIME)
        return self._kv

    @staticmethod
    def key(ticket: str) -> str:
        return "t." + token_hash(ticket)

    async def issue(self, machine: str, login: Login) -> str:
        ticket = secrets.token_urlsafe(24)
        record = Ticket(machine=machine, user=login.user, role=login.role, slot=login.slot, session=login.session,
                        issued=time.time())
        await (await self.bucket()).put(self.key(ticket), msgspec.json.encode(record))
        return ticket

    async def redeem(self, ticket: str, machine: str) -> Login | None:
        """The login of a live ticket for this machine, which is then used up (on every replica:
        the delete only succeeds over the revision read)."""
        if not ticket:
            return None
        kv, key = await self.bucket(), self.key(ticket)
        try:
            entry = await kv.get(key)
            if not entry.value:
                return None
            await kv.delete(key, last=entry.revision)
        except (KeyNotFoundError, KeyWrongLastSequenceError):
            return None
        record = msgspec.json.decode(entry.value, type=Ticket)
        if record.machine != machine or time.time() - record.issued > TICKET_LIFETIME:
            return None
        return Login(user=record.user, role=record.role, slot=record.slot, session=record.session)


def register(app: FastAPI, redfish: Redfish) -> None:
    tickets = Tickets(redfish.nc)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")

    @app.get("/console/{machine}")
    async def page(request: Request, machine: str) -> Response:
        login = await redfish.login(request, machine)
        interactive = "ConfigureComponents" in PRIVILEGES[login.role]
        body = PAGE.format(title=html.escape(f"Serial console of {machine}"), machine=html.escape(machine),
                           ticket=await tickets.issue(machine, login), interactive=str(interactive).lower())
        return HTMLResponse(body, headers={"Cache-Control": "no-store", "Content-Security-Policy": PAGE_CSP})

    @app.websocket("/console/{machine}/ws")
    async def console(websocket: WebSocket, machine: str) -> None:
        if not same_origin(websocket):
            await websocket.close(POLICY_VIOLATION)
            return
        try:
            login = await tickets.redeem(websocket.query_params.get("ticket", ""), machine)
        except nats.errors.Error:
            login = None
        if login is None:
            try:
                login = await redfish.login(websocket, machine)  # type: ignore[arg-type]  # headers only
            except RedfishError:
                await websocket.close(POLICY_VIOLATION)
                return
        await websocket.accept()
        try:
            await Bridge(redfish, websocket, machine, "ConfigureComponents" in PRIVILEGES[login.role]).run()
        except WebSocketDisconnect:
            pass


def same_origin(websocket: WebSocket) -> bool:
    """The handshake's ``Origin`` (if any) is the service's own: the scheme of the connection (http
    for ws, https for wss), the host and the port of its ``Host`` header."""
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    scheme = "https" if websocket.url.scheme in ("wss", "https") else "http"
    try:
        theirs, ours = urlsplit(origin.strip()), urlsplit(f"{scheme}://{websocket.headers.get('host', '')}")
        return (theirs.scheme.lower() == scheme and theirs.hostname is not None
                and theirs.hostname == ours.hostname
                and (theirs.port or DEFAULT_PORTS[scheme]) == (ours.port or DEFAULT_PORTS[scheme]))
    except ValueError:  # a port out of range
        return False


class Bridge:
    """One browser's WebSocket and the machine's console on the bus."""

    def __init__(self, redfish: Redfish, websocket: WebSocket, machine: str, interactive: bool) -> None:
        self.nc = redfish.nc
        self.websocket = websocket
        self.machine = machine
        self.interactive = interactive
        self.output: asyncio.Queue[ConsoleOutput] = asyncio.Queue(QUEUE_SIZE)

    async def on_output(self, message: Msg) -> None:
        try:
            output = bus.decode(message.data, ConsoleOutput)
        except Exception:
            return
        if self.output.full():
            self.output.get_nowait()
        self.output.put_nowait(output)

    async def run(self) -> None:
        # subscribe before asking for the history: nothing written in between is lost
        subscription = await self.nc.subscribe(subjects.for_machine(self.machine, subjects.CONSOLE_OUT),
                                               cb=self.on_output)
        try:
            try:
                history = await bus.request(self.nc, self.machine, subjects.CONSOLE_GET, None, ConsoleHistory)
            except BusError as exc:
                log.warning("console of %s: no history: %s", self.machine, exc)
                history = ConsoleHistory(data=b"", end=-1)
            if history.data:
                await self.websocket.send_bytes(history.data)
            tasks = [asyncio.create_task(self.send_output(history.end)), asyncio.create_task(self.take_input())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                        await task
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def send_output(self, sent: int) -> None:
        """Every console.out after the ``sent`` bytes the browser has: what overlaps is skipped;
        ``end`` going back (the machine service started again) starts the count anew."""
        last_end = -1
        while True:
            output = await self.output.get()
            if sent < 0 or output.end < last_end:
                data, sent = output.data, output.end
            elif output.end > sent:
                data, sent = output.data[max(0, len(output.data) - (output.end - sent)):], output.end
            else:
                data = b""
            last_end = output.end
            if data:
                await self.websocket.send_bytes(data)

    async def take_input(self) -> None:
        """What the browser types, to the serial port (dropped for a user who may only watch)."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            if not self.interactive:
                continue
            for start in range(0, len(data), INPUT_CHUNK):
                try:
                    await bus.request(self.nc, self.machine, subjects.CONSOLE_IN,
                                      ConsoleInput(data=data[start:start + INPUT_CHUNK]), ConsoleWritten)
                except BusError as exc:
                    log.warning("console of %s: input lost: %s", self.machine, exc)
