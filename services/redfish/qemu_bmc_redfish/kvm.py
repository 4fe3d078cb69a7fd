"""A machine's graphical console (KVM over IP) in the browser, and its screenshot.

``GET /kvm/{machine}`` is a page with noVNC (npm ``@novnc/novnc``, vendored under
``static/novnc``, served from ``/console/static/``, no CDN) on the WebSocket
``/kvm/{machine}/ws``, which carries binary RFB both ways: this service serves the browser's RFB
session (``qemu_bmc_shared.rfb.serve_viewer``: the handshake, security None since the page's
ticket or credentials logged in, every message from the browser parsed before it reaches QEMU)
on a stream of the machine's QEMU VNC server over the bus (``qemu_bmc_shared.kvm.open_kvm``),
so the machine may run on another host. A user without ConfigureComponents (ReadOnly) watches:
its keys and pointer are dropped, and so are those of every viewer but one when the machine has
``kvm_control = "first"`` (shared mode: the machine service grants control to one stream at a
time). The page learns whether it has control from the WebSocket subprotocol: it offers
CONTROL_PROTOCOL and VIEW_PROTOCOL, the service picks the one that holds. The login, tickets
and Origin check are the serial console's (web_access.py). ``GET /kvm/{machine}/ticket`` gives
the page a fresh ticket when it connects again (after a power cycle, or a restart of the machine
service).

A WebSocket that cannot be served is opened and closed with a reason the page shows: the machine
is off, it has no display, it has kvm.WEB_VIEWERS web viewers already (the machine service counts
them, whichever replicas serve them).

``GET /redfish/v1/Managers/{machine}/Oem/QemuBmc/Screenshot`` is the screen as a PNG (QMP
``screendump``), an OEM extension (docs/redfish.md)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from typing import TYPE_CHECKING
from urllib.parse import quote

import nats.errors
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, Response
from qemu_bmc_shared import kvm, rfb
from qemu_bmc_shared.bus import BusError
from starlette.websockets import WebSocketDisconnect

from .errors import RedfishError
from .resources import json_response
from .web_access import PAGE_HEADERS, POLICY_VIOLATION, Tickets, may_control, websocket_login

if TYPE_CHECKING:
    from .resources import Redfish

log = logging.getLogger(__name__)

#: WebSocket close codes (RFC 6455 §7.4.1): the machine cannot be viewed now; the bus is down.
UNAVAILABLE, TRY_AGAIN_LATER = 1011, 1013
MAX_REASON = 120  # bytes of a close frame's reason (125 with the code)
#: The WebSocket subprotocols (RFC 6455 §1.9) the page offers; the service picks the first when the
#: viewer has control, the second when it is view only.
CONTROL_PROTOCOL, VIEW_PROTOCOL = "qemu-bmc-control", "qemu-bmc-view"
#: Why a stream did not open (the open_kvm errors), as the page shows it.
REASONS = {"no_display": "the machine has no display", "invalid_state": "the machine is off"}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="/console/static/kvm.css">
</head>
<body>
<div id="bar"><span id="title">{title}</span>
<select id="keys" title="Send keys"{disabled}>
<option value="">Send keys…</option>
<option value="ctrl-alt-del">Ctrl-Alt-Del</option>
<option value="ctrl-w">Ctrl-W</option>
<option value="ctrl-t">Ctrl-T</option>
<option value="ctrl-n">Ctrl-N</option>
<option value="alt-tab">Alt-Tab</option>
<option value="alt-f4">Alt-F4</option>
<option value="ctrl-alt-f1">Ctrl-Alt-F1</option>
<option value="ctrl-alt-f2">Ctrl-Alt-F2</option>
<option value="f11">F11</option>
<option value="f12">F12</option>
<option value="print">PrintScreen</option>
<option value="super">Super (Windows key)</option>
<option value="escape">Escape</option>
</select>
<span id="status">connecting</span>
<a id="console" href="{console}">Serial console</a></div>
<div id="screen" data-machine="{machine}" data-ticket="{ticket}" data-interactive="{interactive}"></div>
<script type="module" src="/console/static/kvm.js"></script>
</body>
</html>
"""


def page_path(machine: str) -> str:
    return f"/kvm/{quote(machine, safe='')}"


def screenshot_path(machine: str) -> str:
    return f"/redfish/v1/Managers/{machine}/Oem/QemuBmc/Screenshot"


class WebSocketViewer:
    """A browser's WebSocket as the viewer's reader and writer ``serve_viewer`` takes: binary
    messages in (``readexactly`` across message boundaries), ``write`` + ``drain`` out (one binary
    message per drain)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.buffer = bytearray()
        self.pending = bytearray()
        self.ended = False

    async def _fill(self) -> bool:
        if self.ended:
            return False
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            self.ended = True
            return False
        self.buffer += message.get("bytes") or (message.get("text") or "").encode()
        return True

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                partial = bytes(self.buffer)
                self.buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def write(self, data: bytes) -> None:
        self.pending += data

    async def drain(self) -> None:
        if self.pending:
            data = bytes(self.pending)
            self.pending.clear()
            await self.websocket.send_bytes(data)


def subprotocol(websocket: WebSocket, control: bool) -> str | None:
    """The subprotocol to accept the page's WebSocket with (a browser that offered some fails a
    connection accepted with none, even one closed at once with a reason)."""
    offered = websocket.scope.get("subprotocols") or []
    if CONTROL_PROTOCOL in offered and VIEW_PROTOCOL in offered:
        return CONTROL_PROTOCOL if control else VIEW_PROTOCOL
    return None


def closing_reason(text: str) -> str:
    return text.encode()[:MAX_REASON].decode(errors="ignore")


def register(app: FastAPI, redfish: Redfish) -> None:
    tickets = Tickets(redfish.nc)

    @app.get("/kvm/{machine}")
    async def page(request: Request, machine: str) -> Response:
        login = await redfish.login(request, machine)
        interactive = may_control(login)
        body = PAGE.format(title=html.escape(f"Graphical console of {machine}"), machine=html.escape(machine),
                           console=html.escape(f"/console/{quote(machine, safe='')}"),
                           ticket=await tickets.issue(machine, login), interactive=str(interactive).lower(),
                           disabled="" if interactive else " disabled")
        return HTMLResponse(body, headers=PAGE_HEADERS)

    @app.get("/kvm/{machine}/ticket")
    async def ticket(request: Request, machine: str) -> Response:
        """A fresh one-use ticket for the page's next WebSocket, for the login the request has
        (the browser sends the page's credentials again)."""
        login = await redfish.login(request, machine)
        return json_response({"ticket": await tickets.issue(machine, login)}, headers={"Cache-Control": "no-store"})

    @app.websocket("/kvm/{machine}/ws")
    async def kvm_socket(websocket: WebSocket, machine: str) -> None:
        login = await websocket_login(websocket, redfish, tickets, machine)
        if login is None:
            return
        await serve(websocket, machine, may_control(login))

    async def serve(websocket: WebSocket, machine: str, may_type: bool) -> None:
        """The stream is opened before the WebSocket is accepted: the subprotocol says whether
        the machine service granted it control."""
        try:
            stream = await kvm.open_kvm(redfish.nc, machine, control=may_type, web=True)
        except BusError as exc:
            await websocket.accept(subprotocol(websocket, False))
            await websocket.close(UNAVAILABLE, closing_reason(REASONS.get(exc.error, exc.message or exc.error)))
            return
        except nats.errors.Error:
            await websocket.accept(subprotocol(websocket, False))
            await websocket.close(TRY_AGAIN_LATER, "the bus is down")
            return
        viewer = WebSocketViewer(websocket)
        code, reason = 1000, ""
        try:
            await websocket.accept(subprotocol(websocket, stream.control))
            await rfb.serve_viewer(viewer, viewer, stream, password=None, control=may_type and stream.control)
            reason = stream.reason if stream.ended else ""
        except rfb.RfbError as exc:
            log.warning("KVM of %s: %s", machine, exc)
            code, reason = POLICY_VIOLATION, str(exc)
        except TimeoutError:
            code, reason = POLICY_VIOLATION, "the RFB handshake took too long"
        except WebSocketDisconnect:
            viewer.ended = True
        finally:
            await stream.close()
        if not viewer.ended:
            with contextlib.suppress(Exception):
                await websocket.close(code, closing_reason(reason or "the display closed"))

    @app.get("/redfish/v1/Managers/{machine}/Oem/QemuBmc/Screenshot")
    async def screenshot(request: Request, machine: str) -> Response:
        """The machine's screen as PNG (OEM): 404 for a machine without a display, 409 while it is off."""
        await redfish.login(request, machine)
        try:
            png = await kvm.screenshot(redfish.nc, machine)
        except BusError as exc:
            if exc.error == "no_display":
                raise RedfishError(404, "ResourceMissingAtURI", screenshot_path(machine)) from None
            if exc.error == "invalid_state":
                raise RedfishError(409, "GeneralError", REASONS["invalid_state"]) from None
            raise
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
