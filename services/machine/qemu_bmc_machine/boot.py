"""Boot override through device ``bootindex``.

QEMU regenerates the firmware's ``bootorder`` file (fw_cfg) on every system reset from the
devices' ``bootindex`` properties, which QMP ``qom-set`` changes at run time. SeaBIOS and OVMF
both boot in that order. So an override is applied by re-ranking the bootable devices (the
target's devices first) before the next reset, without relaunching QEMU, and undone after the
boot that used a ``Once`` override.

The order the operator gave QEMU (the "base order") is read once per QEMU instance and kept in
the instance itself, as the ``identity`` string of an ``authz-simple`` object, so a restarted
machine service never mistakes an applied override for the base order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

DeviceKind = Literal["Pxe", "Hdd", "Cd"]
Execute = Callable[..., Awaitable[Any]]
"""Runs one QMP command: ``await execute(command, arguments)``."""
BASE_ORDER_OBJECT = "qemu-bmc-base-order"
DEVICE_CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon", "/machine/unattached")


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


def override_order(devices: list[BootDevice], base: dict[str, int], target: str) -> dict[str, int]:
    """Bootindexes that put ``target``'s devices first, the rest after in their base order.

    A target with no device of its kind (or None, BiosSetup) leaves the base order.
    """
    first = [device for device in devices if device.kind == target]
    if not first:
        return dict(base)

    def rank(device: BootDevice) -> tuple[int, int, str]:
        index = base.get(device.path, -1)
        return (index < 0, index, device.path)

    first.sort(key=rank)
    rest = sorted((device for device in devices if device.kind != target and base.get(device.path, -1) >= 0),
                  key=rank)
    order = {device.path: -1 for device in devices}
    order.update({device.path: index for index, device in enumerate(first + rest)})
    return order


async def apply_order(execute: Execute, devices: list[BootDevice], order: dict[str, int]) -> None:
    """Set the bootindexes (effective at the next reset); clears changed ones first, as QEMU refuses
    two devices with one index."""
    current = await bootindexes(execute, devices)
    changed = [path for path, index in order.items() if current.get(path) != index]
    for path in changed:
        if current[path] != -1:
            await execute("qom-set", {"path": path, "property": "bootindex", "value": -1})
    for path in changed:
        if order[path] != -1:
            await execute("qom-set", {"path": path, "property": "bootindex", "value": order[path]})
    if changed:
        log.debug("boot order now %s", order)

