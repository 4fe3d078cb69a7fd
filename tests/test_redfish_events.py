"""Redfish events over Server-Sent Events: power state changes of real QEMU machines."""

from __future__ import annotations

import asyncio
import json

from test_redfish import Service, redfish  # noqa: F401  (the fixture)


async def test_power_changes_stream_as_redfish_events(redfish: Service):  # noqa: F811
    async with redfish.client() as client:
        service = (await client.get("/redfish/v1/EventService")).json()
        assert service["ServerSentEventUri"] == "/redfish/v1/EventService/SSE"
        assert (await client.get("/redfish/v1/EventService/Subscriptions")).json()["Members"] == []
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
        reset = "/redfish/v1/Systems/n1/Actions/ComputerSystem.Reset"
        assert (await client.post(reset, json={"ResetType": "On"})).status_code == 204
        await asyncio.sleep(1)
        assert (await client.post(reset, json={"ResetType": "ForceOff"})).status_code == 204
        await asyncio.wait_for(listener, 30)
    records = [event["Events"][0] for event in events]
    assert [record["MessageId"] for record in records] == ["ResourceEvent.1.4.ResourcePoweredOn",
                                                           "ResourceEvent.1.4.ResourcePoweredOff"], events
    assert all(record["OriginOfCondition"] == {"@odata.id": "/redfish/v1/Systems/n1"} for record in records)
    async with redfish.client(password="wrong") as wrong:
        assert (await wrong.get("/redfish/v1/EventService/SSE")).status_code == 401
