"""The IPMI over LAN service: one UDP endpoint per machine that has an ``ipmi`` address.

Several replicas can run with the same config: each machine's address is served by one of them
(IPMI sessions live in the replica that serves the address). A replica binds the addresses of
its share of the machines (``--shard K/N``: the machines whose name hashes to K of N; all of them
without ``--shard``) and keeps trying those another replica holds; the other machines' addresses
it takes over when they have been free for ``TAKEOVER`` seconds, that is when the replica that
served them has stopped, and gives them back when a replica of their shard is on the bus again.
Users, passwords and every other setting are the state service's, so
nothing is lost when a replica goes. Which replica serves which machine is announced on the bus
(service metadata ``ipmi.<machine>``). An address of this replica's share that it cannot bind and
that no other replica holds (another program has it, or it is not an address of this host) is an
error: logged at ERROR and announced as ``unserved.ipmi.<machine>``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import zlib
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
from .vnc import VncListeners

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


class Endpoints:
    """The UDP endpoints this replica serves, and the announcement of them on the bus."""

    def __init__(self, nc: Client, config: Config, shard: tuple[int, int]) -> None:
        self.nc, self.config, self.shard = nc, config, shard
        self.registry: Registry = ipmi.load().extended(lan_registry)
        self.serving: dict[str, tuple[asyncio.DatagramTransport, LanServer]] = {}
        self.reads: dict[str, StateReads] = {}
        self.free_since: dict[str, float] = {}
        self.bind_errors: dict[str, OSError] = {}
        """Machine → why its address (of this replica's share) could not be bound, last time."""
        self.unserved: dict[str, str] = {}
        """Machine → ``host:port: reason``, for the addresses of this replica's share nobody serves."""
        self.service: Service | None = None

    def own(self, vm: VmConfig) -> bool:
        return shard_of(vm.name, self.shard[1]) == self.shard[0]

    async def bind_what_is_free(self) -> bool:
        """Serve every address this replica should and can; True when that changed anything."""
        loop = asyncio.get_running_loop()
        changed = False
        for vm in self.config.vms.values():
            if vm.ipmi is None or vm.name in self.serving:
                continue
            if not self.own(vm) and loop.time() - self.free_since.setdefault(vm.name, loop.time()) < TAKEOVER:
                if not await self._free(vm):
                    self.free_since[vm.name] = loop.time()
                continue
            try:
                transport, server = await loop.create_datagram_endpoint(
                    lambda vm=vm: LanServer(vm.name, self.nc, self.registry, self.config.ipmi), local_addr=vm.ipmi)
            except OSError as exc:
                log.debug("%s: %s:%d cannot be bound (%s)", vm.name, *vm.ipmi, exc)
                self.free_since[vm.name] = loop.time()
                if self.own(vm):
                    self.bind_errors[vm.name] = exc
                continue
            self.bind_errors.pop(vm.name, None)
            self.serving[vm.name] = (transport, server)
            self.reads[vm.name] = server.state
            self.free_since.pop(vm.name, None)
            changed = True
            log.info("%s: IPMI over LAN on udp %s:%d%s", vm.name, *vm.ipmi,
                     "" if self.own(vm) else " (taken over from another replica)")
        return changed

    async def give_back(self) -> bool:
        """Stop serving the taken-over addresses whose own replica is back; True if any."""
        taken_over = [name for name in self.serving if not self.own(self.config.vms[name])]
        if not taken_over:
            return False
        shards = set()
        for info in await service_infos(self.nc, SERVICE_NAME):
            with contextlib.suppress(argparse.ArgumentTypeError):
                shards.add(parse_shard(metadata(info).get("shard", "")))
        returned = [name for name in taken_over if any(shard_of(name, count) == number for number, count in shards)]
        for name in returned:
            transport, server = self.serving.pop(name)
            self.reads.pop(name, None)
            self.free_since[name] = asyncio.get_running_loop().time()  # not to be taken again at once
            await server.close()
            transport.close()
            log.info("%s: IPMI over LAN given back to the replica of its shard", name)
        return bool(returned)

    async def check_unserved(self) -> bool:
        """Work out which addresses of this replica's share nobody serves (not bound here, not
        announced by another replica, not held by another replica's process); True when that
        changed. Each newly unserved one is logged at ERROR."""
        failing = {name: exc for name, exc in self.bind_errors.items() if name not in self.serving}
        unserved: dict[str, str] = {}
        if failing:
            announced = {key.removeprefix("ipmi.") for info in await service_infos(self.nc, SERVICE_NAME)
                         for key in metadata(info) if key.startswith("ipmi.")}
            for name, exc in failing.items():
                host, port = self.config.vms[name].ipmi or ("", 0)
                if name in announced or _is_replica(address_holder("udp", host, port)):
                    continue
                unserved[name] = f"{host}:{port}: {bind_failure(exc, 'udp', host, port)}"
        for name, problem in unserved.items():
            if self.unserved.get(name) != problem:
                log.error("%s: IPMI over LAN %s; trying again every %g s", name, problem, RETRY)
        for name in self.unserved.keys() - unserved.keys():
            log.info("%s: IPMI over LAN served now", name)
        changed, self.unserved = unserved != self.unserved, unserved
        return changed

    @staticmethod
    async def _free(vm: VmConfig) -> bool:
        """The address can be bound now (nobody serves it); tried and released at once."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=vm.ipmi)
        except OSError:
            return False
        transport.close()
        return True

    async def announce(self) -> None:
        """(Re)register on the bus with the machines served now and their addresses."""
        if self.service is not None:
            await self.service.stop()
        listening = {name: "{}:{}".format(*self.config.vms[name].ipmi or ("", 0)) for name in sorted(self.serving)}
        self.service = await bus.serve(
            self.nc, name=SERVICE_NAME, version=__version__, description="IPMI over LAN (RMCP, RMCP+) for each machine",
            endpoints=[], metadata={"machines": ",".join(listening), "shard": "/".join(map(str, self.shard)),
                                    **{f"ipmi.{name}": address for name, address in listening.items()},
                                    **{unserved_key("ipmi", name): why for name, why in self.unserved.items()}})

    async def close(self) -> None:
        if self.service is not None:
            await self.service.stop()
        for transport, server in self.serving.values():
            await server.close()
            transport.close()


async def serve(nc: Client, config: Config, stop: asyncio.Event, shard: tuple[int, int] = (1, 1)) -> None:
    endpoints = Endpoints(nc, config, shard)
    vnc_listeners = VncListeners(nc)  # the VNC listeners of this replica's share of the machines
    own_vnc = [vm for vm in config.vms.values() if vm.vnc is not None and endpoints.own(vm)]
    subscription = await follow_state_changes(nc, endpoints.reads)
    await vnc_listeners.bind(own_vnc)
    await endpoints.bind_what_is_free()
    await endpoints.check_unserved()
    await endpoints.announce()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RETRY)
            except TimeoutError:
                await vnc_listeners.bind(own_vnc)
                if (await endpoints.give_back() | await endpoints.bind_what_is_free()
                        | await endpoints.check_unserved()):
                    await endpoints.announce()
    finally:
        await subscription.unsubscribe()
        await vnc_listeners.close()
        await endpoints.close()


def main() -> None:
    parser = argument_parser("qemu-bmc IPMI over LAN service")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), metavar="K/N",
                        help="serve the K-th of N shares of the machines (replicas), and stand by for the others")
    args = parser.parse_args()
    run_service(SERVICE_NAME, args, functools.partial(serve, shard=args.shard))
