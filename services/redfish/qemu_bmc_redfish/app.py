"""The Redfish application's composition root: the resource modules, the error handlers and
the OData middleware.

One module per resource family (``service_root``, ``systems``, ``managers``, ``chassis`` …), as
OpenBMC's bmcweb keeps one file per resource; what they share is in ``resources``."""

from __future__ import annotations

import nats.errors
from fastapi import FastAPI, Request, Response
from nats.aio.client import Client
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import Config
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import (
    accounts,
    certificates,
    chassis,
    console,
    environment,
    events,
    inventory,
    kvm,
    log_services,
    managers,
    service_root,
    sessions,
    systems,
    tasks,
    update_service,
    virtual_media,
    volumes,
)
from .errors import RedfishError
from .odata import ODataMiddleware
from .resources import BUS_STATUS, Redfish, error_response, unavailable


def create_app(nc: Client, config: Config) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
    redfish = Redfish(nc, config)
    app.state.redfish = redfish
    app.state.max_body_bytes = config.redfish.max_body_bytes  # read by http.RedfishHttpProtocol
    for module in (service_root, systems, inventory, volumes, managers, chassis, environment, log_services,
                   virtual_media, sessions, accounts, certificates, update_service, tasks, events, console, kvm):
        module.register(app, redfish)

    @app.exception_handler(RedfishError)
    async def redfish_error(request: Request, exc: RedfishError) -> Response:
        return error_response(exc)

    @app.exception_handler(BusError)
    async def bus_error(request: Request, exc: BusError) -> Response:
        status = BUS_STATUS.get(exc.error, 500)
        if status == 503 or not nc.is_connected:
            return error_response(unavailable())
        return error_response(RedfishError(status, "GeneralError", exc.message))

    @app.exception_handler(nats.errors.Error)
    async def bus_down(request: Request, exc: nats.errors.Error) -> Response:
        """The bus (or its JetStream, the sessions' store) failed the request: an outage."""
        return error_response(unavailable())

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client went, or its body was refused (http.py): nobody reads this answer."""
        return Response(status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(RedfishError(404, "ResourceMissingAtURI", request.url.path))
        if exc.status_code == 405:
            return error_response(RedfishError(405, "OperationNotAllowed", headers=dict(exc.headers or {})))
        return error_response(RedfishError(exc.status_code, "GeneralError", exc.detail))

    app.add_middleware(ODataMiddleware, router=app.router, nc=nc)
    return app
