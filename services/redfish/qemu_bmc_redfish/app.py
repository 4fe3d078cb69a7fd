"""The Redfish application: routing, authentication, the OData headers, Redfish errors.

One module per resource family (``service_root``, ``systems``, ``managers``, ``chassis``), as
OpenBMC's bmcweb keeps one file per resource; every resource is built from bus replies when it
is asked for, nothing is cached but the credential checks (until the state service announces a
change)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from nats.aio.client import Client
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import Config
from starlette.exceptions import HTTPException

from .auth import ROLE_PRIVILEGES, Authenticator, Login
from .errors import RedfishError, not_found
from .machines import Machines

JSON_TYPE = "application/json; charset=utf-8"
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
        authorization = request.headers.get("authorization")
        known = await self.machines.list()
        if machine is not None and machine in known:
            login = (await self.auth.login(authorization, [machine]))[machine]
        else:
            logins = await self.auth.login(authorization, known)
            if machine is not None:
                raise not_found("ComputerSystem", machine)
            login = max(logins.values(), key=lambda login: ROLE_PRIVILEGES[login.role])
        login.require(privilege)
        return login

    async def visible_machines(self, request: Request) -> list[str]:
        """The machines on the bus the caller logs in to (401 when none)."""
        return sorted(await self.auth.login(request.headers.get("authorization"), await self.machines.list()))


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None,
                  etag: bool = False) -> Response:
    content = msgspec.json.encode(body)
    headers = dict(headers or {})
    if etag:
        headers["ETag"] = etag_of(body)
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


def link(path: str) -> dict[str, str]:
    return {"@odata.id": path}


def create_app(nc: Client, config: Config) -> FastAPI:
    from . import chassis, managers, service_root, systems

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
    redfish = Redfish(nc, config)
    app.state.redfish = redfish
    for module in (service_root, systems, managers, chassis):
        module.register(app, redfish)

    @app.middleware("http")
    async def odata(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.scope["path"]
        if len(path) > 1 and path.endswith("/"):  # a trailing slash works on every URI
            request.scope["path"] = path.rstrip("/")
        try:
            response = await call_next(request)
        except RedfishError as exc:
            response = error_response(exc)
        response.headers["OData-Version"] = "4.0"
        return response

    @app.exception_handler(RedfishError)
    async def redfish_error(request: Request, exc: RedfishError) -> Response:
        return error_response(exc)

    @app.exception_handler(BusError)
    async def bus_error(request: Request, exc: BusError) -> Response:
        return error_response(RedfishError(BUS_STATUS.get(exc.error, 500), "GeneralError", exc.message))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(RedfishError(404, "ResourceMissingAtURI", request.url.path))
        if exc.status_code == 405:
            return error_response(RedfishError(405, "OperationNotAllowed", headers=dict(exc.headers or {})))
        return error_response(RedfishError(exc.status_code, "GeneralError", exc.detail))

    return app


def error_response(error: RedfishError) -> Response:
    return json_response(error.body(), error.status, error.headers)
