"""A machine's serial console in the browser: ``GET /console/{machine}`` is a page with xterm.js
(vendored under ``static/``, served from ``/console/static/``, no CDN) connected to the WebSocket
``/console/{machine}/ws``, which carries the console's raw bytes both ways, as a pty would (the
Redfish specification's WebSocket serial console): first the recent output the machine service
keeps (``console.get``), then every ``console.out`` as it comes, and what is typed goes to
``console.in``.

It needs a login on the machine, as Redfish does, and a page's ticket or the browser's credentials
on its WebSocket, whose Origin must be the service's own (web_access.py, shared with the KVM page,
kvm.py, which the page links to). A user without ConfigureComponents (ReadOnly) sees the
console and cannot type on it."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from nats.aio.msg import Msg
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleHistory, ConsoleInput, ConsoleOutput, ConsoleWritten
from starlette.websockets import WebSocketDisconnect

from .web_access import PAGE_HEADERS, Tickets, may_control, websocket_login

if TYPE_CHECKING:
    from .resources import Redfish

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
INPUT_CHUNK = 4096  # ConsoleInput's max_length
QUEUE_SIZE = 4096  # console.out messages waiting for a slow browser; past that the oldest go

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="/console/static/xterm/xterm.css">
<link rel="stylesheet" href="/console/static/console.css">
</head>
<body>
<div id="bar"><span id="title">{title}</span> <span id="status">connecting</span>
<a id="kvm" href="{kvm}">Graphical console</a></div>
<div id="terminal" data-machine="{machine}" data-ticket="{ticket}" data-interactive="{interactive}"></div>
<script src="/console/static/xterm/xterm.js"></script>
<script src="/console/static/addon-fit/addon-fit.js"></script>
<script src="/console/static/console.js"></script>
</body>
</html>
"""


def register(app: FastAPI, redfish: Redfish) -> None:
    tickets = Tickets(redfish.nc)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")

    @app.get("/console/{machine}")
    async def page(request: Request, machine: str) -> Response:
        login = await redfish.login(request, machine)
        body = PAGE.format(title=html.escape(f"Serial console of {machine}"), machine=html.escape(machine),
                           kvm=html.escape(f"/kvm/{quote(machine, safe='')}"),
                           ticket=await tickets.issue(machine, login), interactive=str(may_control(login)).lower())
        return HTMLResponse(body, headers=PAGE_HEADERS)

    @app.websocket("/console/{machine}/ws")
    async def console(websocket: WebSocket, machine: str) -> None:
        login = await websocket_login(websocket, redfish, tickets, machine)
        if login is None:
            return
        await websocket.accept()
        try:
            await Bridge(redfish, websocket, machine, may_control(login)).run()
        except WebSocketDisconnect:
            pass


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
