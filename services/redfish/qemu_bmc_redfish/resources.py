"""What every resource module shares: the :class:`Redfish` context (bus, machines,
authentication) and the helpers that build resources, collections, ETags and error responses.

Every resource is built from bus replies when it is asked for; nothing is cached but the
credential checks (until the state service announces a change)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
from fastapi import Request, Response
from nats.aio.client import Client
from qemu_bmc_shared.config import Config
from qemu_bmc_shared.discovery import Machines

from .auth import ROLE_PRIVILEGES, Authenticator, Login
from .errors import RedfishError, not_found

JSON_TYPE = "application/json; charset=utf-8"
ENABLED = {"State": "Enabled", "Health": "OK"}
"""The Status of a resource that is there and working."""
BUS_STATUS = {"unknown_machine": 404, "not_found": 404, "bad_request": 400, "conflict": 409, "invalid_state": 409,
              "timeout": 504, "unavailable": 503}


class Redfish:
    """What every resource module needs: the bus, the machines, authentication."""

    def __init__(self, nc: Client, config: Config) -> None:
        self.nc = nc
        self.config = config
        self.machines = Machines(nc)
        self.auth = Authenticator(nc)

    async def login(self, request: Request, machine: str | None = None, privilege: str = "Login") -> Login:
        """The caller's login on ``machine`` (on any machine for service-wide resources) with
        ``privilege``: 401 without valid credentials, 404 for a machine that is not on the bus
        (once the caller has logged in somewhere), 403 below the privilege."""
        known = await self.machines.list()
        if machine is not None and machine in known:
            login = (await self.auth.login(request.headers, [machine]))[machine]
        else:
            logins = await self.auth.login(request.headers, known)
            if machine is not None:
                raise not_found("ComputerSystem", machine)
            login = max(logins.values(), key=lambda login: ROLE_PRIVILEGES[login.role])
        login.require(privilege)
        return login

    async def visible_machines(self, request: Request) -> list[str]:
        """The machines on the bus the caller logs in to (401 when none): by session token or Basic."""
        return sorted(await self.auth.login(request.headers, await self.machines.list()))


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
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        raise RedfishError(400, "MalformedJSON") from None
    if not isinstance(body, dict):
        raise RedfishError(400, "MalformedJSON")
    return body


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
    return json_response(error.body(), error.status, error.headers)
