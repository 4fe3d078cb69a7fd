"""Redfish events of real QEMU machines: Server-Sent Events, and push subscriptions (EventDestination)
POSTed to an HTTP receiver in the test, by two Redfish replicas sharing their subscriptions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from conftest import INTERNAL_TARGETS, free_tcp_port, wait_for, write_config
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PasswordSet, User, UserAccessUpdate, UserUpdate
from test_redfish import PASSWORD, USER, Service, redfish  # noqa: F401  (the fixture)

RESET = "/redfish/v1/Systems/n1/Actions/ComputerSystem.Reset"
SUBSCRIPTIONS = "/redfish/v1/EventService/Subscriptions"
POWERED_ON, POWERED_OFF = "ResourceEvent.1.4.ResourcePoweredOn", "ResourceEvent.1.4.ResourcePoweredOff"


class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that answers 204 to every request and keeps the POSTs."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], dict]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.readline():
                method, path, _ = request.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "POST":
                    self.posts.append((path, headers, json.loads(body)))
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def message_ids(self) -> list[str]:
        return [body["Events"][0]["MessageId"] for _, _, body in self.posts]


def message_id(response: httpx.Response) -> str:
    return response.json()["error"]["@Message.ExtendedInfo"][0]["MessageId"].rsplit(".", 1)[1]


async def test_power_changes_stream_as_redfish_events(redfish: Service):  # noqa: F811
    async with redfish.client() as client:
        service = (await client.get("/redfish/v1/EventService")).json()
        assert service["ServerSentEventUri"] == "/redfish/v1/EventService/SSE"
        assert (await client.get(SUBSCRIPTIONS)).json()["Members"] == []
        events: list[dict] = []

        async def listen() -> None:
            async with client.stream("GET", service["ServerSentEventUri"]) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        if len(events) == 2:
                            return

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.5)
        assert (await client.post(RESET, json={"ResetType": "On"})).status_code == 204
        await asyncio.sleep(1)
        assert (await client.post(RESET, json={"ResetType": "ForceOff"})).status_code == 204
        await asyncio.wait_for(listener, 30)
    records = [event["Events"][0] for event in events]
    assert [record["MessageId"] for record in records] == [POWERED_ON, POWERED_OFF], events
    assert all(record["OriginOfCondition"] == {"@odata.id": "/redfish/v1/Systems/n1"} for record in records)
    async with redfish.client(password="wrong") as wrong:
        assert (await wrong.get("/redfish/v1/EventService/SSE")).status_code == 401


async def second_replica(first: Service, services) -> Service:
    """Another Redfish service on the same bus (its own port and runtime directory)."""
    port = free_tcp_port()
    directory = first.directory / "replica"
    directory.mkdir()
    await services("redfish", write_config(directory, f'[redfish]\nlisten = "127.0.0.1:{port}"\n{INTERNAL_TARGETS}'))
    replica = Service(first.nc, Path(directory), f"https://127.0.0.1:{port}")

    async def answers() -> bool:
        try:
            async with replica.client() as client:
                return (await client.get("/redfish/v1/EventService")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(answers, timeout=15, message="the second Redfish replica")
    return replica


async def test_push_subscriptions_deliver_power_changes_once(redfish: Service, services):  # noqa: F811
    replica = await second_replica(redfish, services)
    async with Receiver() as receiver, redfish.client() as client, replica.client() as other:
        response = await client.post(SUBSCRIPTIONS, json={
            "Destination": receiver.url("/events"), "Protocol": "Redfish", "Context": "lab-1",
            "EventFormatType": "Event", "RegistryPrefixes": ["ResourceEvent"], "SubscriptionType": "RedfishEvent",
            "HttpHeaders": [{"X-Receiver-Token": "t0p-secret"}]})
        assert response.status_code == 201, response.text
        created = response.json()
        location = response.headers["Location"]
        assert location == created["@odata.id"] and location.startswith(f"{SUBSCRIPTIONS}/")
        assert created["@odata.type"] == "#EventDestination.v1_16_0.EventDestination"
        assert (created["Destination"], created["Protocol"], created["Context"]) == (
            receiver.url("/events"), "Redfish", "lab-1")
        assert created["HttpHeaders"] == [] and "t0p-secret" not in response.text

        # the other replica knows it (the JetStream bucket), and never shows its headers either
        async def listed() -> bool:
            members = (await other.get(SUBSCRIPTIONS)).json()["Members"]
            return members == [{"@odata.id": location}]

        await wait_for(listed, message="the subscription on the other replica")
        shown = await other.get(location)
        assert shown.status_code == 200 and shown.json()["Context"] == "lab-1" and "t0p-secret" not in shown.text
        kv = await redfish.nc.jetstream().key_value("qemu_bmc_redfish_subscriptions")
        assert (await kv.get(f"sub.{created['Id']}")).value

        # On, a reset (the same state again: not an event), Off: each change POSTed once, by one replica
        assert (await client.post(RESET, json={"ResetType": "On"})).status_code == 204
        await wait_for(lambda: receiver.posts, timeout=20, message="the PoweredOn event")
        assert (await other.post(RESET, json={"ResetType": "ForceRestart"})).status_code == 204
        await asyncio.sleep(1.5)
        assert (await client.post(RESET, json={"ResetType": "ForceOff"})).status_code == 204
        await wait_for(lambda: len(receiver.posts) >= 2, timeout=20, message="the PoweredOff event")
        await asyncio.sleep(1.5)
        assert receiver.message_ids() == [POWERED_ON, POWERED_OFF], receiver.posts
        for path, headers, body in receiver.posts:
            assert path == "/events" and headers["x-receiver-token"] == "t0p-secret"
            assert headers["content-type"] == "application/json"
            assert body["Context"] == "lab-1" and body["@odata.type"].startswith("#Event.")
            assert body["Events"][0]["OriginOfCondition"] == {"@odata.id": "/redfish/v1/Systems/n1"}

        # PATCH Context (on the other replica): the next event carries the new one
        response = await other.patch(location, json={"Context": "lab-2"})
        assert response.status_code == 200 and response.json()["Context"] == "lab-2"

        async def changed() -> bool:
            return (await client.get(location)).json()["Context"] == "lab-2"

        await wait_for(changed, message="the new Context on the first replica")
        response = await other.patch(location, json={"Destination": "http://example.com/"})
        assert response.status_code == 400 and message_id(response) == "PropertyNotWritable"
        assert (await client.post(RESET, json={"ResetType": "On"})).status_code == 204
        await wait_for(lambda: len(receiver.posts) >= 3, timeout=20, message="the next PoweredOn event")
        assert receiver.posts[2][2]["Context"] == "lab-2"

        # deleted: nothing more is POSTed, by either replica
        assert (await client.delete(location)).status_code == 204
        assert (await client.get(location)).status_code == 404

        async def gone() -> bool:
            return (await other.get(location)).status_code == 404

        await wait_for(gone, message="the delete on the other replica")
        assert (await client.get(SUBSCRIPTIONS)).json()["Members"] == []
        assert (await client.post(RESET, json={"ResetType": "ForceOff"})).status_code == 204
        assert (await client.post(RESET, json={"ResetType": "On"})).status_code == 204
        assert (await client.post(RESET, json={"ResetType": "ForceOff"})).status_code == 204
        await asyncio.sleep(2)
        assert receiver.message_ids() == [POWERED_ON, POWERED_OFF, POWERED_ON], receiver.posts
    assert await redfish.power() == "Off"


async def test_subscription_validation_and_privileges(redfish: Service):  # noqa: F811
    good = {"Destination": "https://listener.example:8443/redfish/events", "Protocol": "Redfish"}
    async with redfish.client() as client:
        for body, expected in (
                ({**good, "Destination": "ftp://listener.example/events"}, "PropertyValueFormatError"),
                ({**good, "Destination": "/relative/events"}, "PropertyValueFormatError"),
                ({**good, "Destination": "http://"}, "PropertyValueFormatError"),
                ({**good, "Destination": 42}, "PropertyValueTypeError"),
                ({**good, "Protocol": "SNMPv2c"}, "PropertyValueNotInList"),
                ({**good, "EventFormatType": "MetricReport"}, "PropertyValueNotInList"),
                ({**good, "SubscriptionType": "SSE"}, "PropertyValueNotInList"),
                ({**good, "RegistryPrefixes": ["TaskEvent"]}, "PropertyValueNotInList"),
                ({**good, "Context": ["not", "a", "string"]}, "PropertyValueTypeError"),
                ({**good, "HttpHeaders": [{"Content-Length": "1"}]}, "PropertyValueFormatError"),
                ({**good, "HttpHeaders": [{"X-Token": "a\r\nInjected: 1"}]}, "PropertyValueFormatError"),
                ({**good, "Frequency": "Often"}, "PropertyUnknown"),
                ({"Protocol": "Redfish"}, "CreateFailedMissingReqProperties"),
                ({"Destination": good["Destination"]}, "CreateFailedMissingReqProperties")):
            response = await client.post(SUBSCRIPTIONS, json=body)
            assert response.status_code == 400, (body, response.text)
            assert message_id(response) == expected, (body, response.text)
        response = await client.post(SUBSCRIPTIONS, content=b"{nope")
        assert response.status_code == 400 and message_id(response) == "MalformedJSON"
        assert "******" in (await client.post(SUBSCRIPTIONS, json={
            **good, "HttpHeaders": [{"Authorization": "Bearer\nsecret"}]})).text
        assert (await client.get(f"{SUBSCRIPTIONS}/0badc0de")).status_code == 404
        assert (await client.delete(f"{SUBSCRIPTIONS}/0badc0de")).status_code == 404
        assert (await client.get(SUBSCRIPTIONS)).json()["Members@odata.count"] == 0
        response = await client.post(SUBSCRIPTIONS, json={**good, "Context": None})
        assert response.status_code == 201 and response.json()["Context"] is None
        location = response.headers["Location"]

    await bus.request(redfish.nc, "n1", subjects.USERS_SET, UserUpdate(slot=4, name="viewer", enabled=True), User)
    await bus.request(redfish.nc, "n1", subjects.USERS_PASSWORD, PasswordSet(slot=4, password="view-only-1"), User)
    await bus.request(redfish.nc, "n1", subjects.USERS_ACCESS,
                      UserAccessUpdate(slot=4, channel=1, privilege=2, ipmi_messaging=True), User)
    async with redfish.client("viewer", "view-only-1") as viewer:
        response = await viewer.post(SUBSCRIPTIONS, json=good)
        assert response.status_code == 403 and message_id(response) == "InsufficientPrivilege"
        assert (await viewer.get(SUBSCRIPTIONS)).json()["Members"] == [{"@odata.id": location}]
        assert (await viewer.get(location)).status_code == 200
        response = await viewer.delete(location)
        assert response.status_code == 403 and message_id(response) == "InsufficientPrivilege"
        assert (await viewer.patch(location, json={"Context": "mine"})).status_code == 403
    async with redfish.client(password="wrong") as wrong:
        assert (await wrong.post(SUBSCRIPTIONS, json=good)).status_code == 401
    async with redfish.client(USER, PASSWORD) as client:
        assert (await client.delete(location)).status_code == 204
        assert (await client.get(SUBSCRIPTIONS)).json()["Members"] == []
