"""The web serial console: a real guest's interactive shell on ttyS0, driven from headless
Chromium (Debian's, through Playwright) on ``/console/n1``; its WebSocket refused without
credentials, and opened on another Redfish replica with the ticket of a page."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from pathlib import Path

import httpx
import pytest
from browser import chromium, logged_in_page
from conftest import free_tcp_port, toml_list, wait_for, write_config
from linux_guest import LinuxGuest
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleHistory, PowerRequest, PowerStatus
from websockets.asyncio import client as websockets_client

USER, PASSWORD = "admin", "s3cret-Pass"
SHELL = "echo GUEST-SHELL; exec setsid sh -c 'exec sh -i <>/dev/ttyS0 >&0 2>&1'\n"
BUFFER_TEXT = """() => {
    const buffer = window.term.buffer.active;
    const lines = [];
    for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
    return lines.join("\\n");
}"""

def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def history(nc) -> ConsoleHistory | None:
    try:
        return await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
    except BusError:
        return None


async def test_web_console_shell(nc, services, short_dir: Path, tmp_path: Path, linux_guest: LinuxGuest):
    port, replica_port = free_tcp_port(), free_tcp_port()
    argv = linux_guest.qemu_args(linux_guest.initrd(SHELL, short_dir))
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n[vm.n1]\ncmd = {toml_list(argv)}\n')
    replica = short_dir / "replica.toml"
    replica.write_text(config.read_text().replace(f":{port}", f":{replica_port}"))
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    await services("redfish", replica)
    url = f"https://127.0.0.1:{port}"
    await wait_for(lambda: history(nc), timeout=30, message="console.get answering")
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)

    async def shell_up() -> bool:
        found = await history(nc)
        return found is not None and b"GUEST-SHELL" in found.data

    await wait_for(shell_up, timeout=240, interval=0.5, message="the guest's shell on ttyS0")

    # the page and its WebSocket need a login
    async with httpx.AsyncClient(base_url=url, verify=False) as anonymous:
        response = await anonymous.get("/console/n1")
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
        assert (await anonymous.get("/console/static/xterm/xterm.js")).status_code == 200
    ws_url = f"wss://127.0.0.1:{port}/console/n1/ws"
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    for headers in ({}, {"Authorization": basic_auth(USER, "wrong")}):
        with pytest.raises(websockets_client.InvalidStatus) as refused:
            async with websockets_client.connect(ws_url, ssl=insecure, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403
    with pytest.raises(websockets_client.InvalidStatus):  # a made-up ticket is no better
        async with websockets_client.connect(ws_url + "?ticket=nope", ssl=insecure):
            pass
    # with credentials (Basic, as a script would send them), the recent output comes first
    basic = {"Authorization": basic_auth(USER, PASSWORD)}
    async with websockets_client.connect(ws_url, ssl=insecure, additional_headers=basic) as socket:
        assert b"GUEST-SHELL" in await socket.recv()

    # a page's ticket opens its WebSocket on another replica (as behind a load balancer), once
    async with httpx.AsyncClient(base_url=url, verify=False, auth=(USER, PASSWORD)) as client:
        page = await client.get("/console/n1")
    assert page.status_code == 200, page.text
    used = re.search(r'data-ticket="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    async with websockets_client.connect(f"wss://127.0.0.1:{replica_port}/console/n1/ws?ticket={used}",
                                         ssl=insecure) as socket:
        assert b"GUEST-SHELL" in await socket.recv()
    with pytest.raises(websockets_client.InvalidStatus) as refused:
        async with websockets_client.connect(f"{ws_url}?ticket={used}", ssl=insecure):
            pass
    assert refused.value.response.status_code == 403

    async with chromium() as browser:
        page = await logged_in_page(browser, USER, PASSWORD)
        await page.goto(f"{url}/console/n1")
        # the page's Content-Security-Policy forbids eval, which page.wait_for_function uses: a
        # selector, and page.evaluate (the DevTools protocol's, which the page's CSP does not bind)
        await page.wait_for_selector("body[data-state='connected']", timeout=20_000)

        async def shown(text: str) -> bool:
            return text in await page.evaluate(BUFFER_TEXT)

        await wait_for(lambda: shown("GUEST-SHELL"), timeout=20, message="the guest's shell on the page")
        await page.click("#terminal")
        await page.keyboard.type("echo SOL-OK-$((6*7))")
        await page.keyboard.press("Enter")
        await wait_for(lambda: shown("SOL-OK-42"), timeout=30, message="the command's output on the page")
        text = await page.evaluate(BUFFER_TEXT)
        assert "echo SOL-OK-$((6*7))" in text and "SOL-OK-42" in text, text
        screenshot = tmp_path / "web-console.png"
        await page.screenshot(path=str(screenshot))
        assert screenshot.stat().st_size > 0


async def test_output_after_history_skips_what_was_sent():
    """``end`` decides what the browser still lacks: overlaps with the history are cut, and a
    machine service that started again (``end`` going back) is followed from its first byte."""
    from qemu_bmc_redfish.console import Bridge
    from qemu_bmc_shared.messages import ConsoleOutput

    class Socket:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        async def send_bytes(self, data: bytes) -> None:
            self.sent.append(data)

    class Redfish:
        nc = None

    socket = Socket()
    bridge = Bridge(Redfish(), socket, "n1", interactive=True)  # type: ignore[arg-type]
    for data, end in ((b"abc", 3), (b"cdef", 6), (b"gh", 8), (b"new", 3)):
        bridge.output.put_nowait(ConsoleOutput(machine="n1", data=data, end=end))
    task = asyncio.create_task(bridge.send_output(4))  # the history ended after "abcd"
    await wait_for(lambda: len(socket.sent) == 3, timeout=5, message="the output sent")
    task.cancel()
    assert socket.sent == [b"ef", b"gh", b"new"]
