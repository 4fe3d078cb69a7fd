"""The ComputerSystem's own settings, kept by the state service (ChassisConfig): its asset tag and
its indicator LED (the chassis identify of IPMI)."""

from __future__ import annotations

from typing import Any

from qemu_bmc_shared.messages import ChassisConfig

from .errors import RedfishError
from .resources import Redfish

#: ComputerSystem properties a PATCH may change here (Boot is the machine service's, see systems.py).
WRITABLE: tuple[str, ...] = ()


def properties(chassis: ChassisConfig) -> dict[str, Any]:
    """The settings as ComputerSystem properties."""
    return {}


async def patch(redfish: Redfish, machine: str, changes: dict[str, Any]) -> None:
    """Apply ``changes`` (only keys of WRITABLE): 400 naming what is wrong, nothing applied then."""
    for key in changes:
        raise RedfishError(400, "PropertyNotWritable", key)
