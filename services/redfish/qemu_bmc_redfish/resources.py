"""What every resource module shares: the :class:`Redfish` context (bus, machines,
authentication) and the helpers that build resources, collections, ETags and error responses.

Every resource is built from bus replies when it is asked for; nothing is cached but the
credential checks (until the state service announces a change).

A backend that does not answer is an outage, never an answer about the resource: while the bus is
down, or a machine's service (of a machine in the configuration, or seen on the bus since this
service started) does not answer, requests get 503 ServiceTemporarilyUnavailable with
``Retry-After``, never 401 or 404; a machine name never known is 404."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgspec
from fastapi import Request, Response
from nats.aio.client import Client
from qemu_bmc_shared.config import Config
from qemu_bmc_shared.discovery import Machines

from .auth import ROLE_PRIVILEGES, Authenticator, Login
from .errors import RedfishError, not_found
from .outbound import Targets

JSON_TYPE = "application/json; charset=utf-8"
ENABLED = {"State": "Enabled", "Health": "OK"}
"""The Status of a resource that is there and working."""
#: Bus errors → HTTP status. ``unknown_machine`` is a machine service that does not answer for a
#: machine the request got past :meth:`Redfish.login` with: a known machine, so an outage.
BUS_STATUS = {"unknown_machine": 503, "not_found": 404, "bad_request": 400, "conflict": 409, "invalid_state": 409,
              "timeout": 504, "unavailable": 503}
RETRY_AFTER_SECONDS = 1
MAX_JSON_DEPTH = 64
"""Nesting of arrays and objects a request body may have (deeper: 400 MalformedJSON)."""


def unavailable() -> RedfishError:
    return RedfishError(503, "ServiceTemporarilyUnavailable", RETRY_AFTER_SECONDS)


class KnownMachines(Machines):
    """The machines known: those on the bus (:meth:`on_bus`, as :class:`Machines` finds them) and
    ``ever_seen``, those of the configuration and those seen on the bus since this service
    started. A known machine is logged in to (its users are the state service's) and its requests
    are answered 503 rather than 404 while its machine service does not answer; the collections
    list the machines on the bus. A bus outage is not a machine service's silence: once the bus
    is back, each machine is given ``forget_after`` seconds to be announced again."""

    def __init__(self, nc: Client, configured: list[str]) -> None:
        super().__init__(nc)
        self.ever_seen = set(configured)
        self.reconnects = nc.stats["reconnects"]

    async def _refresh(self) -> None:
        if not self.nc.is_connected and self.names is not None:
            return  # nobody can answer: what is known stays
        if self.nc.stats["reconnects"] != self.reconnects:
            self.reconnects = self.nc.stats["reconnects"]
            self.seen = dict.fromkeys(self.seen, time.monotonic())
        await super()._refresh()
        self.ever_seen.update(self.names or [])

    async def list(self) -> list[str]:
        """Every known machine."""
        return sorted({*await super().list(), *self.ever_seen})

    async def on_bus(self) -> list[str]:
        """The machines whose machine service answers (or did, less than ``forget_after`` s ago)."""
        return await super().list()


class Redfish:
    """What every resource module needs: the bus, the machines, authentication."""

    def __init__(self, nc: Client, config: Config) -> None:
        self.nc = nc
        self.config = config
        self.machines = KnownMachines(nc, config.machine_names)
        self.auth = Authenticator(nc)
        self.targets = Targets(config.redfish.allow_internal_targets, lambda: list(self.machines.ipmi.values()))

    async def login(self, request: Request, machine: str | None = None, privilege: str = "Login") -> Login:
        """The caller's login on ``machine`` (on any machine for service-wide resources) with
        ``privilege``: 401 without valid credentials, 404 for a machine never known (once the
        caller has logged in somewhere), 403 below the privilege. A known machine that is not on
        the bus now is logged in to as usual (its users are the state service's): what the route
        then asks of its machine service is 503."""
        known = await self.machines.list()
        if machine is not None and machine in known:
            login = (await self.auth.login(request, [machine]))[machine]
        else:
            logins = await self.auth.login(request, known)
            if machine is not None:
                raise not_found("ComputerSystem", machine)
            login = max(logins.values(), key=lambda login: ROLE_PRIVILEGES[login.role])
        login.require(privilege)
        return login

    async def visible_machines(self, request: Request) -> list[str]:
        """The machines on the bus the caller logs in to (401 when it logs in to no known machine):
        by session token or Basic."""
        logins = await self.auth.login(request, await self.machines.list())
        on_bus = set(await self.machines.on_bus())
        return sorted(machine for machine in logins if machine in on_bus)


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON resource with its ``@odata.etag`` and ETag header, and the Link to the JSON schema
    that describes it (DSP0266 §8.2, §6.5)."""
    headers = dict(headers or {})
    if "@odata.id" in body:
        if "@odata.etag" not in body:
            body = {**body, "@odata.etag": etag_of(body)}
        headers["ETag"] = body["@odata.etag"]
    content = msgspec.json.encode(body)
    odata_type = body.get("@odata.type")
    if isinstance(odata_type, str):
        schema = odata_type.lstrip("#").rsplit(".", 1)[0]
        headers["Link"] = f"<http://redfish.dmtf.org/schemas/v1/{schema}.json>; rel=describedby"
    return Response(content, status_code=status, media_type=JSON_TYPE, headers=headers)


def etag_of(body: dict[str, Any]) -> str:
    stable = {key: value for key, value in body.items() if key != "@odata.etag"}
    return f'W/"{hashlib.sha256(msgspec.json.encode(stable, order="sorted")).hexdigest()[:16]}"'


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (400 MalformedJSON for anything else, or nested deeper than
    MAX_JSON_DEPTH)."""
    try:
        body = msgspec.json.decode(await request.body())
    except (msgspec.DecodeError, RecursionError):
        raise RedfishError(400, "MalformedJSON") from None
    if not isinstance(body, dict) or too_deep(body):
        raise RedfishError(400, "MalformedJSON")
    return body


def too_deep(value: Any) -> bool:
    """``value`` has arrays and objects nested more than MAX_JSON_DEPTH deep."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return True
        level = [inner for outer in level for inner in (outer.values() if isinstance(outer, dict) else outer)
                 if isinstance(inner, dict | list)]
    return False


async def patch_body(request: Request) -> dict[str, Any]:
    """A PATCH body without its OData annotations, which are never changed (DSP0266 §9.7.4.2);
    nothing left: 400 NoOperation."""
    body = await json_body(request)
    changes = {key: value for key, value in body.items() if not key.startswith("@odata.")}
    if not changes:
        raise RedfishError(400, "NoOperation")
    return changes


def check_if_match(request: Request, current: dict[str, Any]) -> None:
    """With If-Match, 412 unless one of its ETags is the resource's current one (DSP0266 §9.7.4)."""
    if_match = request.headers.get("if-match")
    etag = current.get("@odata.etag") or etag_of(current)
    if if_match and if_match.strip() != "*" and etag not in (tag.strip() for tag in if_match.split(",")):
        raise RedfishError(412, "PreconditionFailed")


def collection(path: str, kind: str, name: str, members: list[str]) -> dict[str, Any]:
    """A resource collection (DSP0266 §9.2) of schema ``kind`` (e.g. ComputerSystemCollection)."""
    return {"@odata.id": path, "@odata.type": f"#{kind}.{kind}", "Name": name, "Members@odata.count": len(members),
            "Members": [link(member) for member in members]}


def link(path: str) -> dict[str, str]:
    return {"@odata.id": path}


def writable(*names: str) -> dict[str, list[str]]:
    """The Redfish.WriteableProperties annotation: which properties of the object it is in a PATCH
    may change here (the interoperability profiles' write requirements are checked against it)."""
    return {"@Redfish.WriteableProperties": list(names)}


def error_response(error: RedfishError) -> Response:
    """The error's response; a 503 says when to retry (``Retry-After``, as DSP0266's status codes ask)."""
    headers = error.headers
    if error.status == 503 and "Retry-After" not in headers:
        retry = error.args_[0] if error.message_id == "ServiceTemporarilyUnavailable" and error.args_ else None
        headers = {**headers, "Retry-After": str(retry or RETRY_AFTER_SECONDS)}
    return json_response(error.body(), error.status, headers)
