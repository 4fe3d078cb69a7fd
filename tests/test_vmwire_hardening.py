"""The VM wire that nobody can steal (issue 13): a managed machine's in-band link is a unix socket
of its runtime directory, owned by the machine service and carried over the bus (no TCP port);
an attached machine's TCP address takes one QEMU at a time and never lets another displace it;
a VM-wire service restart loses no request; an address that cannot be bound is reported.
Real QEMU, a real Linux guest running FreeIPMI and ipmitool in-band, real services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import free_tcp_port, serial_log, toml_list, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from linux_guest import DONE, READY, LinuxGuest
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared import vmwire as framing
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.discovery import metadata, service_infos
from qemu_bmc_shared.messages import (
    PowerRequest,
    PowerStatus,
    SelLog,
    VmWireAnswer,
    VmWireFrame,
    VmWireGreeting,
)
from test_vmwire import Qemu, attached_machine, connect_when_free, request
from test_vmwire_guest import PASSWORD, USER

CHECKOUT = """\
echo "== mc info"; ipmitool mc info; echo "mc rc=$?"
bmc-config --checkout > /tmp/checkout.txt 2>&1; echo "checkout rc=$? sections=$(grep -c '^Section' /tmp/checkout.txt)"
"""


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets process ``pid`` listens on (local addresses from /proc/net/tcp*, hex)."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(descriptor)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def connect_as_nobody(path: Path) -> str:
    """What another user gets connecting to ``path`` (a unix socket): the error's name, or "connected"."""
    probe = ("import socket, sys\ntry:\n    socket.socket(socket.AF_UNIX).connect(sys.argv[1])\n"
             "    print('connected')\nexcept OSError as error:\n    print(type(error).__name__)\n")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                             "-c", probe, str(path)], capture_output=True, text=True, timeout=30)
    return (result.stdout + result.stderr).strip()


async def vmwire_metadata(nc) -> dict[str, str]:
    infos = await service_infos(nc, "qemu-bmc-vmwire")
    return {key: value for info in infos for key, value in metadata(info).items()}


async def managed_in_band(services, directory: Path, guest: LinuxGuest, script: str) -> tuple[dict, int]:
    """A managed machine with ``vmwire = "127.0.0.1:PORT"`` (in-band IPMI on, over the bus),
    its services each in its own process as `qemu-bmc up` runs them; the old address's port."""
    wire = free_tcp_port()
    argv = guest.qemu_args(guest.initrd(script, directory))
    config = write_config(directory, f'[vm.n1]\ncmd = {toml_list(argv)}\nvmwire = "127.0.0.1:{wire}"\n')
    started = {"state": await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD}),
               "vmwire": await services("vmwire", config),
               "machine": await services("machine", config, "--stop-vms-on-exit")}
    return started, wire


async def test_managed_in_band_goes_over_the_bus_only(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    started, wire = await managed_in_band(services, short_dir, linux_guest, CHECKOUT)
    status = await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: DONE in serial_log(short_dir, "n1"), timeout=300, interval=0.5,
                   message="the guest's in-band checkout")
    out = serial_log(short_dir, "n1")
    assert READY in out and "mc rc=0" in out and "IPMI Version              : 2.0" in out, out
    checkout = re.search(r"checkout rc=([01]) sections=(\d+)", out)
    assert checkout and int(checkout.group(2)) >= 10, out
    assert "in-band IPMI link to QEMU connected" in (short_dir / "machine.log").read_text()
    assert (await vmwire_metadata(nc))["vmwire.n1"] == "bus"

    # QEMU (still there: -no-shutdown) and the VM-wire service listen on no TCP port, and the
    # machine's old address takes no connection
    assert status.pid is not None
    assert tcp_listeners(status.pid) == [] and tcp_listeners(started["vmwire"].process.pid) == []
    assert refused(wire)
    # its socket is in its runtime directory, which only its owner can enter
    runtime = short_dir / "rt" / "vm" / "n1"
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_ISSOCK((runtime / "ipmi.sock").stat().st_mode)
    assert connect_as_nobody(runtime / "ipmi.sock") == "PermissionError"


RESTART = """\
echo "INBAND-BEGIN"
i=0
while [ $i -lt 60 ]; do
  ipmitool raw 0x06 0x01 > /dev/null 2>&1; echo "INBAND $i rc=$?"
  i=$((i + 1))
done
echo "INBAND-END"
"""


async def test_vmwire_restart_loses_no_request(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    """The guest asks all the time; the VM-wire service is killed while a request is on its way,
    and started again: that request is answered (the machine service tries it again), and so
    is every other."""
    started, _ = await managed_in_band(services, short_dir, linux_guest, RESTART)
    await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    await wait_for(lambda: "INBAND 3 rc=0" in serial_log(short_dir, "n1"), timeout=300, interval=0.2,
                   message="the guest asking in-band")
    machine_log = short_dir / "machine.log"
    await started["vmwire"].stop(signal.SIGKILL)
    await wait_for(lambda: "not answered" in machine_log.read_text(), timeout=30, interval=0.02,
                   message="a request of the guest waiting for the VM-wire service")
    await started["vmwire"].start(nc, "qemu-bmc-vmwire")
    await wait_for(lambda: "INBAND-END" in serial_log(short_dir, "n1"), timeout=300, interval=0.5,
                   message="the guest's requests")
    out = serial_log(short_dir, "n1")
    results = re.findall(r"INBAND (\d+) rc=(\d+)", out)
    assert len(results) == 60 and {rc for _, rc in results} == {"0"}, out
    log = machine_log.read_text()
    assert re.search(r"in-band vmwire.frame answered at try \d+", log), log
    assert "not answered in" not in log, log  # nothing given up


async def test_attached_link_is_not_stolen(nc, services, short_dir: Path, linux_guest: LinuxGuest):
    """An attached machine's QEMU holds the VM wire; a second QEMU pointed at the same address
    (as a stale QEMU after a crashed launcher) and a plain TCP client keep connecting: they are
    refused, the guest's in-band checkouts succeed; once the first QEMU is gone, the second gets in."""
    wire = free_tcp_port()
    config = write_config(short_dir, attached_machine(short_dir, wire))
    await services("state", config, env={"IPMI_USER": USER, "IPMI_PASS": PASSWORD})
    vmwire = await services("vmwire", config)
    script = "sleep 5\n" + CHECKOUT + CHECKOUT.replace("checkout rc", "second checkout rc")
    ipmi_device = ["-chardev", f"socket,id=ipmi0,host=127.0.0.1,port={wire},reconnect=1",
                   "-device", "ipmi-bmc-extern,id=bmc0,chardev=ipmi0", "-device", "isa-ipmi-kcs,bmc=bmc0"]
    serial = short_dir / "guest-serial.log"
    guest = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", *linux_guest.qemu_args(linux_guest.initrd(script, short_dir)), "-no-reboot",
        "-serial", f"file:{serial}", *ipmi_device, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    intruder = None
    try:
        await wait_for(lambda: "QEMU connected to the VM wire" in vmwire.log.read_text(), timeout=60,
                       message="the guest's QEMU on the VM wire")
        intruder = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
            "-S", *ipmi_device, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        stop = asyncio.Event()
        clients = [asyncio.create_task(plain_client(wire, stop)) for _ in range(2)]
        try:
            await wait_for(lambda: "second checkout rc=" in read(serial), timeout=300, interval=0.5,
                           message="the guest's checkouts")
        finally:
            stop.set()
        attempts = await asyncio.gather(*clients)
        out = read(serial)
        assert READY in out and "mc rc=0" in out, out
        for label in ("checkout", "second checkout"):
            checkout = re.search(rf"\n{label} rc=([01]) sections=(\d+)", out)
            assert checkout and int(checkout.group(2)) >= 10, out
        log = vmwire.log.read_text()
        # nobody displaced the guest's QEMU while it ran (it has powered off since, maybe)
        assert log.split("QEMU disconnected")[0].count("QEMU connected to the VM wire") == 1, log
        assert re.search(r"n1: VM wire 127\.0\.0\.1:\d+: refused a connection from \('127\.0\.0\.1', \d+\): "
                         r"QEMU at \('127\.0\.0\.1', \d+\) holds the link", log), log
        assert all(connected > 0 and closed == connected for connected, closed in attempts), attempts
        assert intruder.returncode is None  # the second QEMU is still there, retrying
        # the guest powers off, its QEMU exits: the second QEMU gets the wire on its next try
        await asyncio.wait_for(guest.wait(), 120)
        await wait_for(lambda: vmwire.log.read_text().count("QEMU connected to the VM wire") == 2, timeout=30,
                       message="the second QEMU on the wire once the first is gone")
    finally:
        for process in (guest, intruder):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def plain_client(port: int, stop: asyncio.Event) -> tuple[int, int]:
    """Connect, send junk and a request, until ``stop``: how many times it connected, and how
    many of those connections the BMC closed without a byte."""
    connected = closed = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            continue
        connected += 1
        try:
            writer.write(b"GET / HTTP/1.0\r\n\r\n" + request(1, 0x06, 0x01))
            closed += await asyncio.wait_for(reader.read(100), 10) == b""
        except ConnectionError:
            closed += 1
        writer.close()
        await asyncio.sleep(0.1)
    return connected, closed


async def test_one_connection_at_a_time(nc, services, short_dir: Path):
    """At the protocol level: a second connection while one is live is closed at once, never
    displacing it; a client that never says it is QEMU holds nothing; the live one gone, a new one gets in."""
    wire = free_tcp_port()
    config = write_config(short_dir, attached_machine(short_dir, wire))
    await services("state", config)
    vmwire = await services("vmwire", config)
    silent = await asyncio.open_connection("127.0.0.1", wire)  # says nothing: keeps nobody out
    first = await connect_when_free(wire)
    for _ in range(2):  # no attention, interrupt
        await first.frame()
    second = await Qemu.connect(wire)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(second.reader.read(100), 10) == b""
    assert (await first.call(1, 0x06, 0x01))[0] == 0  # the live one is still served
    log = vmwire.log.read_text()
    assert f"refused a connection from ('127.0.0.1', {second.writer.get_extra_info('sockname')[1]})" in log, log
    first.writer.close()
    third = await connect_when_free(wire)
    for _ in range(2):  # no attention, interrupt
        await third.frame()
    assert (await third.call(2, 0x06, 0x01))[0] == 0
    silent[1].close()


async def test_bind_failure_is_reported(nc, services, short_dir: Path):
    """An attached machine's address that is taken: an ERROR with the address and the reason, and
    ``unserved.vmwire.<machine>`` in the service's metadata; its other machine is served (and a
    non-loopback address is warned about); the address free again, it is served."""
    taken, other = free_tcp_port(), free_tcp_port()
    holder = socket.create_server(("127.0.0.1", taken))
    config = write_config(short_dir, attached_machine(short_dir, taken)
                          + attached_machine(short_dir, other, "n2").replace("127.0.0.1:", "0.0.0.0:"))
    vmwire = await services("vmwire", config)
    try:
        problem = f"127.0.0.1:{taken}: address in use (held by pid {os.getpid()})"
        assert re.search(rf"ERROR n1: VM wire {re.escape(problem)}", vmwire.log.read_text())
        announced = await vmwire_metadata(nc)
        assert announced["unserved.vmwire.n1"] == problem and "vmwire.n1" not in announced, announced
        assert announced["vmwire.n2"] == f"0.0.0.0:{other}", announced
        assert re.search(rf"WARNING .*n2: VM wire 0\.0\.0\.0:{other} takes connections from other hosts",
                         vmwire.log.read_text())
        qemu = await connect_when_free(other)
        for _ in range(2):  # no attention, interrupt
            await qemu.frame()
        assert (await qemu.call(1, 0x06, 0x01))[0] == 0
        qemu.writer.close()
    finally:
        holder.close()

    async def served() -> bool:
        announced = await vmwire_metadata(nc)
        return announced.get("vmwire.n1") == f"127.0.0.1:{taken}" and "unserved.vmwire.n1" not in announced

    await wait_for(served, timeout=30, interval=0.5, message="n1's VM wire served once its address is free")
    qemu = await connect_when_free(taken)
    for _ in range(2):  # no attention, interrupt
        await qemu.frame()
    assert (await qemu.call(1, 0x06, 0x01))[0] == 0


@pytest.fixture
async def bus_machine(nc, services, short_dir: Path) -> None:
    config = write_config(short_dir, '[vm.n1]\ncmd = ["-m", "64"]\nvmwire = true\n')
    await services("state", config)
    await services("vmwire", config)


async def frame(nc, number: int, data: bytes, link: str = "test", enables: int = 0x08) -> VmWireAnswer:
    return await bus.request(nc, "n1", subjects.VMWIRE_FRAME,
                             VmWireFrame(link=link, number=number, frame=data, enables=enables), VmWireAnswer)


async def test_bus_frames(nc, bus_machine):
    """The bus side of a managed machine's link: greeting, a request, the enables the link keeps,
    a frame tried again that does not run twice, malformed frames."""
    greeting = await bus.request(nc, "n1", subjects.VMWIRE_GREETING, VmWireGreeting(enables=0x09), VmWireAnswer)
    assert greeting.data == bytes([0xFF, 0x01, 0xA1, 0x00, 0xA1, 0x05, 0xA1])  # version, no attention, irq on
    answer = await frame(nc, 1, request(1, 0x06, 0x01))
    assert answer.data[3] == 0 and answer.data[-1] == framing.MESSAGE_END and answer.enables == 0x08
    # Set BMC Global Enables: the new enables come back to the link, with the interrupt control
    answer = await frame(nc, 2, request(2, 0x06, 0x2E, b"\x09"))
    assert answer.enables == 0x09 and answer.data.endswith(bytes([0x05, 0xA1])), answer
    # Get BMC Global Enables answers the link's, whatever this process saw
    answer = await frame(nc, 3, request(3, 0x06, 0x2F), enables=0x0D)
    assert answer.data[3:5] == bytes([0x00, 0x0D]), answer.data.hex()

    # Add SEL Entry sent twice as one frame (a retry), then once more as a new frame: two records
    before = len((await bus.request(nc, "n1", subjects.SEL_GET, None, SelLog)).entries)
    record = request(4, 0x0A, 0x44, bytes([0, 0, 0x02]) + bytes(13))
    first, again = await asyncio.gather(frame(nc, 4, record), frame(nc, 4, record))
    assert first == again and first.data[3] == 0
    assert (await frame(nc, 5, record)).data[3] == 0
    assert len((await bus.request(nc, "n1", subjects.SEL_GET, None, SelLog)).entries) == before + 2

    # malformed: answered with nothing (QEMU answers the guest 0xC3); too long: refused
    assert (await frame(nc, 6, b"\x01\x18\x01\x00\xa0")).data == b""  # bad checksum
    assert (await frame(nc, 7, request(7, 0x06, 0x01) + request(8, 0x06, 0x01))).data == b""  # two frames
    with pytest.raises(BusError) as refused_frame:
        await frame(nc, 9, bytes(framing.MAX_WIRE_FRAME + 1))
    assert refused_frame.value.error == "bad_request"
    raw = await nc.request(subjects.for_machine("n1", subjects.VMWIRE_FRAME), b'{"link": 1}', timeout=5)
    assert raw.headers and raw.headers.get("Nats-Service-Error-Code") == "400"


async def test_fuzzed_bus_frames(nc, bus_machine):
    """Any bytes as a frame over the bus: an answer (a response or nothing), and the service lives on."""
    loop = asyncio.get_running_loop()

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=framing.MAX_WIRE_FRAME) | st.sampled_from([request(1, 0x06, 0x01), b"\xa0", b"\xaa\xa0"]),
           st.integers(min_value=0, max_value=255))
    def fuzz(data: bytes, enables: int) -> None:
        answer = asyncio.run_coroutine_threadsafe(frame(nc, fuzz.number, data, link="fuzz", enables=enables),
                                                  loop).result(10)
        fuzz.number += 1
        assert answer.data == b"" or answer.data.endswith(bytes([framing.MESSAGE_END])) or \
            answer.data.endswith(bytes([framing.COMMAND_END])), answer

    fuzz.number = 0
    await loop.run_in_executor(None, fuzz)
    assert (await frame(nc, 10**6, request(1, 0x06, 0x01))).data[3] == 0
