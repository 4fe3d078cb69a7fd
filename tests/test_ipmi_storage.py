"""IPMI storage and sensor commands (FRU, SDR, SEL, sensor readings) and the state service's SEL feed,
on a real nats-server with the real state and machine services and a real QEMU machine."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from conftest import no_exception_logged, serial_log, toml_list, wait_for, write_config
from guest_images import GuestImages
from pyghmi.ipmi.fru import FRU
from pyghmi.ipmi.private import constants as pyghmi_constants
from pyghmi.ipmi.sdr import SDREntry
from qemu_bmc_shared import bus, ipmi, subjects
from qemu_bmc_shared.ipmi import Context, NetFn, Privilege, Request, Response, registry
from qemu_bmc_shared.messages import BootOverride, BootOverrideUpdate, Inventory, PowerRequest, PowerStatus, SelLog

STORAGE, SENSOR = NetFn.STORAGE, NetFn.SENSOR


@pytest.fixture
async def machine(nc, services, short_dir: Path, images: GuestImages) -> Path:
    ipmi.load()
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n")
    await services("state", config)
    await services("machine", config, "--stop-vms-on-exit")
    return short_dir


async def call(nc, netfn: int, cmd: int, data: bytes | list[int] = b"",
               privilege: Privilege = Privilege.ADMINISTRATOR) -> Response:
    context = Context(machine="n1", nc=nc, channel=1, privilege=privilege)
    return await registry.dispatch(context, Request(netfn, cmd, bytes(data)))


async def ok(nc, netfn: int, cmd: int, data: bytes | list[int] = b"", **kw) -> bytes:
    response = await call(nc, netfn, cmd, data, **kw)
    assert response.completion == 0, f"{netfn:#x}/{cmd:#x}: completion {response.completion:#x}"
    return response.data


async def power(nc, action: str) -> PowerStatus:
    return await bus.request(nc, "n1", subjects.POWER_SET, PowerRequest(action=action), PowerStatus, timeout=60)


def zero_checksum(data: bytes) -> bool:
    return sum(data) % 256 == 0


async def test_fru_inventory_from_the_machine(nc, machine):
    inventory = await bus.request(nc, "n1", subjects.INVENTORY_GET, None, Inventory)
    info = await ok(nc, STORAGE, 0x10, [0])
    size = int.from_bytes(info[:2], "little")
    assert info[2] == 0x00 and size % 8 == 0  # accessed by bytes

    image = b""
    while len(image) < size:  # as ipmitool reads it: small chunks, continuing from the count returned
        answer = await ok(nc, STORAGE, 0x11, [0, *len(image).to_bytes(2, "little"), 24])
        assert answer[0] == len(answer) - 1 and 0 < answer[0] <= 24
        image += answer[1:]
    assert len(image) == size
    whole = await ok(nc, STORAGE, 0x11, [0, 0, 0, 255])
    assert 0 < whole[0] <= 255 and image.startswith(whole[1:])
    tail = await ok(nc, STORAGE, 0x11, [0, *(size - 3).to_bytes(2, "little"), 16])
    assert tail == b"\x03" + image[-3:]  # clamped to the end of the area

    # common header and every area: version 1, multiples of 8 bytes, zero checksums
    assert image[0] == 0x01 and zero_checksum(image[:8])
    for offset in image[2:5]:
        area = image[offset * 8:offset * 8 + image[offset * 8 + 1] * 8]
        assert area[0] == 0x01 and zero_checksum(area) and b"\xc1" in area
    fields = FRU(rawdata=image).info
    assert fields["Chassis type"] == "Other" and fields["Chassis serial number"] == inventory.uuid
    assert (fields["Board manufacturer"], fields["Board serial number"]) == ("QEMU", inventory.uuid)
    assert (fields["Manufacturer"], fields["Product name"], fields["Hardware Version"]) == (
        "QEMU", "QEMU virtual machine", "qemu-bmc")
    assert (fields["Serial Number"], fields["Asset Number"]) == (inventory.uuid, "n1")

    assert (await call(nc, STORAGE, 0x10, [1])).completion == 0xCB  # only FRU device 0
    assert (await call(nc, STORAGE, 0x11, [0, *(size + 1).to_bytes(2, "little"), 1])).completion == 0xC9
    assert (await call(nc, STORAGE, 0x11, [0, 0])).completion == 0xC7
    assert (await call(nc, STORAGE, 0x12, [0, 0, 0, 0x55])).completion == 0x80  # write-protected
    assert (await call(nc, STORAGE, 0x12, [0, 0, 0, 0x55], privilege=Privilege.USER)).completion == 0xD4


async def read_sdr(nc, netfn: int, cmd: int, reservation: bytes, record_id: int) -> tuple[int, bytes]:
    """One record, as ipmitool reads it: the 5-byte header, then the body in 16-byte chunks."""
    header = await ok(nc, netfn, cmd, reservation + struct.pack("<HBB", record_id, 0, 5))
    following, record = int.from_bytes(header[:2], "little"), header[2:]
    while len(record) < 5 + header[6]:
        count = min(16, 5 + header[6] - len(record))
        chunk = await ok(nc, netfn, cmd, reservation + struct.pack("<HBB", record_id, len(record), count))
        assert int.from_bytes(chunk[:2], "little") == following and len(chunk) == 2 + count
        record += chunk[2:]
    return following, record


async def test_sdr_repository_walk(nc, machine):
    info = await ok(nc, STORAGE, 0x20)
    assert info[0] == 0x51 and info[13] & 0x02  # SDR v1.5 format, Reserve SDR Repository supported
    count = int.from_bytes(info[1:3], "little")
    reservation = await ok(nc, STORAGE, 0x22)
    assert len(reservation) == 2 and reservation != b"\x00\x00"

    records, record_id = [], 0
    while record_id != 0xFFFF:
        record_id, record = await read_sdr(nc, STORAGE, 0x23, reservation, record_id)
        assert record[2] == 0x51 and len(record) == 5 + record[4]
        records.append(record)
    assert len(records) == count
    assert [record[3] for record in records] == [0x12, 0x02, 0x02, 0x03, 0x03, 0x03, 0x03]
    assert [int.from_bytes(record[:2], "little") for record in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[0][5] == 0x20 and records[0][16:].endswith(b"qemu-bmc") and records[0][15] == 0xC8
    sensors = [SDREntry(record, pyghmi_constants) for record in records[1:]]
    assert [(s.sensor_number, s.name, s.sensor_type) for s in sensors] == [
        (1, "System Power", "Power Unit"), (2, "ACPI State", "System ACPI Power State"),
        (3, "System Restart", "System Boot"), (4, "Boot Override", "System Event"), (5, "Watchdog", "Watchdog"),
        (6, "OS Shutdown", "OS Stop")]
    assert [s.readable for s in sensors] == [True, True, False, False, False, False]

    # the last record by FFFFh, a whole record by FFh; the device SDR commands answer the same
    last = await ok(nc, STORAGE, 0x23, struct.pack("<HHBB", 0, 0xFFFF, 0, 0xFF))
    assert last == b"\xff\xff" + records[-1]
    device_reservation = await ok(nc, SENSOR, 0x22)
    assert (await read_sdr(nc, SENSOR, 0x21, device_reservation, 2)) == (3, records[1])
    assert (await ok(nc, SENSOR, 0x20, [0x01]))[0] == count
    # a partial read needs the reservation; an unknown record is absent
    assert (await call(nc, STORAGE, 0x23, struct.pack("<HHBB", 0x1234, 2, 5, 4))).completion == 0xC5
    assert (await call(nc, STORAGE, 0x23, struct.pack("<HHBB", 0, 9, 0, 0xFF))).completion == 0xCB


def sel_records(log: SelLog) -> list[bytes]:
    """The event bytes (sensor type, number, dir/type, data 1) of every system event record."""
    return [entry.data[3:7] for entry in log.entries if entry.record_type == 0x02]


async def sel_walk(nc) -> list[bytes]:
    records, record_id = [], 0
    while record_id != 0xFFFF:
        answer = await ok(nc, STORAGE, 0x43, struct.pack("<HHBB", 0, record_id, 0, 0xFF))
        assert len(answer) == 2 + 16
        record_id = int.from_bytes(answer[:2], "little")
        records.append(answer[2:])
    return records


async def test_sensors_and_sel_follow_the_machine(nc, machine: Path):
    power_sensor, acpi_sensor = [SDREntry((await ok(nc, STORAGE, 0x23, struct.pack("<HHBB", 0, n, 0, 0xFF)))[2:],
                                          pyghmi_constants) for n in (2, 3)]

    async def states() -> tuple[list[str], list[str]]:
        readings = [await ok(nc, SENSOR, 0x2D, [number]) for number in (1, 2)]
        assert all(reading[1] & 0x40 and not reading[1] & 0x20 for reading in readings)  # scanning, available
        return (power_sensor.decode_sensor_reading(None, readings[0]).states,
                acpi_sensor.decode_sensor_reading(None, readings[1]).states)

    assert await states() == (["Power off"], ["Off"])
    assert (await call(nc, SENSOR, 0x2D, [3])).completion == 0xCB  # event-only
    assert await ok(nc, SENSOR, 0x2F, [3]) == b"\x1d\x6f"

    # bad and foreign events are ignored, and the feed goes on
    with no_exception_logged(machine / "state.log"):
        await nc.publish("bmc.n1.event.power", b"{not json")
        await nc.publish("bmc.other.event.power", b'{"machine": "other", "state": "On", "cause": "x", "timestamp": 1}')
        await nc.flush()

        await bus.request(nc, "n1", subjects.BOOT_SET, BootOverrideUpdate(target="Hdd", enabled="Once"),
                          BootOverride)
        await power(nc, "on")  # uses the one-time override
        assert await states() == ([], ["Online"])
        await wait_for(lambda: serial_log(machine, "n1").count("MARKER-HDD") == 1, message="boot")
        await power(nc, "reset")
        await wait_for(lambda: serial_log(machine, "n1").count("MARKER-HDD") == 2, message="second boot")
        await power(nc, "off")
        assert await states() == (["Power off"], ["Off"])
        log = await wait_for(lambda: _sel_with(nc, 4), message="four SEL records")
    on, override, reset, off = (bytes([0x09, 1, 0xEF, 0x00]), bytes([0x12, 4, 0x6F, 0x01]),
                                bytes([0x1D, 3, 0x6F, 0x01]), bytes([0x09, 1, 0x6F, 0x00]))
    # power on (a deassertion) and the override used by its boot (two subjects: either order),
    # one hard reset (not the firmware's own reset after it), power off
    expected = sel_records(log)
    assert sorted(expected[:2]) == sorted([on, override]) and expected[2:] == [reset, off]
    assert [entry.data[:3] for entry in log.entries] == [b"\x20\x00\x04"] * 4  # from the BMC, EvM rev 4

    # the records through Get SEL Entry: 16 bytes, the BMC's timestamps, walked to FFFFh
    info = await ok(nc, STORAGE, 0x40)
    assert info[0] == 0x51 and int.from_bytes(info[1:3], "little") == 4 and info[13] == 0x03
    assert int.from_bytes(info[3:5], "little") == (512 - 4) * 16
    records = await sel_walk(nc)
    assert [record[10:14] for record in records] == expected
    assert all(abs(int.from_bytes(record[3:7], "little") - time.time()) < 120 for record in records)
    assert [record[:3] for record in records] == [bytes([n, 0, 2]) for n in (1, 2, 3, 4)]

    # Add SEL Entry: a system event (timestamped by the BMC) and a non-timestamped OEM record
    event = bytes([0x41, 0x00, 0x04, 0x05, 0x07, 0x6F, 0x00, 0xFF, 0xFF])
    added = await ok(nc, STORAGE, 0x44, b"\x00\x00\x02" + bytes(4) + event)
    oem = bytes(range(0x30, 0x3D))
    added_oem = await ok(nc, STORAGE, 0x44, b"\x00\x00\xe5" + oem)
    assert (added, added_oem) == (b"\x05\x00", b"\x06\x00")
    record = (await ok(nc, STORAGE, 0x43, struct.pack("<HHBB", 0, 5, 0, 0xFF)))
    assert record[:2] == b"\x06\x00" and record[2:5] == b"\x05\x00\x02" and record[9:] == event
    assert int.from_bytes(record[5:9], "little") > 0
    assert await ok(nc, STORAGE, 0x43, struct.pack("<HHBB", 0, 0xFFFF, 0, 0xFF)) == b"\xff\xff\x06\x00\xe5" + oem
    assert (await call(nc, STORAGE, 0x44, bytes(16), privilege=Privilege.USER)).completion == 0xD4
    assert (await call(nc, STORAGE, 0x44, b"\x00\x00\x10" + bytes(13))).completion == 0xCC

    # partial reads need the reservation
    reservation = await ok(nc, STORAGE, 0x42)
    assert await ok(nc, STORAGE, 0x43, reservation + struct.pack("<HBB", 5, 9, 4)) == b"\x06\x00" + event[2:6]
    assert (await call(nc, STORAGE, 0x43, struct.pack("<HHBB", 0, 5, 9, 4))).completion == 0xC5
    assert (await call(nc, STORAGE, 0x43, struct.pack("<HHBB", 0, 77, 0, 0xFF))).completion == 0xCB

    # SEL time: the host's clock until it is set (then the BMC's clock is a day ahead of it)
    assert abs(int.from_bytes(await ok(nc, STORAGE, 0x48), "little") - time.time()) < 5
    assert await ok(nc, STORAGE, 0x49, int(time.time() + 86400).to_bytes(4, "little")) == b""
    assert abs(int.from_bytes(await ok(nc, STORAGE, 0x48), "little") - time.time() - 86400) < 60
    assert (await call(nc, STORAGE, 0x49, b"\xff" * 4)).completion == 0xCC  # "unspecified" is no time

    # Clear SEL: Operator, the current reservation, 'CLR'
    clear = reservation + b"CLR\xaa"
    assert (await call(nc, STORAGE, 0x47, clear, privilege=Privilege.USER)).completion == 0xD4
    assert (await call(nc, STORAGE, 0x47, b"\x99\x99CLR\xaa")).completion == 0xC5
    assert (await call(nc, STORAGE, 0x47, reservation + b"CLX\xaa")).completion == 0xCC
    assert await ok(nc, STORAGE, 0x47, clear, privilege=Privilege.OPERATOR) == b"\x01"
    info = await ok(nc, STORAGE, 0x40)
    assert int.from_bytes(info[1:3], "little") == 0 and int.from_bytes(info[10:14], "little") != 0xFFFFFFFF
    assert (await call(nc, STORAGE, 0x43, struct.pack("<HHBB", 0, 0, 0, 0xFF))).completion == 0xCB
    assert (await call(nc, STORAGE, 0x47, reservation + b"CLR\x00")).completion == 0xC5  # the clear cancelled it
    new_reservation = await ok(nc, STORAGE, 0x42)
    assert await ok(nc, STORAGE, 0x47, new_reservation + b"CLR\x00") == b"\x01"


async def _sel_with(nc, count: int) -> SelLog | None:
    log = await bus.request(nc, "n1", subjects.SEL_GET, None, SelLog)
    return log if len(log.entries) >= count else None
