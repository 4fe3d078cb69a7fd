"""EventService (Redfish EventService, EventDestination and Event schemas; DSP0266 §13.5): power
state changes of the machines, as Redfish events, from the bus; streamed with Server-Sent Events
to the machines' users, and pushed (HTTP POST) to the destinations of event subscriptions.

Push subscriptions live in a JetStream bucket shared by the replicas (see subscriptions.py).
Every replica takes part in delivery: it subscribes to the power events in the NATS queue group
``qemu-bmc-redfish-events``, so that each event reaches one replica, which POSTs it to each
subscription of its machine. A subscription gets the events of the machines its maker logged in
to when making it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.cookiejar
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerEvent, PowerQuery, PowerStatus

from .auth import PRIVILEGES, Login
from .errors import RedfishError, message, not_found
from .outbound import TargetRefused, Targets
from .resources import ENABLED, Redfish, collection, json_body, json_response, link, patch_body
from .subscriptions import MAX_SUBSCRIPTIONS, SubscriptionRecord, SubscriptionStore

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

SERVICE_PATH = "/redfish/v1/EventService"
SSE_PATH = f"{SERVICE_PATH}/SSE"
SUBSCRIPTIONS_PATH = f"{SERVICE_PATH}/Subscriptions"
KEEPALIVE = 15.0
REGISTRY = "ResourceEvent.1.4"
REGISTRY_PREFIXES = ("ResourceEvent",)
RESOURCE_TYPES = ("ComputerSystem",)
DESTINATION_TYPE = "#EventDestination.v1_16_0.EventDestination"
_event_ids = itertools.count(1)

QUEUE_GROUP = "qemu-bmc-redfish-events"
QUEUE_SIZE = 1024
"""Power events waiting for delivery (more are dropped, with a warning)."""
MAX_PENDING = 4096
"""Deliveries (one event to one subscription) under way or waiting (more are dropped)."""
DELIVERY_TIMEOUT = 5.0
RETRIES = 2
RETRY_INTERVAL = 2.0

CREATE_PROPERTIES = ("Destination", "Protocol", "Context", "EventFormatType", "RegistryPrefixes", "ResourceTypes",
                     "HttpHeaders", "SubscriptionType", "VerifyCertificate", "DeliveryRetryPolicy")
MAX_CONTEXT = 256
MAX_DESTINATION = 2048
MAX_HEADERS = 16
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\uffff]{0,4096}$")
RESERVED_HEADERS = {"content-type", "content-length", "host", "transfer-encoding", "connection", "odata-version"}


def power_event(event: PowerEvent, context: str | None = "qemu-bmc") -> dict:
    """A Redfish Event for a machine that powered on or off (ResourceEvent registry)."""
    origin = f"/redfish/v1/Systems/{event.machine}"
    on = event.state == "On"
    number = str(next(_event_ids))
    body: dict[str, Any] = {"@odata.type": "#Event.v1_7_0.Event", "Id": number, "Name": "Power state change"}
    if context is not None:
        body["Context"] = context
    body["Events"] = [{
        "EventId": number,
        "EventTimestamp": datetime.datetime.fromtimestamp(event.timestamp, datetime.UTC).isoformat(),
        "MessageId": f"{REGISTRY}.{'ResourcePoweredOn' if on else 'ResourcePoweredOff'}",
        "Message": f"The resource '{origin}' has powered {'on' if on else 'off'}.",
        "MessageArgs": [origin], "MessageSeverity": "OK", "Severity": "OK",
        "OriginOfCondition": link(origin)}]
    return body


# ---------------------------------------------------------------------------------- subscriptions


def subscription_path(subscription_id: str) -> str:
    return f"{SUBSCRIPTIONS_PATH}/{subscription_id}"


def subscription_body(record: SubscriptionRecord) -> dict[str, Any]:
    """The EventDestination resource: its HttpHeaders are never shown (an empty array, as the
    schema prefers)."""
    return {
        "@odata.id": subscription_path(record.id), "@odata.type": DESTINATION_TYPE, "Id": record.id,
        "Name": f"Event subscription {record.id}", "Destination": record.destination, "Protocol": "Redfish",
        "Context": record.context, "EventFormatType": "Event", "SubscriptionType": "RedfishEvent",
        "RegistryPrefixes": list(record.registry_prefixes), "ResourceTypes": list(record.resource_types),
        "HttpHeaders": [], "VerifyCertificate": False, "DeliveryRetryPolicy": "RetryForever",
        "OriginResources": [link(f"/redfish/v1/Systems/{machine}") for machine in record.machines],
        "Status": ENABLED}


def _string_list(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> list[str]:
    value = body.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RedfishError(400, "PropertyValueTypeError", msgspec.json.encode(value).decode(), name)
    for item in value:
        if item not in allowed:
            raise RedfishError(400, "PropertyValueNotInList", item, name)
    return list(dict.fromkeys(value))


def _context(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_CONTEXT):
        raise RedfishError(400, "PropertyValueTypeError", msgspec.json.encode(value).decode()[:64], "Context")
    return value


def _destination(value: Any) -> str:
    """An absolute http or https URL."""
    if not isinstance(value, str):
        raise RedfishError(400, "PropertyValueTypeError", msgspec.json.encode(value).decode()[:64], "Destination")
    try:
        parts = urlsplit(value)
        valid = (parts.scheme in ("http", "https") and bool(parts.hostname) and len(value) <= MAX_DESTINATION
                 and not any(character.isspace() for character in value))
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError:
        valid = False
    if not valid:
        raise RedfishError(400, "PropertyValueFormatError", value[:MAX_DESTINATION], "Destination")
    return value


def _http_headers(value: Any) -> dict[str, str]:
    """HttpHeaders: an array of objects whose properties are the headers (their values are not
    quoted back in errors)."""
    if value is None:
        return {}
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RedfishError(400, "PropertyValueTypeError", "******", "HttpHeaders")
    headers: dict[str, str] = {}
    for item in value:
        for name, header in item.items():
            if not isinstance(header, str):
                raise RedfishError(400, "PropertyValueTypeError", "******", f"HttpHeaders/{name}"[:80])
            if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS or not HEADER_VALUE.match(header):
                raise RedfishError(400, "PropertyValueFormatError", "******", f"HttpHeaders/{name}"[:80])
            headers[name] = header
    if len(headers) > MAX_HEADERS:
        raise RedfishError(400, "PropertyValueFormatError", "******", "HttpHeaders")
    return headers


def parse_subscription(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of a SubscriptionRecord from a create request (400 naming the property at fault)."""
    for name in body:
        if name not in CREATE_PROPERTIES and not name.startswith("@odata."):
            raise RedfishError(400, "PropertyUnknown", name)
    for required in ("Destination", "Protocol"):
        if required not in body:
            raise RedfishError(400, "CreateFailedMissingReqProperties", required)
    for name, allowed in (("Protocol", ("Redfish",)), ("EventFormatType", ("Event",)),
                          ("SubscriptionType", ("RedfishEvent",)), ("VerifyCertificate", (False,)),
                          ("DeliveryRetryPolicy", ("RetryForever",))):
        if name in body and (body[name] not in allowed or isinstance(body[name], bool) != isinstance(allowed[0], bool)):
            raise RedfishError(400, "PropertyValueNotInList", msgspec.json.encode(body[name]).decode()[:64], name)
    return {"destination": _destination(body["Destination"]), "context": _context(body.get("Context")),
            "registry_prefixes": _string_list(body, "RegistryPrefixes", REGISTRY_PREFIXES),
            "resource_types": _string_list(body, "ResourceTypes", RESOURCE_TYPES),
            "http_headers": _http_headers(body.get("HttpHeaders"))}


def register(app: FastAPI, redfish: Redfish) -> None:
    store = SubscriptionStore(redfish.nc)
    app.state.event_subscriptions = store

    async def logins(request: Request) -> dict[str, Login]:
        return await redfish.auth.login(request, await redfish.machines.list())

    async def visible(record: SubscriptionRecord, caller: dict[str, Login]) -> bool:
        """A subscription is seen by those who log in to one of its machines (by anyone who logs
        in when none of its machines is on the bus any more)."""
        known = await redfish.machines.list()
        return any(machine in caller for machine in record.machines) or not any(
            machine in known for machine in record.machines)

    def require(caller: dict[str, Login], privilege: str) -> None:
        if not any(privilege in PRIVILEGES[login.role] for login in caller.values()):
            raise RedfishError(403, "InsufficientPrivilege")

    async def found(request: Request, subscription_id: str, privilege: str = "Login") -> SubscriptionRecord:
        caller = await logins(request)
        record = await store.get(subscription_id)
        if record is None or not await visible(record, caller):
            raise not_found("EventDestination", subscription_id)
        require(caller, privilege)
        return record

    @app.get(SERVICE_PATH)
    async def event_service(request: Request) -> Response:
        await redfish.login(request)
        return json_response({
            "@odata.id": SERVICE_PATH, "@odata.type": "#EventService.v1_10_0.EventService",
            "Id": "EventService", "Name": "Event service", "ServiceEnabled": True,
            "Status": ENABLED, "ServerSentEventUri": SSE_PATH,
            "EventFormatTypes": ["Event"], "RegistryPrefixes": list(REGISTRY_PREFIXES),
            "ResourceTypes": list(RESOURCE_TYPES), "DeliveryRetryAttempts": RETRIES,
            "DeliveryRetryIntervalSeconds": int(RETRY_INTERVAL), "Subscriptions": link(SUBSCRIPTIONS_PATH),
            # what subscriptions can ask for: not message id or registry exclusions, not the origin
            # resource inside the event (OriginOfCondition is always a link), not subordinate resources
            "ExcludeMessageId": False, "ExcludeRegistryPrefix": False, "IncludeOriginOfConditionSupported": False,
            "SubordinateResourcesSupported": False})

    @app.get(SUBSCRIPTIONS_PATH)
    async def subscriptions(request: Request) -> Response:
        caller = await logins(request)
        await store.bucket()
        members = [record for record in store.all() if await visible(record, caller)]
        return json_response(collection(SUBSCRIPTIONS_PATH, "EventDestinationCollection", "Event subscriptions",
                                        [subscription_path(record.id) for record in members]))

    @app.post(SUBSCRIPTIONS_PATH)
    @app.post(f"{SUBSCRIPTIONS_PATH}/Members")  # a POST to the collection's Members property creates too (§9.9)
    async def subscribe(request: Request) -> Response:
        """Make a push subscription (ConfigureManager): 201 with its Location."""
        caller = await logins(request)
        require(caller, "ConfigureManager")
        fields = parse_subscription(await json_body(request))
        try:
            await redfish.targets.check(fields["destination"])
        except TargetRefused as exc:
            raise RedfishError(400, "PropertyValueIncorrect", "Destination", fields["destination"],
                               extra=[message("GeneralError", str(exc))]) from None
        await store.bucket()
        if len(store.records) >= MAX_SUBSCRIPTIONS:
            raise RedfishError(400, "CreateLimitReachedForResource")
        machines = sorted(caller)
        login = max(caller.values(), key=lambda login: len(PRIVILEGES[login.role]))
        # the state each machine is in now, so that the first event after this one is compared with it
        states = await asyncio.gather(*(bus.request(redfish.nc, machine, subjects.POWER_GET, PowerQuery(), PowerStatus)
                                        for machine in machines), return_exceptions=True)
        for machine, state in zip(machines, states, strict=True):
            if isinstance(state, PowerStatus):
                await store.know_state(machine, state.state)
        record = await store.create(SubscriptionRecord(id="", user=login.user, machines=machines, created=time.time(),
                                                       **fields))
        return json_response(subscription_body(record), 201, headers={"Location": subscription_path(record.id)})

    @app.get(SUBSCRIPTIONS_PATH + "/{subscription_id}")
    async def subscription(request: Request, subscription_id: str) -> Response:
        return json_response(subscription_body(await found(request, subscription_id)))

    @app.patch(SUBSCRIPTIONS_PATH + "/{subscription_id}")
    async def change(request: Request, subscription_id: str) -> Response:
        """Only Context can change (and HttpHeaders, replaced as a whole)."""
        record = await found(request, subscription_id, "ConfigureManager")
        changes = await patch_body(request)
        for name in changes:
            if name not in ("Context", "HttpHeaders"):
                raise RedfishError(400, "PropertyNotWritable" if name in CREATE_PROPERTIES else "PropertyUnknown",
                                   name)
        if "Context" in changes:
            record = msgspec.structs.replace(record, context=_context(changes["Context"]))
        if "HttpHeaders" in changes:
            record = msgspec.structs.replace(record, http_headers=_http_headers(changes["HttpHeaders"]))
        return json_response(subscription_body(await store.update(record)))

    @app.delete(SUBSCRIPTIONS_PATH + "/{subscription_id}")
    async def unsubscribe(request: Request, subscription_id: str) -> Response:
        await store.delete(await found(request, subscription_id, "ConfigureManager"))
        return Response(status_code=204)

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

        async def stream() -> AsyncIterator[bytes]:
            # subscribed once the stream is sent (a response never sent leaves no subscription behind)
            subscription = await redfish.nc.subscribe(subjects.any_machine(subjects.EVENT_POWER), cb=received)
            try:
                # the state each machine is in now: events that do not change it are not changes
                states = await asyncio.gather(*(bus.request(redfish.nc, machine, subjects.POWER_GET, PowerQuery(),
                                                            PowerStatus) for machine in machines),
                                              return_exceptions=True)
                last = {machine: state.state for machine, state in zip(machines, states, strict=True)
                        if isinstance(state, PowerStatus)}
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


# ---------------------------------------------------------------------------------- delivery


class Delivery:
    """POSTs the power changes to the subscriptions' destinations.

    The bus callback only queues the event (a bounded queue: when full, the event is dropped with
    a warning); one task takes them in order, keeps only real transitions (``store.transition``)
    and starts one delivery per subscription. Deliveries to one subscription go out in order,
    those to different ones independently. A delivery is tried ``1 + RETRIES`` times,
    ``RETRY_INTERVAL`` s apart, each with a ``DELIVERY_TIMEOUT`` s timeout, then given up (the
    subscription stays: DeliveryRetryPolicy RetryForever). Redirects are not followed.

    TLS certificates of https destinations are NOT verified (``verify=False``, VerifyCertificate
    false): a lab BMC posts to lab listeners with self-signed certificates. Use http on a trusted
    network, or https for privacy only.

    A POST carries the event and these headers only: ``Host``, ``Content-Type: application/json``,
    ``Content-Length``, ``OData-Version: 4.0``, ``User-Agent: qemu-bmc``, httpx's ``Accept: */*``,
    ``Accept-Encoding`` and ``Connection: keep-alive``, and the subscription's ``HttpHeaders``. No
    cookie is kept, nothing is taken from the environment (no proxy, no .netrc credentials).
    Each attempt checks the destination's addresses again (outbound.py) and connects to the one it
    checked; a destination refused then is not retried.
    """

    def __init__(self, nc: Client, store: SubscriptionStore, targets: Targets) -> None:
        self.nc, self.store, self.targets = nc, store, targets
        self.queue: asyncio.Queue[PowerEvent] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._last: dict[str, asyncio.Task[None]] = {}
        """Subscription Id → its latest delivery (the next one waits for it)."""

    async def start(self) -> None:
        try:
            import httpx
        except ImportError:
            log.error("httpx is not installed: event subscriptions are kept but nothing is delivered")
            return
        try:
            await self.store.bucket()
        except Exception as exc:  # no JetStream on this NATS server: the rest of Redfish still works
            log.error("event subscriptions unavailable (JetStream bucket: %s); nothing is delivered", exc)
            return
        self._client = httpx.AsyncClient(verify=False, timeout=DELIVERY_TIMEOUT, follow_redirects=False,
                                         headers={"User-Agent": "qemu-bmc"}, trust_env=False,
                                         cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(
                                             allowed_domains=[])))
        self._task = asyncio.create_task(self._run())
        self._subscription = await self.nc.subscribe(subjects.any_machine(subjects.EVENT_POWER), queue=QUEUE_GROUP,
                                                     cb=self._received)

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        tasks = [task for task in (self._task, *self._pending) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        await self.store.close()

    async def _received(self, message: Msg) -> None:
        try:
            event = msgspec.json.decode(message.data, type=PowerEvent)
        except msgspec.DecodeError:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            log.warning("event delivery queue full: dropped the power event of %s (%s)", event.machine, event.state)

    async def _run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                await self.handle(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivering the power event of %s failed", event.machine)

    async def handle(self, event: PowerEvent) -> None:
        if not await self.store.transition(event):
            return  # the same state again (QMP RESET, SHUTDOWN then STOP…) or an older event
        targets = self.store.subscribers(event.machine, REGISTRY_PREFIXES[0], RESOURCE_TYPES[0])
        if not targets:
            return
        body = power_event(event, None)
        for record in targets:
            if len(self._pending) >= MAX_PENDING:
                log.warning("too many event deliveries under way: dropped one to subscription %s", record.id)
                continue
            content = msgspec.json.encode({**body, "Context": record.context} if record.context is not None else body)
            previous = self._last.get(record.id)
            task = asyncio.create_task(self._deliver(record, content, previous))
            self._pending.add(task)
            self._last[record.id] = task
            task.add_done_callback(lambda done, key=record.id: self._finished(key, done))

    def _finished(self, subscription_id: str, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if self._last.get(subscription_id) is task:
            del self._last[subscription_id]

    async def _deliver(self, record: SubscriptionRecord, content: bytes, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        assert self._client is not None
        headers = {**record.http_headers, "Content-Type": "application/json", "OData-Version": "4.0"}
        problem = ""
        for attempt in range(1 + RETRIES):
            if attempt:
                await asyncio.sleep(RETRY_INTERVAL)
            if record.id not in self.store.records:
                return  # deleted meanwhile
            try:
                pinned = await self.targets.pinned(record.destination)
            except TargetRefused as exc:
                log.warning("event not delivered to subscription %s: %s", record.id, exc)
                return
            if pinned is None:
                problem = "its host name does not resolve"
                continue
            url, host_header, extensions = pinned
            try:
                response = await self._client.post(url, content=content, headers={**headers, **host_header},
                                                   extensions=extensions)
            except Exception as exc:  # httpx.HTTPError, or a URL httpx will not take
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                return
            problem = f"HTTP {response.status_code}"
        host = urlsplit(record.destination).hostname
        log.warning("event not delivered to subscription %s (%s) after %d attempts: %s", record.id, host,
                    1 + RETRIES, problem)


async def start_delivery(app: FastAPI) -> Delivery:
    """Start delivering this replica's share of the events (service.py calls it; ``stop`` at exit)."""
    delivery = Delivery(app.state.redfish.nc, app.state.event_subscriptions, app.state.redfish.targets)
    await delivery.start()
    return delivery
