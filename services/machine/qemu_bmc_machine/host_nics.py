"""Lab mode: the host's (or the container's) network interfaces handed to a managed VM, as
docker-qemu-bmc does for containerlab (``[vm.NAME] nics = ["eth1", "eth2"]``).

Before QEMU starts, each named interface gets, in the order of ``nics`` (the guest's first virtio
NIC is the first interface):

* with macvtap (``nic_mode = "macvtap"``, or ``"auto"`` where the kernel makes and opens one): a
  macvtap device in bridge mode over the interface, whose character device (``/dev/tapN``) QEMU
  inherits open (``-netdev tap,fd=N``); the guest's NIC has the macvtap's MAC address, the only
  unicast address a macvtap passes up;
* else (``nic_mode = "bridge"``, or macvtap not available): a Linux bridge with the interface
  enslaved to it and a tap device on it, which QEMU opens by name.

The devices are named ``qmt-<id>-<n>`` (macvtap), ``qbr-<id>-<n>`` (bridge), ``qtp-<id>-<n>``
(tap), ``<id>`` six hex digits of the SHA-256 of the machine's name and ``<n>`` the interface's
place in ``nics``: at most 15 bytes (IFNAMSIZ), and each machine's own. They are removed when
QEMU has exited; those a crash left are removed when the machine service starts without
finding the machine's QEMU, and before each launch. The guest's MAC addresses are derived from
the machine's and the interface's names (locally administered), so they stay across launches.

Everything is done with iproute2's ``ip``, which needs CAP_NET_ADMIN (root, or a privileged
container as containerlab runs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from qemu_bmc_shared.config import VmConfig
from qemu_bmc_shared.launcher import HostNic

log = logging.getLogger(__name__)

PREFIXES = ("qmt", "qtp", "qbr")
"""Device kinds, in the order they are removed (a bridge after the tap on it)."""


class HostNicError(Exception):
    """An interface could not be handed to the VM; the message says which and why."""


def device_name(kind: str, vm: VmConfig, index: int) -> str:
    return f"{kind}-{_machine_id(vm)}-{index}"


def guest_mac(vm: VmConfig, interface: str) -> str:
    """The MAC address of the guest's NIC on ``interface``: locally administered, unicast."""
    digest = hashlib.sha256(f"{vm.name}\0{interface}".encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))


def _machine_id(vm: VmConfig) -> str:
    return hashlib.sha256(vm.name.encode()).hexdigest()[:6]


async def _ip(*args: str) -> str:
    try:
        process = await asyncio.create_subprocess_exec("ip", *args, stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise HostNicError("the ip command (iproute2) is not installed") from None
    out, err = await process.communicate()
    if process.returncode != 0:
        raise HostNicError(f"ip {' '.join(args)}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def _links() -> dict[str, dict[str, Any]]:
    """Interface name → its ``ip -json link`` entry, in the network namespace of the service."""
    return {link["ifname"]: link for link in json.loads(await _ip("-json", "link", "show") or "[]")}


async def own_devices(vm: VmConfig) -> list[str]:
    """The machine's devices that exist now, in the order they are removed."""
    links = await _links()
    return [name for kind in PREFIXES for name in sorted(links) if name.startswith(f"{kind}-{_machine_id(vm)}-")]


async def detach(vm: VmConfig) -> None:
    """Remove every device of the machine (none while QEMU still uses them: called once it has exited).
    Failures are logged: the next launch tries again."""
    if not vm.nics:
        return
    try:
        for name in await own_devices(vm):
            with contextlib.suppress(HostNicError):  # gone meanwhile (a bridge's port goes with the bridge)
                await _ip("link", "delete", "dev", name)
        left = await own_devices(vm)
    except HostNicError as exc:
        log.error("%s: host interface devices not removed: %s", vm.name, exc)
        return
    if left:
        log.error("%s: host interface devices not removed: %s", vm.name, ", ".join(left))


async def attach(vm: VmConfig) -> tuple[HostNic, ...]:
    """Make the devices of every interface of ``nics`` (after removing any a crash left); the
    macvtap file descriptors are open: the caller closes them (close) once QEMU has them."""
    if not vm.nics:
        return ()
    await detach(vm)
    links = await _links()
    nics: list[HostNic] = []
    try:
        for index, interface in enumerate(vm.nics):
            if interface not in links:
                raise HostNicError(f"no network interface {interface!r} (nics) on this host")
            if "master" in links[interface]:  # a bridge's (another machine's?) or a bond's port
                raise HostNicError(f"network interface {interface!r} (nics) is already a port of "
                                   f"{links[interface]['master']}: a host interface goes to one machine")
            await _ip("link", "set", "dev", interface, "up")
            if vm.nic_mode != "bridge":
                try:
                    nics.append(await _macvtap(vm, index, interface))
                    continue
                except HostNicError as exc:
                    if vm.nic_mode == "macvtap":
                        raise
                    log.info("%s: no macvtap on %s (%s): a bridge and a tap instead", vm.name, interface, exc)
                    with contextlib.suppress(HostNicError):
                        await _ip("link", "delete", "dev", device_name("qmt", vm, index))
            nics.append(await _bridge(vm, index, interface))
    except BaseException:
        close(tuple(nics))
        await detach(vm)
        raise
    log.info("%s: host interfaces %s handed over (%s)", vm.name, ", ".join(vm.nics),
             ", ".join(f"fd {nic.fd}" if nic.fd is not None else f"tap {nic.tap}" for nic in nics))
    return tuple(nics)


def close(nics: tuple[HostNic, ...]) -> None:
    """Close the service's copies of the macvtap file descriptors (QEMU holds its own)."""
    for nic in nics:
        if nic.fd is not None:
            with contextlib.suppress(OSError):
                os.close(nic.fd)


async def _macvtap(vm: VmConfig, index: int, interface: str) -> HostNic:
    name, mac = device_name("qmt", vm, index), guest_mac(vm, interface)
    await _ip("link", "add", "link", interface, "name", name, "address", mac, "type", "macvtap", "mode", "bridge")
    await _ip("link", "set", "dev", name, "up")
    ifindex = int((await _links())[name]["ifindex"])
    return HostNic(mac=mac, fd=_open_tap(vm, name, ifindex))


def _open_tap(vm: VmConfig, name: str, ifindex: int) -> int:
    """Open the macvtap's character device: ``/dev/tapN`` (devtmpfs or udev makes it), else a node
    made in the runtime directory from the device number sysfs gives (a container's /dev is often
    a plain tmpfs), removed once open."""
    node = Path(f"/dev/tap{ifindex}")
    made = False
    try:
        if not node.exists():
            numbers = Path(f"/sys/class/net/{name}/macvtap/tap{ifindex}/dev").read_text().strip()
            major, minor = (int(number) for number in numbers.split(":"))
            node = vm.runtime_dir / f"tap{ifindex}"
            node.unlink(missing_ok=True)
            os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(major, minor))
            made = True
        return os.open(node, os.O_RDWR)
    except (OSError, ValueError) as exc:
        raise HostNicError(f"cannot open the macvtap device of {name}: {exc}") from None
    finally:
        if made:
            node.unlink(missing_ok=True)


async def _bridge(vm: VmConfig, index: int, interface: str) -> HostNic:
    bridge, tap = device_name("qbr", vm, index), device_name("qtp", vm, index)
    await _ip("link", "add", "name", bridge, "type", "bridge")
    await _ip("link", "set", "dev", interface, "master", bridge)
    await _ip("tuntap", "add", "dev", tap, "mode", "tap", "user", str(os.geteuid()))
    await _ip("link", "set", "dev", tap, "master", bridge)
    for name in (tap, bridge):
        await _ip("link", "set", "dev", name, "up")
    return HostNic(mac=guest_mac(vm, interface), tap=tap)
