"""The Redfish service: HTTPS (or HTTP when asked) for every machine on the bus."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import socket
from typing import Any

import uvicorn
from nats.aio.client import Client
from qemu_bmc_shared import bus
from qemu_bmc_shared.config import Config
from qemu_bmc_shared.ipmi.core import follow_state_changes
from qemu_bmc_shared.service import argument_parser, bind_failure, listening_socket, run_service, unserved_key

from . import __version__, certificates, events, tls
from .app import create_app
from .http import RedfishHttpProtocol

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-redfish"
BIND_RETRY = 2.0
"""Seconds between attempts to bind a listen address that is taken."""
MAX_CONNECTIONS = 512
"""Connections (and requests under way) at once; beyond, uvicorn answers 503 at once."""


async def bind_listener(nc: Client, host: str, port: int, stop: asyncio.Event, reuse_port: bool = False
                        ) -> socket.socket | None:
    """The listening socket, once ``host:port`` can be bound (None: stopped before). Meanwhile the
    service is on the bus with ``unserved.redfish`` saying why not, and the log says it at ERROR."""
    service, reported = None, None
    try:
        while not stop.is_set():
            try:
                return listening_socket(host, port, reuse_port)
            except OSError as exc:
                reason = f"{host}:{port}: {bind_failure(exc, 'tcp', host, port)}"
            if reason != reported:
                log.error("Redfish %s; trying again every %g s", reason, BIND_RETRY)
                if service is not None:
                    await service.stop()
                service = await bus.serve(nc, name=SERVICE_NAME, version=__version__, description="Redfish",
                                          endpoints=[], metadata={unserved_key("redfish"): reason})
                reported = reason
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BIND_RETRY)
        return None
    finally:
        if service is not None:
            await service.stop()


async def serve(nc: Client, config: Config, stop: asyncio.Event, reuse_port: bool = False) -> None:
    app = create_app(nc, config)
    settings = config.redfish
    host, port = settings.listen
    certificate: dict[str, Any] = {}
    if settings.tls:
        cert, key = ((settings.cert_file, settings.key_file) if settings.cert_file and settings.key_file
                     else tls.self_signed(config.runtime_dir / "redfish", settings.host_name))
        certificate = {"ssl_certfile": str(cert), "ssl_keyfile": str(key),
                       "ssl_context_factory": certificates.ssl_context}  # serves a replaced certificate
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, loop="none", http=RedfishHttpProtocol,
                                           lifespan="off", log_level="warning", access_log=False,
                                           server_header=False, limit_concurrency=MAX_CONNECTIONS,
                                           **certificate))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # run_service handles them
    listener = await bind_listener(nc, host, port, stop, reuse_port)
    if listener is None:
        return
    subscription = await follow_state_changes(nc, app.state.redfish.auth.reads)
    delivery = await events.start_delivery(app)  # push event subscriptions: this replica's share
    gc.collect()
    gc.freeze()  # what exists now lives as long as the service: keep it out of the collector's scans
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():  # noqa: ASYNC110  (listening before saying so on the bus)
        await asyncio.sleep(0.01)
    service = None
    try:
        if not serving.done():
            service = await bus.serve(
                nc, name=SERVICE_NAME, version=__version__, description="Redfish", endpoints=[],
                metadata={"url": f"{'https' if settings.tls else 'http'}://{host}:{port}/redfish/v1"})
            log.info("Redfish on %s://%s:%d/redfish/v1", "https" if settings.tls else "http", host, port)
            await asyncio.wait([serving, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        await serving
        await subscription.unsubscribe()
        await delivery.stop()
        if service is not None:
            await service.stop()


def arguments() -> argparse.Namespace:
    parser = argument_parser("qemu-bmc Redfish service")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share the listen port with other replicas that say so too (SO_REUSEPORT; compose.yaml)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    run_service(SERVICE_NAME, args, functools.partial(serve, reuse_port=args.reuse_port))
