"""Graceful power actions that the guest ignores, as real BMCs answer them: a GracefulRestart
(DMTF Tacklebox's default reset) falls back to a reset after the machine's graceful time-out and
consumes a one-time boot override; a GracefulShutdown gives up and says so; a later power request
cancels the wait, and a restarted machine service never powers a machine on by surprise.

The guest is the direct-boot kernel of tests/guest_images.py: it halts, and never answers the ACPI
power button."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from clients import run
from conftest import Events, wait_for
from guest_images import GuestImages
from test_boot_any_command_line import PASSWORD, USER, Lab, start_lab

TACKLEBOX = Path(sys.executable).parent
#: Seconds the guest has to obey the power button (short here: the guest never does).
GRACEFUL_TIMEOUT = 3


async def tacklebox_reset(lab: Lab, *args: str) -> None:
    code, output = await run(str(TACKLEBOX / "rf_power_reset.py"), "-r", lab.url, "-u", USER, "-p", PASSWORD,
                             "-s", "n1", *args)
    assert code == 0, output


async def test_graceful_restart_that_the_guest_ignores(nc, services, short_dir: Path, images: GuestImages):
    lab = await start_lab(nc, services, short_dir, images.qemu_args(kernel=True),
                          f"graceful_timeout = {GRACEFUL_TIMEOUT}\n")
    events = await Events.subscribe(nc, "n1")
    await lab.reset("On")
    assert await lab.next_boot() == "MARKER-KERNEL"
    response = await lab.patch_boot(BootSourceOverrideTarget="Pxe", BootSourceOverrideEnabled="Once")
    assert response.status_code == 200, response.text

    # Tacklebox's reset with no type is a GracefulRestart; the guest ignores the power button, so
    # the BMC resets the machine once the time-out is over, and that boot uses the override
    before = len(events.of("event.power"))
    await tacklebox_reset(lab)
    assert await lab.next_boot() == "MARKER-PXE"
    assert (await lab.override()).enabled == "Disabled"
    assert await lab.power() == "On"
    since = events.of("event.power")[before:]
    assert [event.state for event in since if event.cause == "graceful-timeout"] == ["On"]
    assert not [event for event in since if event.state == "Off"]  # a reset, not a power cycle


async def test_a_later_power_request_cancels_the_graceful_wait(nc, services, short_dir: Path,
                                                               images: GuestImages):
    lab = await start_lab(nc, services, short_dir, images.qemu_args(kernel=True),
                          f"graceful_timeout = {GRACEFUL_TIMEOUT}\n")
    events = await Events.subscribe(nc, "n1")
    await lab.reset("On")
    assert await lab.next_boot() == "MARKER-KERNEL"

    await lab.reset("GracefulRestart")
    await lab.reset("ForceOff")  # the operator's, during the wait: the machine stays off
    assert await lab.power() == "Off"
    await asyncio.sleep(3 * GRACEFUL_TIMEOUT)  # past the time-out the restart had: nothing happens then
    assert await lab.power() == "Off"
    assert not [event for event in events.of("event.power") if event.cause == "graceful-timeout"]
    assert lab.markers() == ["MARKER-KERNEL"]

    # GracefulShutdown ignored: the machine stays on, and the BMC says the guest did not answer
    await lab.reset("On")
    assert await lab.next_boot() == "MARKER-KERNEL"
    await lab.reset("GracefulShutdown")
    await wait_for(lambda: [event for event in events.of("event.power") if event.cause == "graceful-timeout"],
                   timeout=60, message="the graceful shutdown given up")
    assert await lab.power() == "On"


async def test_a_restarted_machine_service_forgets_the_graceful_wait(nc, services, short_dir: Path,
                                                                     images: GuestImages):
    """The wait lives in the machine service: stopped while it waits, the service never powers the
    machine on (or resets it) when it comes back, whatever happens to the machine meanwhile."""
    lab = await start_lab(nc, services, short_dir, images.qemu_args(kernel=True),
                          f"graceful_timeout = {GRACEFUL_TIMEOUT}\n", stop_vms=False)
    await lab.reset("On")
    assert await lab.next_boot() == "MARKER-KERNEL"
    await lab.reset("GracefulRestart")
    assert await lab.machine.stop() == 0  # the VM keeps running
    await services("machine", short_dir / "qemu-bmc.toml", "--stop-vms-on-exit")  # adopts it
    await wait_for(lambda: lab.power_is("On"), message="the running VM adopted")
    await lab.reset("ForceOff")
    await asyncio.sleep(3 * GRACEFUL_TIMEOUT)  # past the time-out of the forgotten restart
    assert await lab.power() == "Off"
    assert lab.markers() == ["MARKER-KERNEL"]
