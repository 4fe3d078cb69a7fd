"""The IPMI over LAN service: one UDP endpoint per machine that has an ``ipmi`` address, and one
VNC listener (:mod:`.vnc`) per machine that has a ``vnc`` address.

Several replicas can run with the same config: each machine's addresses are served by one of them
(IPMI sessions live in the replica that serves the address; a VNC viewer's connection too, and a
viewer reconnects to the replica that takes the listener over). A replica binds the addresses of
its share of the machines (``--shard K/N``: the machines whose name hashes to K of N; all of them
without ``--shard``) and keeps trying those another replica holds; the other machines' addresses
it takes over when they have been free for ``TAKEOVER`` seconds, that is when the replica that
served them has stopped, and gives them back when a replica of their shard is on the bus again.
Users, passwords and every other setting are the state service's, so
nothing is lost when a replica goes. Which replica serves which address is announced on the bus
(service metadata ``ipmi.<machine>``, ``vnc.<machine>``). An address of this replica's share that
it cannot bind and that no other replica holds (another program has it, or it is not an address of
this host) is an error: logged at ERROR and announced as ``unserved.ipmi.<machine>`` (or
``unserved.vnc.<machine>``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.micro.service import Service
from qemu_bmc_shared import bus, ipmi
from qemu_bmc_shared.config import Config, VmConfig
from qemu_bmc_shared.discovery import metadata, service_infos
from qemu_bmc_shared.ipmi.core import Registry, StateReads, follow_state_changes
from qemu_bmc_shared.service import address_holder, argument_parser, bind_failure, run_service, unserved_key

from . import __version__
from .lan_commands import lan_registry
from .server import LanServer
from .vnc import VncListener

log = logging.getLogger(__name__)
SERVICE_NAME = "qemu-bmc-ipmi-lan"
RETRY = 1.0
"""Seconds between attempts to bind an address another replica holds."""
TAKEOVER = 3.0
"""Seconds another shard's address must have been free before this replica serves it."""


def shard_of(machine: str, shards: int) -> int:
    """The shard (1-based) a machine belongs to: a stable hash of its name."""
    return zlib.crc32(machine.encode()) % shards + 1


def parse_shard(text: str) -> tuple[int, int]:
    number, _, count = text.partition("/")
    try:
        shard, shards = int(number), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard K/N, not {text!r}") from None
    if not 1 <= shard <= shards:
        raise argparse.ArgumentTypeError(f"--shard K/N with 1 <= K <= N, not {text!r}")
    return shard, shards


def _is_replica(pid: int | None) -> bool:
    """``pid`` is an IPMI over LAN service process (a replica that holds the address)."""
    if pid is None:
        return False
    with contextlib.suppress(OSError):
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"qemu_bmc_ipmi_lan" in command or b"qemu-bmc-ipmi-lan" in command
    return False


@dataclass(frozen=True)
class Kind:
    """A kind of listener a machine has here: its IPMI over LAN endpoint, its VNC listener."""

    key: str
    """In the service metadata: ``<key>.<machine>`` (served here), ``unserved.<key>.<machine>``."""
    protocol: str
    title: str
    address: Callable[[VmConfig], tuple[str, int] | None]


IPMI = Kind("ipmi", "udp", "IPMI over LAN", lambda vm: vm.ipmi)
VNC = Kind("vnc", "tcp", "VNC listener", lambda vm: vm.vnc)
KINDS = (IPMI, VNC)
KINDS_BY_KEY = {kind.key: kind for kind in KINDS}


def parse_key(key: str) -> tuple[Kind, str]:
    """``ipmi.m1`` → (IPMI, "m1")."""
    kind, machine = key.split(".", 1)
    return KINDS_BY_KEY[kind], machine


def can_bind(protocol: str, host: str, port: int) -> bool:
    """Nobody holds ``host:port`` now: a socket is bound there (as the listener would be: TCP with
    SO_REUSEADDR, which a socket listening there still refuses) and closed at once, never listening."""
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    try:
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=kind, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind) as probe:
            if protocol == "tcp":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError:
        return False
    return True


class Endpoints:
    """The listeners this replica serves (each machine's IPMI over LAN endpoint and VNC listener,
    keyed ``<kind>.<machine>`` as in the metadata), and the announcement of them on the bus."""

    def __init__(self, nc: Client, config: Config, shard: tuple[int, int]) -> None:
        self.nc, self.config, self.shard = nc, config, shard
        self.registry: Registry = ipmi.load().extended(lan_registry)
        self.serving: dict[str, Callable[[], Awaitable[None]]] = {}
        """``<kind>.<machine>`` → how to stop serving it."""
        self.reads: dict[str, StateReads] = {}
        self.free_since: dict[str, float] = {}
        self.bind_errors: dict[str, OSError] = {}
        """``<kind>.<machine>`` → why its address (of this replica's share) could not be bound, last time."""
        self.unserved: dict[str, str] = {}
        """``<kind>.<machine>`` → ``host:port: reason``, for the addresses of this replica's share nobody serves."""
        self.service: Service | None = None

    def own(self, vm: VmConfig) -> bool:
        return shard_of(vm.name, self.shard[1]) == self.shard[0]

    def listeners(self) -> list[tuple[str, Kind, VmConfig, tuple[str, int]]]:
        """Every listener of the config: its key, kind, machine and address."""
        return [(f"{kind.key}.{vm.name}", kind, vm, address) for vm in self.config.vms.values() for kind in KINDS
                if (address := kind.address(vm)) is not None]

    async def _start(self, kind: Kind, vm: VmConfig) -> Callable[[], Awaitable[None]]:
        """Serve ``vm``'s listener of ``kind`` (raises OSError when its address cannot be bound)."""
        if kind is VNC:
            listener = VncListener(self.nc, vm)
            await listener.start()
            return listener.close
        transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: LanServer(vm.name, self.nc, self.registry, self.config.ipmi), local_addr=vm.ipmi)
        self.reads[vm.name] = server.state

        async def close() -> None:
            self.reads.pop(vm.name, None)
            await server.close()
            transport.close()
        return close

    async def bind_what_is_free(self) -> bool:
        """Serve every address this replica should and can; True when that changed anything."""
        loop = asyncio.get_running_loop()
        changed = False
        for key, kind, vm, (host, port) in self.listeners():
            if key in self.serving:
                continue
            if not self.own(vm) and loop.time() - self.free_since.setdefault(key, loop.time()) < TAKEOVER:
                if not can_bind(kind.protocol, host, port):
                    self.free_since[key] = loop.time()
                continue
            try:
                self.serving[key] = await self._start(kind, vm)
            except OSError as exc:
                log.debug("%s: %s %s:%d cannot be bound (%s)", vm.name, kind.title, host, port, exc)
                self.free_since[key] = loop.time()
                if self.own(vm):
                    self.bind_errors[key] = exc
                continue
            self.bind_errors.pop(key, None)
            self.free_since.pop(key, None)
            changed = True
            log.info("%s: %s on %s %s:%d%s", vm.name, kind.title, kind.protocol, host, port,
                     "" if self.own(vm) else " (taken over from another replica)")
        return changed

    async def give_back(self) -> bool:
        """Stop serving the taken-over addresses whose own replica is back; True if any."""
        taken_over = [key for key in self.serving if not self.own(self.config.vms[parse_key(key)[1]])]
        if not taken_over:
            return False
        shards = set()
        for info in await service_infos(self.nc, SERVICE_NAME):
            with contextlib.suppress(argparse.ArgumentTypeError):
                shards.add(parse_shard(metadata(info).get("shard", "")))
        returned = [key for key in taken_over
                    if any(shard_of(parse_key(key)[1], count) == number for number, count in shards)]
        for key in returned:
            self.free_since[key] = asyncio.get_running_loop().time()  # not to be taken again at once
            await self.serving.pop(key)()
            kind, name = parse_key(key)
            log.info("%s: %s given back to the replica of its shard", name, kind.title)
        return bool(returned)

    async def check_unserved(self) -> bool:
        """Work out which addresses of this replica's share nobody serves (not bound here, not
        announced by another replica, not held by another replica's process); True when that
        changed. Each newly unserved one is logged at ERROR."""
        failing = {key: exc for key, exc in self.bind_errors.items() if key not in self.serving}
        unserved: dict[str, str] = {}
        if failing:
            announced = {key for info in await service_infos(self.nc, SERVICE_NAME) for key in metadata(info)}
            for key, exc in failing.items():
                kind, name = parse_key(key)
                host, port = kind.address(self.config.vms[name]) or ("", 0)
                if key in announced or _is_replica(address_holder(kind.protocol, host, port)):
                    continue
                unserved[key] = f"{host}:{port}: {bind_failure(exc, kind.protocol, host, port)}"
        for key, problem in unserved.items():
            if self.unserved.get(key) != problem:
                kind, name = parse_key(key)
                log.error("%s: %s %s; trying again every %g s", name, kind.title, problem, RETRY)
        for key in self.unserved.keys() - unserved.keys():
            kind, name = parse_key(key)
            log.info("%s: %s served now", name, kind.title)
        changed, self.unserved = unserved != self.unserved, unserved
        return changed

    async def announce(self) -> None:
        """(Re)register on the bus with the machines served now and their addresses."""
        if self.service is not None:
            await self.service.stop()
        listening = {key: "{}:{}".format(*kind.address(self.config.vms[name]) or ("", 0))
                     for key in sorted(self.serving) for kind, name in [parse_key(key)]}
        machines = sorted({parse_key(key)[1] for key in self.serving})
        self.service = await bus.serve(
            self.nc, name=SERVICE_NAME, version=__version__,
            description="IPMI over LAN (RMCP, RMCP+) and the VNC listener of each machine",
            endpoints=[], metadata={"machines": ",".join(machines), "shard": "/".join(map(str, self.shard)),
                                    **listening, **{unserved_key(*key.split(".", 1)): why
                                                    for key, why in self.unserved.items()}})

    async def close(self) -> None:
        if self.service is not None:
            await self.service.stop()
        for close in self.serving.values():
            await close()
        self.serving.clear()


async def serve(nc: Client, config: Config, stop: asyncio.Event, shard: tuple[int, int] = (1, 1)) -> None:
    endpoints = Endpoints(nc, config, shard)
    subscription = await follow_state_changes(nc, endpoints.reads)
    await endpoints.bind_what_is_free()
    await endpoints.check_unserved()
    await endpoints.announce()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RETRY)
            except TimeoutError:
                if (await endpoints.give_back() | await endpoints.bind_what_is_free()
                        | await endpoints.check_unserved()):
                    await endpoints.announce()
    finally:
        await subscription.unsubscribe()
        await endpoints.close()


def main() -> None:
    parser = argument_parser("qemu-bmc IPMI over LAN service")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), metavar="K/N",
                        help="serve the K-th of N shares of the machines (replicas), and stand by for the others")
    args = parser.parse_args()
    run_service(SERVICE_NAME, args, functools.partial(serve, shard=args.shard))
