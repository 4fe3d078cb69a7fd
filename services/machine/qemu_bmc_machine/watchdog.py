"""The BMC watchdog timer of one machine (IPMI v2.0 §27): set, reset and read over the bus, run
here, where the machine is, so that its action (reset, power off, power cycle, pre-timeout NMI)
happens whichever front-end (IPMI over LAN or the VM wire) set it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import PowerState, WatchdogSet, WatchdogStatus

if TYPE_CHECKING:
    from .machine import Machine


class Watchdog:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def status(self) -> WatchdogStatus:
        return WatchdogStatus()

    async def set(self, request: WatchdogSet) -> WatchdogStatus:
        raise BusError("not_found", f"machine {self.machine.name} has no watchdog timer yet")

    async def reset(self) -> WatchdogStatus:
        raise BusError("not_found", f"machine {self.machine.name} has no watchdog timer yet")

    def power_changed(self, state: PowerState, cause: str) -> None:
        """The machine's power state changed (``cause``: the QMP event, ``exited`` …)."""

    def stop(self) -> None:
        """The machine service stops."""
