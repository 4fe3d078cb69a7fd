"""What the browser pages (the serial console, console.py, and the KVM, kvm.py) share: their
login, one-use tickets for their WebSockets, the Origin check and the pages' security headers.

Both pages need a login on the machine, as Redfish does: HTTP Basic (a browser asks for it on the
401 challenge) or ``X-Auth-Token``. A browser does not always send its Basic credentials on a
WebSocket handshake, so a page carries a ticket: a random, one-use, short-lived stand-in for the
login that served it, kept in a JetStream bucket so that the WebSocket may reach any replica of
the Redfish service. A user without ConfigureComponents (ReadOnly) watches and cannot type.

A browser sends its credentials (Basic, cookies) with a WebSocket handshake whatever page opens
it, so the WebSocket is refused (HTTP 403, before it opens) when its ``Origin`` is not the origin
of the service itself (the scheme, host and port the request came to, from its ``Host`` header):
another site's page cannot use a logged-in browser to reach the console (cross-site WebSocket
hijacking). A client that sends no ``Origin`` (not a browser) is not refused for it. A page's
Content-Security-Policy lets it load its own scripts and styles and connect back to its own
origin only, and no other site may frame it."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec
import nats.errors
from fastapi import Response, WebSocket
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from qemu_bmc_shared import bus
from qemu_bmc_shared.bus import BusError

from .auth import PRIVILEGES, Login
from .errors import RedfishError
from .resources import error_response, unavailable
from .sessions import token_hash

if TYPE_CHECKING:
    from .resources import Redfish

TICKET_LIFETIME = 60.0  # seconds a page's ticket opens its WebSocket
TICKETS_BUCKET = "qemu_bmc_redfish_console_tickets"
POLICY_VIOLATION = 1008  # WebSocket close code: refused (before accept: HTTP 403)
#: A page's own scripts (classic or ES modules) and styles (xterm.js adds <style> elements:
#: 'unsafe-inline' for styles only), WebSocket and fetches back to its own origin; no other site
#: may frame it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": PAGE_CSP}
DEFAULT_PORTS = {"http": 80, "https": 443}


def may_control(login: Login) -> bool:
    """Whether the login may type on a console (or move the mouse on the KVM)."""
    return "ConfigureComponents" in PRIVILEGES[login.role]


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


async def websocket_login(websocket: WebSocket, redfish: Redfish, tickets: Tickets, machine: str) -> Login | None:
    """The login a WebSocket handshake comes with: its ``ticket`` query parameter, else its own
    credentials (Basic or X-Auth-Token). None, with the handshake refused, for a foreign Origin or
    no login (HTTP 403) or while nobody can check the credentials (HTTP 503)."""
    if not same_origin(websocket):
        await websocket.close(POLICY_VIOLATION)
        return None
    try:
        login = await tickets.redeem(websocket.query_params.get("ticket", ""), machine)
    except nats.errors.Error:
        login = None
    if login is None:
        try:
            login = await redfish.login(websocket, machine)  # type: ignore[arg-type]  # headers only
        except RedfishError as exc:
            if exc.status == 503:  # nobody to check the credentials: an outage
                await deny(websocket, error_response(exc))
            else:
                await websocket.close(POLICY_VIOLATION)
            return None
        except (BusError, nats.errors.Error):
            await deny(websocket, error_response(unavailable()))
            return None
    return login


async def deny(websocket: WebSocket, response: Response) -> None:
    """Refuse the handshake with ``response`` (HTTP 403 where the server cannot send another)."""
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        await websocket.close(POLICY_VIOLATION)


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
