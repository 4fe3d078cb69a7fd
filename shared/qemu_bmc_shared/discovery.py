"""What the services on the bus announce of themselves (nats.micro service metadata): the
machines each machine service owns, and the address each machine's listeners listen on
(``ipmi.<machine>``: its IPMI over LAN endpoint, ``vnc.<machine>``: its VNC listener,
``vmwire.<machine>``), or why one is not served (``unserved.<kind>.<machine>``). Front-ends and
the state service learn the machines here, not from a static list, so a machine service started
on any host brings its machines with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats.errors
from nats.aio.client import Client

MACHINE_SERVICE = "qemu-bmc-machine"
IPMI_LAN_SERVICE = "qemu-bmc-ipmi-lan"


async def service_infos(nc: Client, service: str | None = None, first: float = 0.5, quiet: float = 0.02,
                        verb: str = "PING") -> list[dict[str, Any]]:
    """What every instance of ``service`` (None: of every service) answers to ``$SRV.<verb>``:
    the first answer within ``first`` seconds, the others until none has come for ``quiet``.
    PING answers carry the metadata and little else; INFO answers also list every endpoint
    (about a kilobyte per machine of a machine service)."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    infos: list[dict[str, Any]] = []
    try:
        await nc.publish(f"$SRV.{verb}.{service}" if service else f"$SRV.{verb}", b"", reply=inbox)
        timeout = first
        while True:
            try:
                message = await subscription.next_msg(timeout=timeout)
            except TimeoutError:
                break
            timeout = quiet
            with contextlib.suppress(ValueError):
                info = json.loads(message.data)
                if isinstance(info, dict):
                    infos.append(info)
    finally:
        with contextlib.suppress(nats.errors.Error):  # the connection closed meanwhile
            await subscription.unsubscribe()
    return infos


def metadata(info: dict[str, Any]) -> dict[str, str]:
    found = info.get("metadata")
    return found if isinstance(found, dict) else {}


def announced_machines(info: dict[str, Any]) -> list[str]:
    return [name for name in str(metadata(info).get("machines", "")).split(",") if name]


UNSERVED = "unserved."


def listeners(info: dict[str, Any]) -> dict[str, str]:
    """The addresses a service serves, from its metadata: ``<kind>.<machine>`` (``ipmi.n1``,
    ``vnc.n1``) → ``<host>:<port>``."""
    return {key: str(value) for key, value in metadata(info).items() if "." in key and not key.startswith(UNSERVED)}


def unserved(infos: list[dict[str, Any]]) -> dict[str, str]:
    """The addresses services should serve and cannot, from their metadata: ``<kind>.<machine>``
    (``ipmi.n1``) or ``<kind>`` (``redfish``) → ``<host>:<port>: <reason>``. A service announces
    ``unserved.ipmi.n1`` when it cannot bind that address; one that is served by another replica
    (``ipmi.n1`` in its metadata) is left out."""
    served = {key for info in infos for key in metadata(info) if not key.startswith(UNSERVED)}
    return {key.removeprefix(UNSERVED): str(value) for info in infos for key, value in metadata(info).items()
            if key.startswith(UNSERVED) and key.removeprefix(UNSERVED) not in served}


class Machines:
    """Machine names, asked of every machine service (and, with ``ipmi_addresses``, each machine's
    IPMI over LAN address, of every IPMI over LAN service); answered from the last answer while a newer one is asked
    for in the background once it is ``max_age`` seconds old.

    A machine stays listed until no answer has named it for ``forget_after`` seconds: a machine
    service that is slow to answer one round (a loaded host) does not make its machines vanish
    for a moment."""

    def __init__(self, nc: Client, max_age: float = 2.0, forget_after: float = 6.0,
                 ipmi_addresses: bool = True) -> None:
        self.nc, self.max_age, self.forget_after = nc, max_age, forget_after
        self.ipmi_addresses = ipmi_addresses
        self.names: list[str] | None = None
        self.seen: dict[str, float] = {}
        """Machine name → when an answer last named it (time.monotonic())."""
        self.ipmi: dict[str, str] = {}
        """Machine name → the ``host:port`` its IPMI over LAN endpoint listens on."""
        self.at = 0.0
        self.refreshing: asyncio.Task[None] | None = None

    async def list(self) -> list[str]:
        if self.names is None:
            if self.refreshing is None:
                self.refreshing = asyncio.create_task(self._refresh())
            await asyncio.shield(self.refreshing)
        elif time.monotonic() - self.at >= self.max_age and (self.refreshing is None or self.refreshing.done()):
            self.refreshing = asyncio.create_task(self._refresh())
        assert self.names is not None
        return self.names

    async def known(self, name: str) -> bool:
        """``name`` is a machine on the bus; a name not seen yet is asked for again at once (at
        most once a second), so a machine service that has just started is found."""
        if name in await self.list():
            return True
        if time.monotonic() - self.at >= 1.0:
            if self.refreshing is None or self.refreshing.done():
                self.refreshing = asyncio.create_task(self._refresh())
            await asyncio.shield(self.refreshing)
        return name in (self.names or [])

    async def _lan_services(self) -> list[dict[str, Any]]:
        return await service_infos(self.nc, IPMI_LAN_SERVICE) if self.ipmi_addresses else []

    async def _refresh(self) -> None:
        machines, lan = await asyncio.gather(service_infos(self.nc, MACHINE_SERVICE), self._lan_services())
        now = time.monotonic()
        self.seen.update(dict.fromkeys((name for info in machines for name in announced_machines(info)), now))
        self.seen = {name: at for name, at in self.seen.items() if now - at < self.forget_after}
        self.names = sorted(self.seen)
        self.ipmi.update({key.removeprefix("ipmi."): value for info in lan for key, value in metadata(info).items()
                          if key.startswith("ipmi.")})
        self.ipmi = {name: address for name, address in self.ipmi.items() if name in self.seen}
        self.at = now
