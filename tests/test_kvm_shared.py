"""The graphical console's shared mode (``kvm_control = "first"``: one viewer at a time has
control, the others watch) with real services on one bus and a real QEMU whose guest echoes each
key it reads to its serial port; and a web viewer on a second Redfish replica, in another process,
with a ticket from the first.

A key that a view-only viewer sends is followed, on the same connection, by a framebuffer update
request whose answer comes back only once QEMU has taken the messages before it: a key that got
through would be in the guest's keyboard buffer ahead of the next viewer's key, so its absence
from the serial log once that later key is echoed shows it was dropped."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import struct
from pathlib import Path

import httpx
import pytest
from browser import chromium, logged_in_page
from conftest import free_tcp_port, serial_log, write_config
from guest_images import KEY_GUEST_READY, boot_sector_vm, key_echo_disk
from qemu_bmc_redfish.kvm import CONTROL_PROTOCOL, VIEW_PROTOCOL
from qemu_bmc_shared import rfb
from qemu_bmc_shared.config import ConfigError, parse
from qemu_bmc_shared.kvm import WEB_VIEWERS, KvmStream, open_kvm
from test_vnc import PASSWORD, RawViewer, key_event
from waiting import wait_for
from websockets.asyncio import client as websockets_client
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")

USER, USER_PASSWORD = "admin", "s3cret-Pass"


def machine_config(directory: Path, extra: str) -> Path:
    return write_config(directory, f"""{extra}
[vm.m1]
{boot_sector_vm(key_echo_disk(directory))}kvm_control = "first"
""")


def typed(directory: Path) -> str:
    """What the guest echoed after its ready line."""
    return serial_log(directory, "m1").partition(KEY_GUEST_READY)[2].lstrip("\r\n")


async def press(viewer: RawViewer, key: str) -> None:
    """A key down and up, then a whole frame: QEMU has taken the key once the frame is back."""
    viewer.send(key_event(ord(key), True) + key_event(ord(key), False))
    assert await viewer.framebuffer_update() >= 1


async def stream_with_control(nc) -> KvmStream | None:  # type: ignore[no-untyped-def]
    """A new stream of m1 if the machine service granted it control; None (closed) if not."""
    stream = await open_kvm(nc, "m1")
    if stream.control:
        return stream
    await stream.close()
    return None


async def test_first_viewer_has_control(nc, services, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """Two viewers on the VNC listener: the first types into the guest, the second watches (its
    keys are dropped, its frames come); a stream opened over the bus meanwhile gets no control;
    once the first viewer leaves, the next stream opened has it and types, the second still not."""
    port = free_tcp_port()
    config = machine_config(short_dir, "")
    config.write_text(config.read_text() + f'vnc = "127.0.0.1:{port}"\nvnc_password = "{PASSWORD}"\n')
    await services("machine", config)
    await services("ipmi-lan", config)
    await wait_for(lambda: KEY_GUEST_READY in serial_log(short_dir, "m1"), timeout=60, message="the guest up")

    first = await RawViewer.connect(port, PASSWORD)
    second = await RawViewer.connect(port, PASSWORD)
    await press(second, "s")
    await press(first, "f")
    await wait_for(lambda: typed(short_dir).endswith("f"), timeout=30, message="the first viewer's key")
    assert typed(short_dir) == "f"
    bus_viewer = await open_kvm(nc, "m1")
    assert not bus_viewer.control
    await bus_viewer.close()

    await first.close()
    holder = await wait_for(lambda: stream_with_control(nc), timeout=30, interval=0.5,
                            message="control free again")
    server_task: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_task.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await rfb.serve_viewer(reader, writer, holder, password=None, control=True)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        third = await RawViewer.connect(server.sockets[0].getsockname()[1], None)
        await press(second, "x")
        await press(third, "t")
        await wait_for(lambda: typed(short_dir).endswith("t"), timeout=30, message="the new holder's key")
        assert typed(short_dir) == "ft"
        await third.close()
        await second.close()
    finally:
        server.close()
        for task in server_task:
            task.cancel()
        await holder.close()


class WebSocketViewer:
    """The test's RFB 3.8 client on the web KVM's WebSocket (security None: the ticket logged in)."""

    def __init__(self, socket: websockets_client.ClientConnection) -> None:
        self.socket = socket
        self.received = bytearray()
        self.width = self.height = 0

    async def take(self, n: int) -> bytes:
        while len(self.received) < n:
            self.received.extend(await self.socket.recv())
        data = bytes(self.received[:n])
        del self.received[:n]
        return data

    async def handshake(self) -> None:
        assert await self.take(12) == rfb.VERSION
        await self.socket.send(rfb.VERSION)
        assert await self.take(2) == bytes([1, rfb.SECURITY_NONE])
        await self.socket.send(bytes([rfb.SECURITY_NONE]))
        assert await self.take(4) == bytes(4)  # SecurityResult OK
        await self.socket.send(b"\x01")  # ClientInit: shared
        head = await self.take(24)
        self.width, self.height, name_length = struct.unpack("!HH16xI", head)
        await self.take(name_length)

    async def frame(self) -> int:
        """A whole frame in raw encoding; its number of distinct pixel values."""
        await self.socket.send(struct.pack("!BxHi", 2, 1, 0)
                               + struct.pack("!BBHHHH", 3, 0, 0, 0, self.width, self.height))
        kind, count = struct.unpack("!BxH", await self.take(4))
        assert kind == 0
        pixels: set[bytes] = set()
        for _ in range(count):
            _, _, width, height, encoding = struct.unpack("!HHHHi", await self.take(12))
            assert encoding == 0
            data = await self.take(width * height * 4)
            pixels.update(data[i:i + 4] for i in range(0, len(data), 4))
        return len(pixels)

    async def press(self, key: str) -> None:
        await self.socket.send(key_event(ord(key), True) + key_event(ord(key), False))
        assert await self.frame() >= 1


@contextlib.asynccontextmanager
async def web_viewer(url: str, ticket: str):  # type: ignore[no-untyped-def]
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    async with websockets_client.connect(f"{url.replace('https', 'wss')}/kvm/m1/ws?ticket={ticket}", ssl=insecure,
                                         subprotocols=[CONTROL_PROTOCOL, VIEW_PROTOCOL],  # type: ignore[list-item]
                                         max_size=None) as socket:
        viewer = WebSocketViewer(socket)
        await viewer.handshake()
        yield viewer


async def web_viewer_in(stack: contextlib.AsyncExitStack, client: httpx.AsyncClient,
                        url: str) -> WebSocketViewer | str:
    """A web viewer on the replica at ``url`` (ticket from ``client``), kept open in ``stack``; or
    the reason the replica closed the WebSocket with."""
    ticket = (await client.get("/kvm/m1/ticket")).json()["ticket"]
    try:
        return await stack.enter_async_context(web_viewer(url, ticket))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == 1011, closed
        return closed.rcvd.reason


async def room(stack: contextlib.AsyncExitStack, client: httpx.AsyncClient, url: str) -> WebSocketViewer | None:
    viewer = await web_viewer_in(stack, client, url)
    return viewer if isinstance(viewer, WebSocketViewer) else None


async def test_viewer_on_another_replica(nc, services, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A ticket from Redfish replica 1 opens the WebSocket on replica 2 (another process on the
    same bus): the screen comes (SeaBIOS's text, not one colour), a key reaches the guest, and the
    service says it has control. A second web viewer (on replica 1) watches: its subprotocol says
    so, its keys are dropped, and its page says another viewer has control. The web viewers of
    both replicas together are limited (kvm.WEB_VIEWERS)."""
    ports = [free_tcp_port(), free_tcp_port()]
    config = machine_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{ports[0]}"')
    second_config = short_dir / "replica.toml"
    second_config.write_text(config.read_text().replace(f":{ports[0]}", f":{ports[1]}"))
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": USER_PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    await services("redfish", second_config)
    urls = [f"https://127.0.0.1:{port}" for port in ports]
    replicas = [httpx.AsyncClient(base_url=url, verify=False, auth=(USER, USER_PASSWORD)) for url in urls]

    async def up(client: httpx.AsyncClient) -> bool:
        try:
            return (await client.get("/redfish/v1/Managers/m1")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        for client in replicas:
            await wait_for(lambda client=client: up(client), timeout=30, message=f"Redfish at {client.base_url}")
        await wait_for(lambda: KEY_GUEST_READY in serial_log(short_dir, "m1"), timeout=60, message="the guest up")
        ticket = (await replicas[0].get("/kvm/m1/ticket")).json()["ticket"]
        async with web_viewer(urls[1], ticket) as holder:
            assert holder.socket.subprotocol == CONTROL_PROTOCOL
            assert await holder.frame() > 1
            await holder.press("w")
            await wait_for(lambda: typed(short_dir).endswith("w"), timeout=30, message="the key through replica 2")

            watcher_ticket = (await replicas[0].get("/kvm/m1/ticket")).json()["ticket"]
            async with web_viewer(urls[0], watcher_ticket) as watcher:
                assert watcher.socket.subprotocol == VIEW_PROTOCOL
                assert await watcher.frame() > 1
                await watcher.press("v")
                await holder.press("h")
                await wait_for(lambda: typed(short_dir).endswith("h"), timeout=30, message="the holder's key")
                assert typed(short_dir) == "wh"

            async with chromium() as browser:
                page = await logged_in_page(browser, USER, USER_PASSWORD)
                await page.goto(f"{urls[0]}/kvm/m1")
                await page.wait_for_selector("body[data-state='connected']", timeout=60_000)
                assert "view only (another viewer has control)" in await page.inner_text("#status")
                assert await page.is_disabled("#keys")

            # the machine service counts the web viewers, whichever replica serves them: with the
            # holder, more on both replicas fill WEB_VIEWERS (each tried again while the page's and
            # the watcher's streams may still be closing), then both replicas turn the next away
            async with contextlib.AsyncExitStack() as more:
                for number in range(WEB_VIEWERS - 1):
                    await wait_for(lambda number=number: room(more, replicas[number % 2], urls[number % 2]),
                                   timeout=30, message="room for a web viewer")
                for client, url in zip(replicas, urls, strict=True):
                    reason = await web_viewer_in(more, client, url)
                    assert reason == f"machine m1 has {WEB_VIEWERS} web console viewers already", reason
                # a viewer that is not the web page's (a VNC listener's) is not one of them
                await (await open_kvm(nc, "m1")).close()
    finally:
        for client in replicas:
            await client.aclose()


@pytest.mark.parametrize("value", ["one", 1, ""])
def test_kvm_control_must_be_all_or_first(value: object) -> None:
    with pytest.raises(ConfigError, match=r"vm\.m1\.kvm_control: must be"):
        parse({"vm": {"m1": {"cmd": ["-m", "64"], "kvm_control": value}}}, None)
    assert parse({"vm": {"m1": {"cmd": ["-m", "64"]}}}, None).vms["m1"].kvm_control == "all"
    assert parse({"vm": {"m1": {"cmd": ["-m", "64"], "kvm_control": "first"}}}, None).vms["m1"].kvm_control == "first"
