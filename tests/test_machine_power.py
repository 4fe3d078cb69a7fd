"""Power control of real QEMU machines through the bus: managed and attach mode."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import clients
import pytest
from conftest import Events, bmc_request, free_udp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from qemu_bmc_shared import subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.messages import MediaInsert, MediaStatus, PowerRequest, PowerStatus


async def power(nc, machine: str, action: str) -> PowerStatus:
    return await bmc_request(nc, machine, subjects.POWER_SET, PowerRequest(action=action), PowerStatus, timeout=60)


async def status(nc, machine: str) -> PowerStatus:
    return await bmc_request(nc, machine, subjects.POWER_GET, None, PowerStatus)


def process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
async def managed(services, short_dir: Path, images: GuestImages):
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n")
    service = await services("machine", config, "--stop-vms-on-exit")
    return service


async def test_managed_power_cycle_of_a_real_vm(nc, managed, short_dir: Path):
    events = await Events.subscribe(nc, "n1")
    assert (await status(nc, "n1")).state == "Off"
    assert (await status(nc, "n1")).run_state == "not-running"

    on = await power(nc, "n1", "on")
    assert on.state == "On" and on.run_state == "running" and on.pid and process_exists(on.pid)
    await wait_for(lambda: "MARKER-HDD" in serial_log(short_dir, "n1"), message="the guest's boot marker")
    await wait_for(lambda: any(e.cause == "launched" for e in events.of("event.power")), message="launch event")

    # power on while on is a no-op: same process, no new boot
    again = await power(nc, "n1", "on")
    assert again.pid == on.pid

    # reset: the guest boots again (second marker), the machine stays On
    reset = await power(nc, "n1", "reset")
    assert reset.state == "On" and reset.pid == on.pid
    await wait_for(lambda: serial_log(short_dir, "n1").count("MARKER-HDD") == 2, message="second boot")
    await wait_for(lambda: any(e.cause == "RESET" for e in events.of("event.power")), message="RESET event")

    # NMI: the guest's NMI handler runs
    await power(nc, "n1", "nmi")
    await wait_for(lambda: "NMI" in serial_log(short_dir, "n1"), message="the guest's NMI handler output")

    # cycle: QEMU goes away and a new one boots
    cycled = await power(nc, "n1", "cycle")
    assert cycled.state == "On" and cycled.pid != on.pid and not process_exists(on.pid)
    await wait_for(lambda: serial_log(short_dir, "n1").count("MARKER-HDD") == 3, message="boot after cycle")

    # hard off: the QEMU process exits
    off = await power(nc, "n1", "off")
    assert off.state == "Off" and off.run_state == "not-running" and off.pid is None
    assert not process_exists(cycled.pid)
    await wait_for(lambda: any(e.cause == "exited" and e.state == "Off" for e in events.of("event.power")),
                   message="exit event")

    # reset and nmi need the machine on
    for action in ("reset", "nmi"):
        with pytest.raises(BusError) as refused:
            await power(nc, "n1", action)
        assert refused.value.error == "invalid_state"
    # soft off of an off machine changes nothing
    assert (await power(nc, "n1", "soft")).state == "Off"


async def test_soft_off_goes_through_the_guest(nc, managed, short_dir: Path):
    await power(nc, "n1", "on")
    await wait_for(lambda: "MARKER-HDD" in serial_log(short_dir, "n1"))
    events = await Events.subscribe(nc, "n1")
    soft = await power(nc, "n1", "soft")
    # the ACPI power button is pressed and the guest decides: the reply may already see it off
    assert soft.state in ("On", "Off") and soft.pid
    await wait_for(lambda: "POWER-BUTTON" in serial_log(short_dir, "n1"), message="the guest seeing the button")
    final = await wait_for(lambda: _off(nc), message="Off after the guest shut down")
    assert final.run_state == "shutdown" and final.pid  # -no-shutdown: QEMU stays, the machine is off
    causes = [e.cause for e in events.of("event.power")]
    assert "POWERDOWN" in causes and "SHUTDOWN" in causes
    # power on from the guest-shutdown state boots it again in the same process
    on = await power(nc, "n1", "on")
    assert on.state == "On" and on.pid == final.pid
    await wait_for(lambda: serial_log(short_dir, "n1").count("MARKER-HDD") == 2)


async def _off(nc) -> PowerStatus | None:
    current = await status(nc, "n1")
    return current if current.state == "Off" else None


async def test_killed_qemu_is_reported_off(nc, managed, short_dir: Path):
    """How soon (the README's "within a second") is bench/chaos.py's ``qemu`` figure."""
    on = await power(nc, "n1", "on")
    events = await Events.subscribe(nc, "n1")
    os.kill(on.pid, signal.SIGKILL)
    await wait_for(lambda: _off(nc), timeout=30, message="Off after the crash")
    await wait_for(lambda: any(e.state == "Off" for e in events.of("event.power")), timeout=30,
                   message="an Off power event")
    # and it can be powered on again
    assert (await power(nc, "n1", "on")).state == "On"


async def test_power_restore_policy_after_a_power_loss(nc, services, short_dir: Path, images: GuestImages):
    """The host loses power (machine service and QEMU killed at once); when the machine service
    starts again, the restore policy set with ipmitool decides (IPMI v2.0 §28.8)."""
    user, password, lan = "admin", "Restore-Pass1", free_udp_port()
    config = write_config(short_dir, f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{lan}"\n')
    await services("state", config, env={"IPMI_USER": user, "IPMI_PASS": password})
    await services("ipmi-lan", config)
    machine = await services("machine", config, "--stop-vms-on-exit")

    for policy, before, after in (("always-on", "off", "On"), ("previous", "on", "On"), ("previous", "off", "Off"),
                                  ("always-off", "on", "Off")):
        code, out = await clients.ipmitool(lan, "chassis", "policy", policy, user=user, password=password)
        assert code == 0, out
        pid = (await power(nc, "n1", before)).pid
        await machine.stop(signal.SIGKILL)
        if pid:
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda pid=pid: not process_exists(pid), timeout=10, message="QEMU gone")
        await machine.start(nc, "qemu-bmc-machine")
        if after == "On":
            await wait_for(lambda: _state(nc, "n1", "On"), timeout=30, message=f"powered on by policy {policy}")
        else:
            await asyncio.sleep(2)  # the policy is read at once: nothing powers the machine on
            assert (await status(nc, "n1")).state == "Off", policy


async def test_attach_mode(nc, services, short_dir: Path, images: GuestImages):
    qmp = short_dir / "attached-qmp.sock"
    serial = short_dir / "attached-serial.log"

    def start_qemu() -> subprocess.Popen:
        return subprocess.Popen(["qemu-system-x86_64", *images.qemu_args(nic=False),
                                 "-drive", "if=none,id=cd0-drive,media=cdrom",
                                 "-device", "ide-cd,id=cd0,drive=cd0-drive,bus=ide.2",
                                 "-qmp", f"unix:{qmp},server=on,wait=off", "-serial", f"file:{serial}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    qemu = start_qemu()
    try:
        config = write_config(short_dir, f'[vm.a1]\nqmp = "{qmp}"\nmedia_device = "cd0"\n')
        await services("machine", config)
        await wait_for(lambda: _state(nc, "a1", "On"), message="attached and On")

        # virtual media on the operator's own CD drive
        inserted = await bmc_request(nc, "a1", subjects.MEDIA_INSERT, MediaInsert(image=str(images.iso)), MediaStatus)
        assert inserted.inserted and inserted.device == "cd0" and inserted.image == str(images.iso)
        assert not (await bmc_request(nc, "a1", subjects.MEDIA_EJECT, None, MediaStatus)).inserted

        off = await power(nc, "a1", "off")  # attach mode: the operator owns the process; stop it
        assert off.state == "Off" and off.run_state == "paused" and qemu.poll() is None
        on = await power(nc, "a1", "on")  # system_reset + cont: a fresh boot
        assert on.state == "On" and on.run_state == "running"
        await wait_for(lambda: serial.read_text().count("MARKER-HDD") == 2, message="boot after power on")

        qemu.kill()
        qemu.wait()
        await wait_for(lambda: _state(nc, "a1", "Off"), timeout=30, message="Off once its QEMU is gone")
        assert (await status(nc, "a1")).run_state == "disconnected"
        with pytest.raises(BusError) as refused:
            await power(nc, "a1", "reset")
        assert refused.value.error == "invalid_state"

        qemu = start_qemu()  # the socket comes back: the service reconnects by itself
        await wait_for(lambda: _state(nc, "a1", "On"), message="reconnected")
    finally:
        qemu.kill()
        qemu.wait()


async def test_attached_uefi_machine_is_recognised(nc, services, short_dir: Path, images: GuestImages):
    from qemu_bmc_shared.messages import BootOverride, Inventory

    qmp = short_dir / "uefi-qmp.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", *images.qemu_args(uefi=True, nic=False), "-S",
                             "-qmp", f"unix:{qmp},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = write_config(short_dir, f'[vm.u2]\nqmp = "{qmp}"\n')
        await services("machine", config)
        await wait_for(lambda: _state(nc, "u2", "Off"), message="attached")  # prelaunch: -S, not started
        await wait_for(lambda: _inventory_firmware(nc, "u2"), message="UEFI firmware seen")
        assert (await bmc_request(nc, "u2", subjects.BOOT_GET, None, BootOverride)).mode == "UEFI"
        inventory = await bmc_request(nc, "u2", subjects.INVENTORY_GET, None, Inventory)
        assert inventory.memory_mib == 128 and inventory.macs == []
    finally:
        qemu.kill()
        qemu.wait()


async def _inventory_firmware(nc, machine: str) -> bool:
    from qemu_bmc_shared.messages import Inventory

    return (await bmc_request(nc, machine, subjects.INVENTORY_GET, None, Inventory)).firmware == "UEFI"


async def _state(nc, machine: str, wanted: str) -> bool:
    return (await status(nc, machine)).state == wanted


async def test_hung_qmp_socket_never_blocks_status(nc, services, short_dir: Path):
    """A fake QMP peer that accepts and never speaks (what a wedged QEMU looks like): status answers
    while the service's connection still waits for the QMP greeting (it gives up on it only after
    QMP_TIMEOUT, 10 s, and then connects again)."""
    socket_path = short_dir / "hung.sock"
    connections = []

    async def accept(reader, writer):
        connections.append((reader, writer))  # held: the peer never closes it

    server = await asyncio.start_unix_server(accept, path=str(socket_path))
    try:
        config = write_config(short_dir, f'[vm.h1]\nqmp = "{socket_path}"\n')
        await services("machine", config)
        await wait_for(lambda: connections, message="the service connecting")
        current = await status(nc, "h1")
        assert current.state == "Off" and current.run_state == "disconnected"
        assert len(connections) == 1 and not connections[0][0].at_eof()  # the first greeting still awaited
        with pytest.raises(BusError) as refused:
            await power(nc, "h1", "nmi")
        assert refused.value.error == "invalid_state"
    finally:
        server.close()
