"""Boot override through device ``bootindex``.

QEMU regenerates the firmware's ``bootorder`` file (fw_cfg) on every system reset from the
devices' ``bootindex`` properties, which QMP ``qom-set`` changes at run time. SeaBIOS and OVMF
both boot in that order. So an override is applied by re-ranking the bootable devices (the
target's devices first) before the next reset, without relaunching QEMU, and undone after the
boot that used a ``Once`` override.

The order the operator gave QEMU (the "base order") is read once per QEMU instance and kept in
the instance itself, as the ``identity`` string of an ``authz-simple`` object, so a restarted
machine service never mistakes an applied override for the base order.

Boot entries that are not devices hold indexes too: the option ROM of a direct-boot ``-kernel``
(index 0) and ``-option-rom ...,bootindex=N``. QMP cannot list them, so the indexes a command line
gives them are reserved, and an index QEMU refuses as taken is reserved and the order computed again.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from qemu_bmc_shared.bus import BusError

log = logging.getLogger(__name__)

DeviceKind = Literal["Pxe", "Hdd", "Cd"]
Execute = Callable[..., Awaitable[Any]]
"""Runs one QMP command: ``await execute(command, arguments)``."""
BASE_ORDER_OBJECT = "qemu-bmc-base-order"
DEVICE_CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon", "/machine/unattached")


TAKEN = re.compile(r"bootindex (\d+) has already been used")


class IndexTaken(Exception):
    """QEMU refused a boot index that a boot entry it did not tell us of holds."""

    def __init__(self, index: int) -> None:
        super().__init__(f"boot index {index} is taken")
        self.index = index


def taken_index(message: str) -> int | None:
    """The boot index of QEMU's "The bootindex N has already been used" error, else None."""
    match = TAKEN.search(message)
    return int(match.group(1)) if match else None


def reserved_indexes(argv: list[str], kernel: bool) -> set[int]:
    """The boot indexes a command line gives to boot entries that are not devices: 0 for the
    direct-boot kernel's option ROM, N for ``-option-rom FILE,bootindex=N``."""
    reserved = {0} if kernel and any(arg.lstrip("-") == "kernel" for arg in argv if arg.startswith("-")) else set()
    for flag, value in itertools.pairwise(argv):
        if flag.lstrip("-") == "option-rom":
            reserved.update(int(number) for number in re.findall(r"bootindex=(\d+)", value))
    return reserved


@dataclass(frozen=True)
class BootDevice:
    path: str
    type: str
    kind: DeviceKind


def kind_of(device_type: str, properties: set[str]) -> DeviceKind | None:
    if "bootindex" not in properties:
        return None
    if "mac" in properties:
        return "Pxe"
    if device_type.endswith("-cd"):
        return "Cd"
    return "Hdd"


async def discover(execute: Execute) -> list[BootDevice]:
    """Every device with a ``bootindex`` property, classified as NIC, CD or disk."""
    devices = []
    for container in DEVICE_CONTAINERS:
        for child in await execute("qom-list", {"path": container}):
            child_type: str = child["type"]
            if not child_type.startswith("child<"):
                continue
            path = f"{container}/{child['name']}"
            properties = {prop["name"] for prop in await execute("qom-list", {"path": path})}
            kind = kind_of(child_type[6:-1], properties)
            if kind:
                devices.append(BootDevice(path=path, type=child_type[6:-1], kind=kind))
    return devices


async def bootindexes(execute: Execute, devices: list[BootDevice]) -> dict[str, int]:
    return {device.path: int(await execute("qom-get", {"path": device.path, "property": "bootindex"}))
            for device in devices}


async def base_order(execute: Execute, devices: list[BootDevice]) -> dict[str, int]:
    """The operator's boot order of this QEMU instance, recorded in it at the first look."""
    objects = {child["name"] for child in await execute("qom-list", {"path": "/objects"})}
    if BASE_ORDER_OBJECT in objects:
        stored = await execute("qom-get", {"path": f"/objects/{BASE_ORDER_OBJECT}", "property": "identity"})
        order: dict[str, int] = json.loads(str(stored))
        return {device.path: order.get(device.path, -1) for device in devices}
    order = await bootindexes(execute, devices)
    await execute("object-add", {"qom-type": "authz-simple", "id": BASE_ORDER_OBJECT,
                                     "identity": json.dumps(order)})
    return order


def override_order(devices: list[BootDevice], base: dict[str, int], first: list[BootDevice],
                   reserved: set[int] | frozenset[int] = frozenset()) -> dict[str, int]:
    """Bootindexes that put the ``first`` devices first, the rest after in their base order, on
    the lowest indexes that are not ``reserved``. No device to put first: the base order."""
    if not first:
        return dict(base)

    def rank(device: BootDevice) -> tuple[int, int, str]:
        index = base.get(device.path, -1)
        return (index < 0, index, device.path)

    first = sorted(first, key=rank)
    rest = sorted((device for device in devices if device not in first and base.get(device.path, -1) >= 0),
                  key=rank)
    free = (index for index in itertools.count() if index not in reserved)
    order = {device.path: -1 for device in devices}
    order.update({device.path: next(free) for device in first + rest})
    return order


async def apply_order(execute: Execute, devices: list[BootDevice], order: dict[str, int]) -> None:
    """Set the bootindexes (effective at the next reset); clears changed ones first, as QEMU refuses
    two devices with one index. Raises IndexTaken when QEMU says another boot entry holds one of
    them (the caller reserves it and asks again); the devices changed so far keep no index then."""
    current = await bootindexes(execute, devices)
    changed = [path for path, index in order.items() if current.get(path) != index]
    for path in changed:
        if current[path] != -1:
            await execute("qom-set", {"path": path, "property": "bootindex", "value": -1})
    for path in changed:
        if order[path] != -1:
            try:
                await execute("qom-set", {"path": path, "property": "bootindex", "value": order[path]})
            except BusError as exc:
                index = taken_index(exc.message)
                if index is None:
                    raise
                raise IndexTaken(index) from None
    if changed:
        log.debug("boot order now %s", order)



# ---------------------------------------------------------------- boot options (UEFI device paths)

async def _property(execute: Execute, path: str, name: str) -> Any:
    try:
        return await execute("qom-get", {"path": path, "property": name})
    except BusError:
        return None


async def uefi_device_path(execute: Execute, device: BootDevice) -> str:
    """The device's UEFI device path in text form (UEFI 2.10 §10.6): the PCI path from the root
    bridge to the device (or to its controller), then for a disk behind AHCI its SATA port, behind
    SCSI its target and LUN, for a NIC its MAC address."""
    tail: list[str] = []
    pci = device.path
    if device.type.startswith(("ide-", "scsi-")):
        bus = str(await _property(execute, device.path, "parent_bus") or "")
        pci = bus.rsplit("/", 1)[0]  # the controller the bus belongs to
        if device.type.startswith("ide-"):  # AHCI port N is its bus "….N"
            port = bus.rsplit(".", 1)[-1]
            tail.append(f"Sata(0x{int(port) if port.isdigit() else 0:X},0xFFFF,0x0)")
        else:
            target, lun = await _property(execute, device.path, "scsi-id"), await _property(execute, device.path, "lun")
            tail.append(f"Scsi(0x{int(target or 0):X},0x{int(lun or 0):X})")
    elif device.kind == "Pxe" and (mac := await _property(execute, device.path, "mac")):
        tail.append(f"MAC({str(mac).replace(':', '').upper()},0x1)")
    nodes: list[str] = []
    for _ in range(16):  # up the PCI tree (root ports, bridges) to the host bridge
        devfn = await _property(execute, pci, "addr")
        if not isinstance(devfn, int) or devfn < 0:
            break
        nodes.insert(0, f"Pci(0x{devfn >> 3:X},0x{devfn & 7:X})")
        pci = str(await _property(execute, pci, "parent_bus") or "").rsplit("/", 1)[0]
    return "/".join(["PciRoot(0x0)", *nodes, *tail])


def option_reference(index: int) -> str:
    """A UEFI BootOptionReference (``Boot####``, four upper-case hex digits)."""
    return f"Boot{index:04X}"


def device_name(device: BootDevice) -> str:
    kind = {"Pxe": "Network", "Hdd": "Disk", "Cd": "CD/DVD"}[device.kind]
    return f"{kind} {device.path.rsplit('/', 1)[-1]} ({device.type})"
