"""The web KVM: headless Chromium (Debian's, through Playwright) on ``/kvm/n1`` shows the machine's
screen (the same text cells as the machine's own screendump), types into a real guest that reads
the keyboard through the BIOS and echoes each key to its serial port, reconnects by itself after
a power cycle and a restart of the machine service; a ReadOnly user's keys never reach the guest,
even from a page that sends them; a foreign Origin is refused; the Manager links it
(GraphicalConsole) and serves the screenshot (OEM)."""

from __future__ import annotations

import base64
import signal
import ssl
from pathlib import Path

import httpx
import pytest
from browser import chromium, logged_in_page
from conftest import free_tcp_port, toml_list, wait_for, write_config
from guest_images import KEY_GUEST_READY, key_echo_disk
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import ConsoleHistory, PowerRequest, PowerStatus
from test_web_console import basic_auth
from websockets.asyncio import client as websockets_client
from websockets.exceptions import ConnectionClosed

USER, PASSWORD = "admin", "s3cret-Pass"
WATCHER, WATCHER_PASSWORD = "watcher", "watch-Pass1"
READY = KEY_GUEST_READY.encode() + b"\r\n"


#: The text cells (9x16 pixels in VGA text mode, 8x8 otherwise) of an image that hold something
#: other than the background (its top-left pixel), as a string of 0 and 1, row by row.
CELLS = """(image) => {
    const {width, height, data} = image;
    const [cw, ch] = width === 720 && height === 400 ? [9, 16] : [8, 8];
    const grey = (i) => (data[i] * 299 + data[i + 1] * 587 + data[i + 2] * 114) / 1000;
    const background = grey(0);
    let cells = "";
    const columns = Math.ceil(width / cw);
    for (let y = 0; y < height; y += ch) {
        for (let x = 0; x < width; x += cw) {
            let set = false;
            for (let dy = 0; dy < ch && y + dy < height && !set; dy++)
                for (let dx = 0; dx < cw && x + dx < width; dx++)
                    if (Math.abs(grey(((y + dy) * width + x + dx) * 4) - background) > 32) { set = true; break; }
            cells += set ? "1" : "0";
        }
    }
    return {width, height, columns, cells};
}"""
CANVAS_CELLS = f"""() => {{
    const canvas = document.querySelector("#screen canvas");
    if (!canvas || !canvas.width) return null;
    return ({CELLS})(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height));
}}"""
PNG_CELLS = f"""async (png) => {{
    const image = new Image();  // the page's CSP takes images from data: URLs (not fetches)
    image.src = "data:image/png;base64," + png;
    await image.decode();
    const canvas = new OffscreenCanvas(image.naturalWidth, image.naturalHeight);
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    return ({CELLS})(context.getImageData(0, 0, canvas.width, canvas.height));
}}"""


async def typed(nc) -> bytes | None:
    """What the guest echoed since it said KVM-READY (None before)."""
    try:
        history = await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
    except BusError:
        return None
    if READY not in history.data:
        return None
    return history.data.rsplit(READY, 1)[1]


async def test_web_kvm(nc, services, short_dir: Path):
    port = free_tcp_port()
    argv = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults", "-vga", "std",
            "-drive", f"if=none,id=hd0,file={key_echo_disk(short_dir)},format=raw,snapshot=on",
            "-device", "ide-hd,drive=hd0,bootindex=1"]
    config = write_config(short_dir, f'[redfish]\nlisten = "127.0.0.1:{port}"\n[vm.n1]\ncmd = {toml_list(argv)}\n')
    state = await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    machine = await services("machine", config, "--stop-vms-on-exit")
    await services("redfish", config)
    url = f"https://127.0.0.1:{port}"
    admin = httpx.AsyncClient(base_url=url, verify=False, auth=(USER, PASSWORD))
    try:
        await wait_for(lambda: manager_up(admin), timeout=30, message="the Manager")
        manager = (await admin.get("/redfish/v1/Managers/n1")).json()
        assert manager["GraphicalConsole"] == {"ServiceEnabled": True, "MaxConcurrentSessions": 4,
                                               "ConnectTypesSupported": ["KVMIP"]}
        oem = manager["Oem"]["QemuBmc"]
        assert oem["GraphicalConsoleURI"] == "/kvm/n1"
        assert oem["ScreenshotURI"] == "/redfish/v1/Managers/n1/Oem/QemuBmc/Screenshot"
        made = await admin.post("/redfish/v1/AccountService/Accounts",
                                json={"UserName": WATCHER, "Password": WATCHER_PASSWORD, "RoleId": "ReadOnly"})
        assert made.status_code == 201, made.text
        # the console page links the KVM page
        assert 'href="/kvm/n1"' in (await admin.get("/console/n1")).text
        # anonymous: no page, no screenshot, no WebSocket; noVNC itself is public
        async with httpx.AsyncClient(base_url=url, verify=False) as anonymous:
            assert (await anonymous.get("/kvm/n1")).status_code == 401
            assert (await anonymous.get("/kvm/n1/ticket")).status_code == 401
            assert (await anonymous.get(oem["ScreenshotURI"])).status_code == 401
            module = await anonymous.get("/console/static/novnc/core/rfb.js")
            assert module.status_code == 200 and "javascript" in module.headers["content-type"]
        await kvm_refused(port)
        # off: no screenshot (409), the page says why and connects once the machine is on
        off = await admin.get(oem["ScreenshotURI"])
        assert off.status_code == 409, off.text

        async with chromium() as browser:
            page = await logged_in_page(browser, USER, PASSWORD)
            await page.goto(f"{url}/kvm/n1")
            # the page's CSP forbids eval (page.wait_for_function): selectors and page.evaluate
            await page.wait_for_selector("#status:has-text('the machine is off')", timeout=30_000)
            await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
            await wait_for(lambda: booted(nc, 1), timeout=120, interval=0.5, message="KVM-READY on COM1")
            await page.wait_for_selector("body[data-state='connected']", timeout=60_000)
            await same_screen(admin, page, oem["ScreenshotURI"])

            # typing on the page reaches the guest
            await page.click("#screen canvas")
            await page.keyboard.type("kvm42")
            await wait_for(lambda: has_typed(nc, b"kvm42"), timeout=60, message="kvm42 echoed on COM1")

            # a ReadOnly user watches; its keys are dropped by the service even when its page sends them
            watcher = await logged_in_page(browser, WATCHER, WATCHER_PASSWORD)
            await watcher.goto(f"{url}/kvm/n1")
            await watcher.wait_for_selector("body[data-state='connected']", timeout=60_000)
            assert "view only" in await watcher.inner_text("#status")
            assert await watcher.is_disabled("#keys")
            await same_screen(admin, watcher, oem["ScreenshotURI"])
            await watcher.evaluate("() => { window.rfb.viewOnly = false; }")
            await watcher.click("#screen canvas")
            await watcher.keyboard.type("rrr")
            await watcher.evaluate("() => window.rfb.sendKey(0x72, 'KeyR')")  # 'r', as noVNC sends it
            await page.click("#screen canvas")
            await page.keyboard.type("z")
            echoed = await wait_for(lambda: has_typed(nc, b"z"), timeout=60, message="z echoed on COM1")
            assert b"r" not in echoed, echoed

            # a malformed RFB message on the WebSocket ends that connection only (QEMU never sees it)
            await malformed_viewer(port)
            await page.keyboard.type("ok")
            await wait_for(lambda: has_typed(nc, b"zok"), timeout=60, message="ok echoed on COM1")
            assert (await page.get_attribute("body", "data-state")) == "connected"

            # the send-keys menu: Ctrl-Alt-Del is a key press the guest's BIOS takes (a reboot)
            await page.select_option("#keys", "ctrl-alt-del")
            await wait_for(lambda: booted(nc, 2), timeout=120, interval=0.5, message="KVM-READY again")
            await page.wait_for_selector("body[data-state='connected']", timeout=60_000)

            # a power cycle: the page goes, and comes back with a fresh ticket
            await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="off"), PowerStatus, timeout=30)
            await page.wait_for_selector("body[data-state='disconnected']", timeout=60_000)
            await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
            await page.wait_for_selector("body[data-state='connected']", timeout=120_000)
            await wait_for(lambda: booted(nc, 3), timeout=120, interval=0.5, message="KVM-READY after power on")
            await same_screen(admin, page, oem["ScreenshotURI"])

            # the machine service killed (QEMU runs on) and started again (it adopts QEMU): the page
            # connects again
            await machine.stop(signal.SIGKILL)
            await page.wait_for_selector("body[data-state='disconnected']", timeout=60_000)
            await services("machine", config, "--stop-vms-on-exit")
            await page.wait_for_selector("body[data-state='connected']", timeout=120_000)
            await page.click("#screen canvas")
            await page.keyboard.type("back")
            # (the new machine service's console history starts with what QEMU writes from now on)
            await wait_for(lambda: in_history(nc, b"back"), timeout=60, message="back echoed on COM1")

        # nobody to check a login (no state service): an outage, 503, for the page and the handshake
        await state.stop()
        unchecked = ("someone", "never-checked")
        async with httpx.AsyncClient(base_url=url, verify=False, auth=unchecked) as client:
            response = await client.get("/kvm/n1")
            assert response.status_code == 503, response.text
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        with pytest.raises(websockets_client.InvalidStatus) as refused:
            async with websockets_client.connect(f"wss://127.0.0.1:{port}/kvm/n1/ws", ssl=insecure,
                                                 additional_headers={"Authorization": basic_auth(*unchecked)}):
                pass
        assert refused.value.response.status_code == 503
    finally:
        await admin.aclose()


async def manager_up(client: httpx.AsyncClient) -> bool:
    return (await client.get("/redfish/v1/Managers/n1")).status_code == 200


async def has_typed(nc, text: bytes) -> bytes | None:
    echoed = await typed(nc)
    return echoed if echoed is not None and text in echoed else None


async def in_history(nc, text: bytes) -> bool:
    try:
        history = await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
    except BusError:
        return False
    return text in history.data


async def boots(nc) -> int:
    """How many times the guest has said KVM-READY (in the console's history)."""
    try:
        history = await bus.request(nc, "n1", subjects.CONSOLE_GET, None, ConsoleHistory, timeout=2)
    except BusError:
        return 0
    return history.data.count(READY)


async def booted(nc, times: int) -> bool:
    return await boots(nc) >= times


async def same_screen(admin: httpx.AsyncClient, page, screenshot_uri: str) -> None:
    """The canvas shows the text cells of the machine's own screendump (the same size), and they
    hold text (SeaBIOS's banner, the guest's KVM-READY: some cell rows set, others not)."""
    last: list = []

    async def matching() -> bool:
        response = await admin.get(screenshot_uri)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
        expected = await page.evaluate(PNG_CELLS, base64.b64encode(response.content).decode())
        shown = await page.evaluate(CANVAS_CELLS)
        last[:] = [expected, shown]
        return shown == expected and expected["cells"].count("1") > 10

    await wait_for(matching, timeout=60, interval=0.5, message="the canvas showing the screendump")
    cells, columns = last[0]["cells"], last[0]["columns"]
    assert len({cells[start:start + columns] for start in range(0, len(cells), columns)}) > 1  # not uniform


async def malformed_viewer(port: int) -> None:
    """A viewer (with credentials) that goes through the RFB handshake on the WebSocket and then
    sends a message of a type RFB does not have: closed with 1008 (policy violation)."""
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    async with websockets_client.connect(f"wss://127.0.0.1:{port}/kvm/n1/ws", ssl=insecure,
                                         additional_headers={"Authorization": basic_auth(USER, PASSWORD)}) as socket:
        received = bytearray()

        async def take(n: int) -> bytes:
            while len(received) < n:
                received.extend(await socket.recv())
            data = bytes(received[:n])
            del received[:n]
            return data

        assert await take(12) == b"RFB 003.008\n"
        await socket.send(b"RFB 003.008\n")
        assert await take(2) == b"\x01\x01"  # one security type: None
        await socket.send(b"\x01")
        assert await take(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
        await socket.send(b"\x01")  # ClientInit
        name_length = int.from_bytes((await take(24))[20:24], "big")
        await take(name_length)  # ServerInit's desktop name
        await socket.send(b"\x99" + bytes(64))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await socket.recv()  # framebuffer updates may come first
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, closed.value


async def kvm_refused(port: int) -> None:
    """No credentials, wrong ones, a made-up ticket, or a foreign Origin (even with credentials): 403."""
    ws_url = f"wss://127.0.0.1:{port}/kvm/n1/ws"
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    good = {"Authorization": basic_auth(USER, PASSWORD)}
    for url, headers in ((ws_url, {}), (ws_url, {"Authorization": basic_auth(USER, "wrong")}),
                         (ws_url + "?ticket=nope", {}),
                         (ws_url, {**good, "Origin": "https://evil.example"}),
                         (ws_url, {**good, "Origin": f"https://127.0.0.1:{port + 1}"})):
        with pytest.raises(websockets_client.InvalidStatus) as refused:
            async with websockets_client.connect(url, ssl=insecure, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 403, (url, headers)
    # the service's own origin, with credentials: QEMU's RFB greeting (through the bus) or, while
    # the machine is off, a close with the reason
    async with websockets_client.connect(ws_url, ssl=insecure,
                                         additional_headers={**good, "Origin": f"https://127.0.0.1:{port}"}) as socket:
        with pytest.raises(ConnectionClosed) as closed:
            await socket.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.reason == "the machine is off"
