"""The BMC watchdog timer (IPMI v2.0 §27) with real clients and real QEMU machines: ipmitool and
FreeIPMI over LAN against a SeaBIOS guest (a hard reset, a power down, a pre-timeout NMI the guest
prints, the message flag of a messaging pre-timeout, the SEL records, the negative cases), and
in-band, FreeIPMI's bmc-watchdog and ipmitool inside a Linux guest whose watchdog resets it.

Timer values are in 100 ms (Set/Get Watchdog Timer bytes 5-8); timer uses 1 BIOS FRB2, 2 BIOS/POST,
3 OS load, 4 SMS/OS, 5 OEM; expiration flags bit n for timer use n.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import clients
import pytest
from conftest import ServiceProcess, free_tcp_port, free_udp_port, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from linux_guest import DONE, READY, LinuxGuest
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.messages import PowerRequest, PowerStatus, SelLog, WatchdogEvent, WatchdogStatus

USER, PASSWORD = "admin", "s3cret-Pass"
SMS_OS, OS_LOAD, OEM = 4, 3, 5
#: Watchdog 2 SEL records (sensor type 23h, sensor 5, sensor-specific): event data 1 (11b: event
#: data 2 is an extension code, then the offset) and event data 2 (interrupt type, timer use).
WATCHDOG_RECORD = bytes([0x23, 5, 0x6F])
TIMER_EXPIRED, HARD_RESET, POWER_DOWN, TIMER_INTERRUPT = 0xC0, 0xC1, 0xC2, 0xC8


class Bmc:
    """One machine's BMC over LAN, and what the tests look at."""

    def __init__(self, nc, directory: Path, port: int, machine_service: ServiceProcess) -> None:
        self.nc, self.directory, self.port, self.machine_service = nc, directory, port, machine_service

    async def ipmitool(self, *args: str, privilege: str = "ADMINISTRATOR") -> tuple[int, str]:
        return await clients.ipmitool(self.port, *args, user=USER, password=PASSWORD,
                                      interface=("-I", "lanplus", "-C", "3", "-L", privilege))

    async def ok(self, *args: str, privilege: str = "ADMINISTRATOR") -> str:
        code, out = await self.ipmitool(*args, privilege=privilege)
        assert code == 0, (args, out)
        return out

    async def raw(self, *data: int, privilege: str = "ADMINISTRATOR") -> tuple[int, bytes]:
        """An App (0x06) request through ipmitool raw: its completion code and response data."""
        code, out = await self.ipmitool("raw", "0x06", *(f"{byte:#04x}" for byte in data), privilege=privilege)
        if code == 0:
            return 0, bytes.fromhex(out.replace("\n", " "))
        completion = re.search(r"rsp=(0x[0-9a-f]{2})", out)
        assert completion, out
        return int(completion.group(1), 16), b""

    async def freeipmi(self, tool: str, *args: str) -> str:
        code, out = await clients.run(tool, "-h", f"127.0.0.1:{self.port}", "-u", USER, "-p", PASSWORD,
                                      "-D", "LAN_2_0", "-I", "3", *args)
        assert code == 0, out
        return out

    async def watchdog(self) -> dict[str, str]:
        """``ipmitool mc watchdog get``, field by field."""
        out = await self.ok("mc", "watchdog", "get")
        return {key.strip(): value.strip() for key, value in re.findall(r"^([^:\n]+):(.*)$", out, re.MULTILINE)}

    async def status(self) -> WatchdogStatus:
        return await bus.request(self.nc, "n1", subjects.WATCHDOG_GET, None, WatchdogStatus)

    async def power_state(self) -> str:
        return (await bus.request(self.nc, "n1", subjects.POWER_GET, None, PowerStatus)).state

    def boots(self) -> int:
        return serial_log(self.directory, "n1").count("MARKER-HDD")


def set_request(timer_use: int, countdown: int, action: int = 0, pretimeout: int = 0, interval: int = 0,
                clear: int = 0, dont_log: bool = False, dont_stop: bool = False) -> list[int]:
    """Set Watchdog Timer (§27.6) request data."""
    return [0x24, (0x80 if dont_log else 0) | (0x40 if dont_stop else 0) | timer_use, pretimeout << 4 | action,
            interval, clear, countdown & 0xFF, countdown >> 8]


async def start_bmc(nc, services, directory: Path, images: GuestImages, *machine_options: str) -> Bmc:
    """The state, machine and IPMI over LAN services for one SeaBIOS machine (no NIC), off."""
    port = free_udp_port()
    config = write_config(directory, f'[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n'
                                     f'ipmi = "127.0.0.1:{port}"\n')
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    machine = await services("machine", config, *machine_options)
    await services("ipmi-lan", config)
    return Bmc(nc, directory, port, machine)


@pytest.fixture
async def bmc(nc, services, short_dir: Path, images: GuestImages) -> Bmc:
    return await start_bmc(nc, services, short_dir, images, "--stop-vms-on-exit")


async def test_pretimeout_nmi_and_hard_reset(bmc: Bmc):
    # never set: Get answers a stopped timer, Reset "attempt to start un-initialized watchdog"
    timer = await bmc.watchdog()
    assert timer["Watchdog Timer Is"] == "Stopped" and timer["Initial Countdown"] == "0.0 sec", timer
    code, out = await bmc.ipmitool("mc", "watchdog", "reset")
    assert code != 0 and "uninitialized" in out, out
    assert await bmc.raw(0x22) == (0x80, b"")

    await bmc.ok("power", "on")
    await wait_for(lambda: bmc.boots() == 1, timeout=60, message="the guest booting")
    # SMS/OS, no action, an NMI 1 s before the end of 2 s: the guest's NMI handler prints NMI
    assert await bmc.raw(*set_request(SMS_OS, 20, pretimeout=2, interval=1)) == (0, b"")
    assert "countdown restarted" in await bmc.ok("mc", "watchdog", "reset")
    await wait_for(lambda: "NMI" in serial_log(bmc.directory, "n1"), message="the pre-timeout NMI")
    await wait_for(lambda: expired(bmc, SMS_OS), message="the timer expiring")
    timer = await bmc.watchdog()
    assert timer["Watchdog Timer Is"] == "Stopped" and timer["Present Countdown"] == "0.0 sec", timer
    assert timer["Timer Expiration Flags"].endswith("(0x10)"), timer  # SMS/OS expired
    assert timer["Pre-timeout interrupt"] == "NMI/Diagnostic" and timer["Watchdog Timer Action"] == "No action (0x20)"
    assert await bmc.raw(0x31) == (0, b"\x08")  # Get Message Flags: the watchdog pre-timeout occurred
    assert await bmc.raw(0x30, 0x08) == (0, b"")  # Clear Message Flags clears it
    assert await bmc.raw(0x31) == (0, b"\x00")

    # SMS/OS, hard reset, 3 s, clearing the SMS/OS flag: Set leaves the timer stopped, Reset starts it
    assert await bmc.raw(*set_request(SMS_OS, 30, action=1, clear=1 << SMS_OS)) == (0, b"")
    timer = await bmc.watchdog()
    assert timer["Watchdog Timer Use"] == "SMS/OS (0x04)" and timer["Watchdog Timer Is"] == "Stopped", timer
    assert timer["Watchdog Timer Action"] == "Hard Reset (0x01)" and timer["Pre-timeout interrupt"] == "None"
    assert timer["Initial Countdown"] == timer["Present Countdown"] == "3.0 sec", timer
    assert timer["Timer Expiration Flags"].endswith("(0x00)"), timer
    assert "countdown restarted" in await bmc.ok("mc", "watchdog", "reset")
    await wait_for(lambda: bmc.boots() == 2, timeout=60, message="the watchdog resetting the guest")
    timer = await bmc.watchdog()
    assert timer["Watchdog Timer Is"] == "Stopped" and timer["Timer Expiration Flags"].endswith("(0x10)"), timer

    # the SEL: the timer interrupt (NMI, SMS/OS), the status-only expiry, the hard reset; as stored
    # and as clients show them
    records = await wait_for(lambda: watchdog_records(bmc.nc, 3), message="three watchdog SEL records")
    assert records == [bytes([TIMER_INTERRUPT, 0x24]), bytes([TIMER_EXPIRED, 0x24]), bytes([HARD_RESET, 0x04])]
    elist = [line for line in (await bmc.ok("sel", "elist")).splitlines() if "Watchdog" in line]
    assert ["Timer interrupt" in elist[0], "Timer expired" in elist[1], "Hard reset" in elist[2]] == [True] * 3, elist
    sel = [line for line in (await bmc.freeipmi("ipmi-sel", "--sdr-cache-directory", str(bmc.directory)))
           .splitlines() if "Watchdog 2" in line]
    assert "Timer interrupt ; Timer use at expiration = SMS/OS ; Interrupt type = NMI" in sel[0], sel
    assert "Hard Reset ; Timer use at expiration = SMS/OS ; Interrupt type = none" in sel[2], sel

    # ipmitool's "off": Set (stops), SMS/OS, no action, clearing the SMS/OS expiration flag
    await bmc.ok("mc", "watchdog", "off")
    timer = await bmc.watchdog()
    assert timer["Timer Expiration Flags"].endswith("(0x00)") and timer["Watchdog Timer Is"] == "Stopped", timer
    assert timer["Watchdog Timer Action"] == "No action (0x00)", timer
    assert bmc.boots() == 2


async def test_power_down_and_what_stops_the_timer(bmc: Bmc):
    events = await watchdog_events(bmc.nc)
    await bmc.ok("power", "on")
    await wait_for(lambda: bmc.boots() == 1, timeout=60, message="the guest booting")
    # a running timer (10 minutes) stops when the machine resets, keeping its present countdown
    await bmc.ok("mc", "watchdog", "set", "timeout=600", "use=sms", "action=reset")
    await bmc.ok("mc", "watchdog", "reset")
    assert (await bmc.watchdog())["Watchdog Timer Is"] == "Started/Running"
    await bmc.ok("power", "reset")
    await wait_for(lambda: bmc.boots() == 2, timeout=60, message="the reset")
    status = await wait_for(lambda: stopped(bmc), message="the timer stopped by the reset")
    assert 0 < status.remaining <= 6000 and status.expiration_flags == 0
    # ... and when the machine is powered off
    await bmc.ok("mc", "watchdog", "reset")
    await bmc.ok("power", "off")
    assert not (await wait_for(lambda: stopped(bmc), message="the timer stopped by power off")).expiration_flags

    # power down on expiry: the machine goes off
    await bmc.ok("power", "on")
    await wait_for(lambda: bmc.boots() == 3, timeout=60, message="the guest booting again")
    await bmc.ok("mc", "watchdog", "set", "timeout=2", "use=osload", "action=poweroff")
    await bmc.ok("mc", "watchdog", "reset")
    await wait_for(lambda: power_is(bmc, "Off"), timeout=60, message="the watchdog powering the machine down")
    assert (await bmc.status()).expiration_flags == 1 << OS_LOAD
    records = await wait_for(lambda: watchdog_records(bmc.nc, 1), message="the power down SEL record")
    assert records == [bytes([POWER_DOWN, OS_LOAD])]

    # expiry of a machine that is off: nothing is done to it (the event says so), the flag is set
    assert await bmc.raw(*set_request(OEM, 5, action=3, clear=1 << OS_LOAD)) == (0, b"")  # power cycle
    await bmc.ok("mc", "watchdog", "reset")
    oem_events = await wait_for(lambda: [event for event in events if event.timer_use == OEM],
                                message="the expiry of the OEM timer")
    assert [(event.phase, event.action) for event in oem_events] == [("expired", "none")]
    assert (await bmc.status()).expiration_flags == 1 << OEM
    assert await bmc.power_state() == "Off" and bmc.boots() == 3
    records = await wait_for(lambda: watchdog_records(bmc.nc, 2), message="the status-only SEL record")
    assert records[1] == bytes([TIMER_EXPIRED, OEM])


async def test_messaging_pretimeout_dont_log_and_dont_stop(bmc: Bmc):
    """The machine is off all along: no action is involved."""
    # a messaging pre-timeout 255 s before expiry, 260 s: it comes 5 s after the start
    assert await bmc.raw(*set_request(OS_LOAD, 2600, pretimeout=3, interval=255)) == (0, b"")
    assert await bmc.raw(0x22) == (0, b"")
    assert await wait_for(lambda: message_flags(bmc, 0x08), message="the pre-timeout flag") == b"\x08"
    # Reset no longer restarts a countdown past its pre-timeout (§27.5); only Set can then
    assert await bmc.raw(0x22) == (0, b"")
    status = await bmc.status()
    assert status.running and status.remaining <= 2550 and status.pretimeout_occurred
    # Clear Message Flags bit 3 clears it
    assert await bmc.raw(0x30, 0x08) == (0, b"")
    assert await bmc.raw(0x31) == (0, b"\x00")
    # Set with "don't stop": the running timer goes on from the new countdown (109 minutes)
    assert await bmc.raw(*set_request(OS_LOAD, 0xFFFF, pretimeout=3, interval=255, dont_stop=True)) == (0, b"")
    status = await bmc.status()
    assert status.running and 2550 < status.remaining <= 0xFFFF and status.countdown == 0xFFFF
    # without "don't stop", Set stops it
    assert await bmc.raw(*set_request(OS_LOAD, 0xFFFF)) == (0, b"")
    status = await bmc.status()
    assert not status.running and status.remaining == 0xFFFF and status.expiration_flags == 0
    records = await wait_for(lambda: watchdog_records(bmc.nc, 1), message="the timer interrupt SEL record")
    assert records == [bytes([TIMER_INTERRUPT, 0x33])]  # messaging interrupt, OS load

    # "don't log": an expiry that leaves no SEL record; a logged one after it does
    assert await bmc.raw(*set_request(SMS_OS, 1, dont_log=True)) == (0, b"")
    assert await bmc.raw(0x22) == (0, b"")
    await wait_for(lambda: expired(bmc, SMS_OS), message="the SMS/OS timer expiring")
    await bmc.ok("mc", "watchdog", "set", "timeout=1", "use=oem")
    await bmc.ok("mc", "watchdog", "reset")
    await wait_for(lambda: expired(bmc, OEM), message="the OEM timer expiring")
    records = await wait_for(lambda: watchdog_records(bmc.nc, 2), message="the OEM expiry SEL record")
    assert records == [bytes([TIMER_INTERRUPT, 0x33]), bytes([TIMER_EXPIRED, OEM])]  # none for SMS/OS
    status = await bmc.status()
    assert status.expiration_flags == 1 << SMS_OS | 1 << OEM and not status.pretimeout_occurred


async def test_bad_requests_and_privileges(bmc: Bmc):
    good = set_request(SMS_OS, 6000, action=1, pretimeout=2, interval=10)
    cases = {
        0xC7: [good[:-1], [*good, 0], [0x22, 0], [0x25, 0]],
        0xCC: [set_request(0, 100), set_request(6, 100), [0x24, 0x0C, *good[2:]],  # timer use 0, 6; reserved bit
               [0x24, SMS_OS, 0x04, *good[3:]], [0x24, SMS_OS, 0x40, *good[3:]],  # action 4, interrupt 4
               [0x24, SMS_OS, 0x08, *good[3:]], [0x24, SMS_OS, 0x81, *good[3:]],  # reserved action bits
               set_request(SMS_OS, 100, clear=0x01), set_request(SMS_OS, 100, clear=0x40),  # reserved flags
               set_request(SMS_OS, 99, pretimeout=2, interval=10)],  # pre-timeout longer than the countdown
    }
    for completion, requests in cases.items():
        for request in requests:
            assert await bmc.raw(*request) == (completion, b""), (hex(completion), bytes(request).hex())
    assert not (await bmc.status()).timer_use  # nothing was set

    # Get is a User's; Set and Reset an Operator's
    assert (await bmc.watchdog())["Watchdog Timer Is"] == "Stopped"
    assert (await bmc.raw(0x25, privilege="USER"))[0] == 0
    assert await bmc.raw(*good, privilege="USER") == (0xD4, b"")
    assert await bmc.raw(0x22, privilege="USER") == (0xD4, b"")
    assert await bmc.raw(*good, privilege="OPERATOR") == (0, b"")
    assert await bmc.raw(0x22, privilege="OPERATOR") == (0, b"")
    timer = await bmc.watchdog()  # a valid client is served as ever
    assert timer["Watchdog Timer Is"] == "Started/Running" and timer["Initial Countdown"] == "600.0 sec", timer
    await bmc.ok("mc", "watchdog", "off")
    assert not (await bmc.status()).running


async def test_the_timer_dies_with_the_machine_service(nc, services, short_dir: Path, images: GuestImages):
    """The timer is the BMC's volatile state: a machine service that stops stops it, and the one
    that starts again has a timer never set, so nothing fires after a restart."""
    bmc = await start_bmc(nc, services, short_dir, images)  # QEMU outlives the machine service
    try:
        await bmc.ok("power", "on")
        await wait_for(lambda: bmc.boots() == 1, timeout=60, message="the guest booting")
        await bmc.ok("mc", "watchdog", "set", "timeout=600", "use=sms", "action=poweroff")
        await bmc.ok("mc", "watchdog", "reset")
        assert (await bmc.status()).running
        assert await bmc.machine_service.stop(signal.SIGTERM) == 0
        await bmc.machine_service.start(nc, "qemu-bmc-machine")
        await wait_for(lambda: power_is(bmc, "On"), message="the machine service adopting the running QEMU")
        status = await bmc.status()
        assert not status.running and status.timer_use == 0
        assert await bmc.raw(0x22) == (0x80, b"")
    finally:
        await bmc.ok("power", "off")


# The guest tells its two boots apart by the expiration flags Get Watchdog Timer reports (byte 4):
# none at the first boot, which arms the watchdog (SMS/OS, hard reset, 30 s) and stops resetting
# it; SMS/OS (10h) at the second, which the watchdog's reset started: it clears them and is done.
IN_BAND = """\
flags=$(ipmitool raw 0x06 0x25 | awk '{print $4}')
echo "WATCHDOG-FLAGS $flags"
case "$flags" in
00)
    bmc-watchdog --set --timer-use=4 --timeout-action=1 --pre-timeout-interrupt=0 --initial-countdown=30
    echo "set rc=$?"
    echo "== ipmitool"; ipmitool mc watchdog get
    echo "== bmc-watchdog"; bmc-watchdog --get
    bmc-watchdog --start; echo "start rc=$?"
    bmc-watchdog --reset; echo "reset rc=$?"
    echo WATCHDOG-ARMED
    sleep 600
    echo WATCHDOG-NEVER-FIRED ;;
10)
    echo "== after the reset"; ipmitool mc watchdog get
    bmc-watchdog --set --clear-sms-os; echo "clear rc=$?"
    echo "WATCHDOG-FLAGS-CLEARED $(ipmitool raw 0x06 0x25 | awk '{print $4}')" ;;
*)
    exit 1 ;;
esac
"""


async def test_in_band_watchdog_resets_the_guest(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    wire = free_tcp_port()
    argv = linux_guest.qemu_args(linux_guest.initrd(IN_BAND, short_dir))
    config = write_config(short_dir, f'[vm.n1]\ncmd = {toml_list(argv)}\nvmwire = "127.0.0.1:{wire}"\n')
    await services("state", config)
    await services("vmwire", config)
    await services("machine", config, "--stop-vms-on-exit")
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: DONE in serial_log(short_dir, "n1"), timeout=400, interval=0.5,
                   message="the guest armed the watchdog, was reset by it, and finished")
    out = serial_log(short_dir, "n1")
    first, second = out.split("WATCHDOG-ARMED")
    assert READY in first and "WATCHDOG-FLAGS 00" in first, out
    assert all(f"{step} rc=0" in first for step in ("set", "start", "reset")), first
    ipmitool_get, bmc_watchdog_get = first.split("== ipmitool")[1].split("== bmc-watchdog")
    assert re.search(r"Watchdog Timer Use:\s+SMS/OS", ipmitool_get), ipmitool_get
    assert re.search(r"Watchdog Timer Action:\s+Hard Reset", ipmitool_get), ipmitool_get
    assert re.search(r"Initial Countdown:\s+30\.0 sec", ipmitool_get), ipmitool_get
    assert re.search(r"Timer Use:\s+SMS/OS", bmc_watchdog_get), bmc_watchdog_get
    assert re.search(r"Timeout Action:\s+Hard Reset", bmc_watchdog_get), bmc_watchdog_get
    assert re.search(r"Initial Countdown:\s+30 seconds", bmc_watchdog_get), bmc_watchdog_get
    # the second boot: its script saw the SMS/OS expiration flag, cleared it and finished
    assert "WATCHDOG-NEVER-FIRED" not in second and READY in second, second
    assert "WATCHDOG-FLAGS 10" in second and "clear rc=0" in second, second
    assert "WATCHDOG-FLAGS-CLEARED 00" in second and f"{DONE} rc=0" in second, second
    after_reset = second.split("== after the reset")[1]
    assert re.search(r"Watchdog Timer Is:\s+Stopped", after_reset) and "* SMS/OS" in after_reset, second
    # the SEL: the hard reset on SMS/OS expiry, no interrupt
    records = await wait_for(lambda: watchdog_records(nc, 1), message="the watchdog SEL record")
    assert records == [bytes([HARD_RESET, SMS_OS])]


async def watchdog_records(nc, count: int) -> list[bytes] | None:
    """Event data 1 and 2 of each Watchdog 2 record in the SEL, in order, once there are ``count``."""
    log = await bus.request(nc, "n1", subjects.SEL_GET, None, SelLog)
    records = [entry.data[6:8] for entry in log.entries if entry.data[3:6] == WATCHDOG_RECORD]
    return records if len(records) >= count else None


async def watchdog_events(nc) -> list[WatchdogEvent]:
    events: list[WatchdogEvent] = []

    async def received(message) -> None:
        events.append(bus.decode(message.data, WatchdogEvent))

    await nc.subscribe(subjects.for_machine("n1", subjects.EVENT_WATCHDOG), cb=received)
    await nc.flush()
    return events


async def stopped(bmc: Bmc) -> WatchdogStatus | None:
    status = await bmc.status()
    return None if status.running else status


async def expired(bmc: Bmc, timer_use: int) -> bool:
    return bool((await bmc.status()).expiration_flags & 1 << timer_use)


async def message_flags(bmc: Bmc, flags: int) -> bytes | None:
    """Get Message Flags' answer when it is ``flags``."""
    completion, data = await bmc.raw(0x31)
    return data if completion == 0 and data == bytes([flags]) else None


async def power_is(bmc: Bmc, state: str) -> bool:
    return await bmc.power_state() == state
