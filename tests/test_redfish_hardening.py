"""The Redfish service against hostile input and backend faults (issue 13), with the real services
over HTTPS: request size and JSON depth limits, the security headers, the console WebSocket's
Origin check, outbound targets (virtual media, firmware, event destinations) on internal
addresses, and 503 (never 401 or 404) while the bus or a machine's service is down."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import INTERNAL_TARGETS, ServiceProcess, free_tcp_port, toml_list, wait_for, write_config
from guest_images import GuestImages
from http_server import FileServer
from qemu_bmc_redfish.outbound import TargetRefused, Targets
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import MediaStatus
from test_redfish_events import Receiver
from websockets.asyncio import client as websockets_client

USER, PASSWORD = "admin", "s3cret-Pass"
SYSTEM = "/redfish/v1/Systems/n1"
SESSIONS = "/redfish/v1/SessionService/Sessions"
CD = "/redfish/v1/Managers/n1/VirtualMedia/Cd"
INSERT = f"{CD}/Actions/VirtualMedia.InsertMedia"
SUBSCRIPTIONS = "/redfish/v1/EventService/Subscriptions"
SIMPLE_UPDATE = "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate"
MIB = 1 << 20


class Bmc:
    def __init__(self, nc: Any, port: int, redfish: ServiceProcess, machine: ServiceProcess) -> None:
        self.nc, self.port, self.redfish, self.machine = nc, port, redfish, machine
        self.url = f"https://127.0.0.1:{port}"

    def client(self, user: str | None = USER, password: str = PASSWORD, **options: Any) -> httpx.AsyncClient:
        auth = (user, password) if user is not None else None
        return httpx.AsyncClient(base_url=self.url, auth=auth, verify=False, timeout=120, **options)

    def rss(self) -> int:
        """The Redfish process's resident memory, in bytes."""
        assert self.redfish.process is not None
        status = Path(f"/proc/{self.redfish.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


async def start_bmc(nc: Any, services: Any, directory: Path, images: GuestImages, redfish_extra: str = "") -> Bmc:
    port = free_tcp_port()
    config = write_config(directory, f'[redfish]\nlisten = "127.0.0.1:{port}"\n{redfish_extra}'
                                     f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    machine = await services("machine", config, "--stop-vms-on-exit")
    redfish = await services("redfish", config)
    return Bmc(nc, port, redfish, machine)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> Bmc:
    return await start_bmc(nc, services, short_dir, images)


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].rsplit(".", 1)[1]


def insecure() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


# ------------------------------------------------------------------------------------ limits


async def test_oversized_bodies_get_413_and_memory_stays_flat(bmc: Bmc):
    """A 64 MiB body gets 413 (read and dropped, so that the client reads the answer); a flood of
    them from one address gets 413 or, past what one address may have read so, its connection
    cut; either way the service's memory stays within 20 MiB of its start."""
    async with bmc.client(None) as anonymous:
        for _ in range(3):  # warmed up: what the first requests allocate once is not counted
            assert (await anonymous.post(SESSIONS, json={"UserName": USER, "Password": "wrong"})).status_code == 401
    start = peak = bmc.rss()
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, bmc.rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    body = bytes(64 * MIB)

    async def post(content: Any) -> httpx.Response | None:
        """The answer, or None when the connection was cut."""
        async with bmc.client(None) as anonymous:
            try:
                return await anonymous.post(SESSIONS, content=content, headers={"Content-Type": "application/json"})
            except httpx.TransportError:
                return None

    async def chunks() -> Any:
        for _ in range(64):
            yield bytes(MIB)

    async def eight_mib_in_a_row() -> list[httpx.Response | None]:
        """Refused bodies one after the other (each refused connection once kept its TLS buffers
        until its linger timer fired, long after the client had gone)."""
        return [await post(body[:8 * MIB]) for _ in range(12)]

    try:
        answered = [await post(body)]
        answered.append(await post(chunks()))  # chunked: no Content-Length, cut off once past the limit
        flood = list(await asyncio.gather(*(post(body) for _ in range(4))))
        for in_a_row in await asyncio.gather(*(eight_mib_in_a_row() for _ in range(4))):
            flood += in_a_row
    finally:
        sampling = False
        await sampler
    for response in answered + [response for response in flood if response is not None]:
        assert response is not None and response.status_code == 413, response
        assert message_id(response) == "PayloadTooLarge" and response.headers["Connection"] == "close"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert peak - start < 20 * MIB, f"RSS went from {start >> 20} to {peak >> 20} MiB"

    # a Content-Length over the limit is answered before any of the body is sent
    reader, writer = await asyncio.open_connection("127.0.0.1", bmc.port, ssl=insecure())
    writer.write(f"POST {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {64 * MIB}\r\nExpect: 100-continue\r\n\r\n".encode())
    status_line = await asyncio.wait_for(reader.readline(), 60)
    assert status_line.startswith(b"HTTP/1.1 413 "), status_line
    writer.close()

    async with bmc.client() as client:
        assert (await client.get(SYSTEM)).status_code == 200  # still serving
        assert (await client.post(SESSIONS, json={"UserName": USER, "Password": PASSWORD})).status_code == 201


async def test_deep_json_and_big_heads_are_refused(bmc: Bmc):
    deep_array = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    nested_100 = b'{"UserName":' + b"[" * 99 + b"]" * 99 + b"}"
    async with bmc.client(None) as anonymous, bmc.client() as client:
        for body in (deep_array, deep_object, nested_100):
            response = await anonymous.post(SESSIONS, content=body)
            assert response.status_code == 400 and message_id(response) == "MalformedJSON", response.text[:200]
            response = await client.patch(SYSTEM, content=body)
            assert response.status_code == 400 and message_id(response) == "MalformedJSON", response.text[:200]
        within_limit = b'{"Boot":' + b'{"a":' * 62 + b"1" + b"}" * 63  # read, then refused for what it says
        response = await client.patch(SYSTEM, content=within_limit)
        assert response.status_code == 400 and message_id(response) == "PropertyUnknown", response.text
        response = await client.get("/redfish/v1/Systems",  # deeper than the $filter parser goes
                                    params={"$filter": "(" * 5_000 + "Id eq 'n1'" + ")" * 5_000})
        assert response.status_code == 400, response.text[:200]
        response = await anonymous.get("/redfish/v1", headers={"X-Padding": "a" * 100_000})
        assert response.status_code == 431 and response.headers["Connection"] == "close"
        response = await anonymous.get("/redfish/v1", headers={f"X-Padding-{n}": "a" for n in range(3000)})
        assert response.status_code == 431
        assert (await client.get(SYSTEM)).status_code == 200  # still serving


# ------------------------------------------------------------------------------------ headers


async def test_security_headers_on_every_kind_of_response(bmc: Bmc):
    async with bmc.client(None) as anonymous, bmc.client() as client:
        responses = {
            "service root": await anonymous.get("/redfish/v1"),
            "401": await anonymous.get(SYSTEM),
            "resource": await client.get(SYSTEM),
            "404": await client.get("/redfish/v1/NoSuchThing"),
            "405": await client.delete(SYSTEM),
            "session": await anonymous.post(SESSIONS, json={"UserName": USER, "Password": PASSWORD}),
            "console page": await client.get("/console/n1"),
            "static file": await anonymous.get("/console/static/console.js"),
            "413": await anonymous.post(SESSIONS, content=bytes(2 * MIB)),
            "501": await client.request("BREW", SYSTEM),
        }
    for kind, response in responses.items():
        headers = response.headers
        assert headers["X-Frame-Options"] == "DENY", kind
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], kind
        assert headers["X-Content-Type-Options"] == "nosniff", kind
        assert headers["Referrer-Policy"] == "no-referrer", kind
        assert headers["Strict-Transport-Security"].startswith("max-age="), kind
    assert responses["resource"].headers["Cache-Control"] == "no-store"
    assert responses["session"].status_code == 201 and responses["session"].headers["Cache-Control"] == "no-store"
    page_policy = responses["console page"].headers["Content-Security-Policy"]
    assert "script-src 'self'" in page_policy and "connect-src 'self'" in page_policy
    assert responses["static file"].status_code == 200
    assert (responses["413"].status_code, responses["501"].status_code) == (413, 501)


async def test_cross_origin_console_websocket_is_refused(bmc: Bmc):
    url = f"wss://127.0.0.1:{bmc.port}/console/n1/ws"
    basic = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    for origin in ("https://evil.example", f"http://127.0.0.1:{bmc.port}", f"https://127.0.0.1:{bmc.port + 1}",
                   "null"):
        with pytest.raises(websockets_client.InvalidStatus) as refused:
            async with websockets_client.connect(url, ssl=insecure(), additional_headers=basic, origin=origin):
                pass
        assert refused.value.response.status_code == 403, origin
    # with a valid ticket from the page too
    async with bmc.client() as client:
        page = (await client.get("/console/n1")).text
    ticket = page.split('data-ticket="', 1)[1].split('"', 1)[0]
    with pytest.raises(websockets_client.InvalidStatus):
        async with websockets_client.connect(f"{url}?ticket={ticket}", ssl=insecure(), origin="https://evil.example"):
            pass
    for origin in (f"https://127.0.0.1:{bmc.port}", None):  # the page's own origin, or none (not a browser)
        async with websockets_client.connect(url, ssl=insecure(), additional_headers=basic, origin=origin) as socket_:
            await socket_.ping()


# ------------------------------------------------------------------------------------ outbound targets


def this_hosts_address() -> str | None:
    """This host's address on its default route, if it has one besides loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_internal_targets_are_refused_by_default(bmc: Bmc, images: GuestImages):
    own = this_hosts_address()
    internal = ["http://127.0.0.1:8080/boot.iso", "http://localhost/boot.iso", "http://[::1]/boot.iso",
                "http://[::ffff:127.0.0.1]/boot.iso", "http://169.254.169.254/latest/meta-data",
                "http://0.0.0.0/boot.iso", "http://224.0.0.1/boot.iso", *([f"http://{own}/boot.iso"] if own else [])]
    with FileServer(images.iso.parent) as files:
        internal.append(files.url(images.iso.name))
        async with Receiver() as receiver, bmc.client() as client:
            for url in internal:
                response = await client.post(INSERT, json={"Image": url})
                assert response.status_code == 400 and message_id(response) == "ActionParameterValueError", url
                assert "allow_internal_targets" in response.text, response.text
                response = await client.patch(CD, json={"Image": url, "Inserted": True})
                assert response.status_code == 400 and message_id(response) == "PropertyValueError", url
                response = await client.post(SIMPLE_UPDATE, json={"ImageURI": url, "Targets": [SYSTEM]})
                assert response.status_code == 400 and message_id(response) == "ActionParameterValueError", url
                response = await client.post(SUBSCRIPTIONS, json={"Destination": url, "Protocol": "Redfish"})
                assert response.status_code == 400 and message_id(response) == "PropertyValueIncorrect", url
                assert "Destination" in response.json()["error"]["@Message.ExtendedInfo"][0]["MessageArgs"]
            response = await client.post(SUBSCRIPTIONS, json={"Destination": receiver.url("/events"),
                                                              "Protocol": "Redfish"})
            assert response.status_code == 400 and message_id(response) == "PropertyValueIncorrect"
            assert (await client.get(SUBSCRIPTIONS)).json()["Members"] == []
    media = await bus.request(bmc.nc, "n1", subjects.MEDIA_GET, None, MediaStatus)
    assert not media.inserted


async def test_internal_targets_with_the_option(nc, services, short_dir: Path, images: GuestImages):
    """With ``allow_internal_targets``: an image on 127.0.0.1 is inserted, and an event receiver on
    127.0.0.1 gets the power events with the standard headers and the subscription's only."""
    bmc = await start_bmc(nc, services, short_dir, images, INTERNAL_TARGETS)
    with FileServer(images.iso.parent) as files:
        async with Receiver() as receiver, bmc.client() as client:
            response = await client.post(INSERT, json={"Image": files.url(images.iso.name)})
            assert response.status_code == 204, response.text
            response = await client.post(SUBSCRIPTIONS, json={
                "Destination": receiver.url("/events"), "Protocol": "Redfish",
                "HttpHeaders": [{"X-Receiver-Token": "t0p-secret"}]})
            assert response.status_code == 201, response.text
            reset = f"{SYSTEM}/Actions/ComputerSystem.Reset"
            assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
            await wait_for(lambda: receiver.posts, timeout=30, message="the power event")
            assert (await client.post(reset, json={"ResetType": "ForceOff"})).status_code == 204
    _, headers, _ = receiver.posts[0]
    assert set(headers) <= {"host", "accept", "accept-encoding", "connection", "user-agent", "content-length",
                            "content-type", "odata-version", "x-receiver-token"}, headers
    assert headers["x-receiver-token"] == "t0p-secret" and headers["user-agent"] == "qemu-bmc"


async def test_targets_check_every_address_and_pin_the_checked_one():
    """The check itself, with this host's resolver: a name is refused for any internal address it
    resolves to; a delivery goes to the address checked, naming the host in Host and TLS SNI."""
    targets = Targets(False, lambda: ["198.51.100.7:623"])
    for url in ("http://localhost/", "https://[fe80::1]/", "http://198.51.100.7/"):
        with pytest.raises(TargetRefused):
            await targets.check(url)
    assert await targets.check("https://listener.invalid/events") == []
    assert await targets.pinned("https://listener.invalid/events") is None
    assert [str(address) for address in await targets.check("http://203.0.113.9:8080/x")] == ["203.0.113.9"]
    url, host, extensions = await targets.pinned("https://203.0.113.9:8443/events") or ("", {}, {})
    assert (url, host, extensions) == ("https://203.0.113.9:8443/events", {"Host": "203.0.113.9:8443"}, {})
    allowed = Targets(True, lambda: [])
    assert await allowed.pinned("http://localhost:8000/x") == ("http://localhost:8000/x", {}, {})


# ------------------------------------------------------------------------------------ outages


async def statuses_until(client: httpx.AsyncClient, path: str, wanted: int, seen: list[int],
                         timeout: float = 60) -> httpx.Response:
    """GET ``path`` until it answers ``wanted``, keeping every status seen meanwhile."""
    last: list[httpx.Response] = []

    async def answered() -> bool:
        response = await client.get(path)
        seen.append(response.status_code)
        last[:] = [response]
        return response.status_code == wanted

    await wait_for(answered, timeout=timeout, interval=0.2, message=f"{path} answering {wanted}")
    return last[0]


def unavailable(response: httpx.Response) -> bool:
    return (response.status_code == 503 and message_id(response) == "ServiceTemporarilyUnavailable"
            and int(response.headers["Retry-After"]) > 0)


async def test_bus_outage_is_503_never_401_then_back(bmc: Bmc, nats_server):
    async with bmc.client(None) as anonymous:
        login = await anonymous.post(SESSIONS, json={"UserName": USER, "Password": PASSWORD})
        assert login.status_code == 201
    token = {"X-Auth-Token": login.headers["X-Auth-Token"]}
    seen: list[int] = []
    async with bmc.client() as basic, bmc.client(None, headers=token) as session, bmc.client(None) as anonymous:
        await nats_server.stop()
        assert unavailable(await statuses_until(basic, SYSTEM, 503, seen))
        assert unavailable(await session.get(SYSTEM))
        assert unavailable(await anonymous.get(SYSTEM))
        assert unavailable(await anonymous.post(SESSIONS, json={"UserName": USER, "Password": PASSWORD}))
        assert unavailable(await basic.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": "On"}))
        assert (await anonymous.get("/redfish/v1")).status_code == 200  # what needs no bus is served
        await nats_server.start()  # the same port and JetStream store
        await statuses_until(basic, SYSTEM, 200, seen)
        await statuses_until(session, SYSTEM, 200, seen)  # the session lives in JetStream: it is still good
        assert (await anonymous.get(SYSTEM)).status_code == 401
    assert set(seen) <= {200, 503}, seen


async def test_killed_machine_service_is_503_not_404(bmc: Bmc):
    seen: list[int] = []
    async with bmc.client() as client:
        assert (await client.get(SYSTEM)).status_code == 200
        await bmc.machine.stop(signal.SIGKILL)
        await statuses_until(client, SYSTEM, 503, seen)

        # once discovery has forgotten its machine service (the collection no longer lists n1)
        async def forgotten() -> bool:
            response = await client.get("/redfish/v1/Systems")
            seen.append(response.status_code)
            return response.status_code == 200 and response.json()["Members"] == []

        await wait_for(forgotten, timeout=60, interval=0.5, message="n1 gone from the Systems collection")
        for path in (SYSTEM, "/redfish/v1/Chassis/n1", f"{SYSTEM}/VirtualMedia/Cd"):
            assert unavailable(await client.get(path)), path
        assert unavailable(await client.post(f"{SYSTEM}/Actions/ComputerSystem.Reset", json={"ResetType": "On"}))
        manager = await client.get("/redfish/v1/Managers/n1")  # the state service's: still served
        assert manager.status_code == 200, manager.text
        response = await client.get("/redfish/v1/Systems/never-known")
        assert response.status_code == 404 and message_id(response) == "ResourceNotFound"
    async with bmc.client(password="wrong") as wrong:
        assert (await wrong.get(SYSTEM)).status_code == 401  # the state service checks logins still
    assert set(seen) <= {200, 503}, seen
