"""EventService with Server-Sent Events (Redfish EventService schema; DSP0266 §13.5.3): power
state changes of the machines the caller may see, as Redfish events, from the bus."""

from __future__ import annotations

import asyncio
import datetime
import itertools
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from nats.aio.msg import Msg
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerEvent, PowerQuery, PowerStatus

from .app import Redfish, json_response, link

SSE_PATH = "/redfish/v1/EventService/SSE"
KEEPALIVE = 15.0
REGISTRY = "ResourceEvent.1.4"
_event_ids = itertools.count(1)


def power_event(event: PowerEvent) -> dict:
    """A Redfish Event for a machine that powered on or off (ResourceEvent registry)."""
    origin = f"/redfish/v1/Systems/{event.machine}"
    on = event.state == "On"
    number = str(next(_event_ids))
    return {
        "@odata.type": "#Event.v1_7_0.Event", "Id": number, "Name": "Power state change", "Context": "qemu-bmc",
        "Events": [{
            "EventId": number,
            "EventTimestamp": datetime.datetime.fromtimestamp(event.timestamp, datetime.UTC).isoformat(),
            "MessageId": f"{REGISTRY}.{'ResourcePoweredOn' if on else 'ResourcePoweredOff'}",
            "Message": f"The resource '{origin}' has powered {'on' if on else 'off'}.",
            "MessageArgs": [origin], "MessageSeverity": "OK", "Severity": "OK",
            "OriginOfCondition": link(origin)}]}


def register(app: FastAPI, redfish: Redfish) -> None:
    @app.get("/redfish/v1/EventService")
    async def event_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": "/redfish/v1/EventService", "@odata.type": "#EventService.v1_10_0.EventService",
            "Id": "EventService", "Name": "Event service", "ServiceEnabled": True,
            "Status": {"State": "Enabled", "Health": "OK"}, "ServerSentEventUri": SSE_PATH,
            "EventFormatTypes": ["Event"], "RegistryPrefixes": ["ResourceEvent"],
            "ResourceTypes": ["ComputerSystem"], "DeliveryRetryAttempts": 0, "DeliveryRetryIntervalSeconds": 0,
            "Subscriptions": link("/redfish/v1/EventService/Subscriptions")})

    @app.get("/redfish/v1/EventService/Subscriptions")
    async def subscriptions(request: Request) -> Response:
        """Push subscriptions are not offered: the collection is empty (SSE is the way)."""
        await redfish.login(request)
        return json_response({
            "@odata.id": "/redfish/v1/EventService/Subscriptions",
            "@odata.type": "#EventDestinationCollection.EventDestinationCollection",
            "Name": "Event subscriptions", "Members@odata.count": 0, "Members": []})

    @app.get(SSE_PATH)
    async def server_sent_events(request: Request) -> Response:
        """A text/event-stream of power state changes of the machines the caller logs in to."""
        machines = await redfish.visible_machines(request)
        queue: asyncio.Queue[PowerEvent] = asyncio.Queue(maxsize=1024)

        async def received(message: Msg) -> None:
            try:
                event = msgspec.json.decode(message.data, type=PowerEvent)
            except msgspec.DecodeError:
                return
            if event.machine in watched and not queue.full():
                queue.put_nowait(event)

        watched = set(machines)
        subscription = await redfish.nc.subscribe(subjects.any_machine(subjects.EVENT_POWER), cb=received)

        # the state each machine is in now: events that do not change it are not changes
        states = await asyncio.gather(*(bus.request(redfish.nc, machine, subjects.POWER_GET, PowerQuery(), PowerStatus)
                                        for machine in machines), return_exceptions=True)
        last = {machine: state.state for machine, state in zip(machines, states, strict=True)
                if isinstance(state, PowerStatus)}

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": qemu-bmc event stream\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), KEEPALIVE)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if last.get(event.machine) == event.state:
                        continue  # the same state again (another QMP event): not a change
                    last[event.machine] = event.state
                    body = power_event(event)
                    yield f"id: {body['Id']}\ndata: ".encode() + msgspec.json.encode(body) + b"\n\n"
            finally:
                await subscription.unsubscribe()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
