"""IPMI storage commands (FRU, SDR repository, SEL; IPMI v2.0 §31-§34) and the sensor commands (§35).

Nothing is kept here: the FRU image is built from the machine's inventory on every request, sensor
readings from its power state, and the SEL is the state service's. The SDR repository is fixed:
the BMC's management controller locator, two discrete sensors that can be read (the power unit and
the ACPI power state) and two event-only sensors the SEL feed of the state service logs events for.

Reservations (§31.4, §33.11) cannot be held by a stateless command layer shared by several
processes, so they are derived: the SDR repository never changes and has one constant reservation;
the SEL reservation comes from the time of the last erase, so a Clear SEL cancels it.

A SEL record is 16 bytes: record id, type, then for timestamped types (02h, C0h-DFh) the timestamp
and 9 bytes (for a system event: generator id, EvM revision, sensor type, sensor number, event
dir/type, event data 1-3) and for the non-timestamped OEM types (E0h-FFh) 13 bytes; the state
service keeps them as they are (see messages.SelEntry).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import subjects
from ..manager_settings import bmc_time
from ..messages import (
    Empty,
    Inventory,
    ManagerSettings,
    ManagerSettingsUpdate,
    PowerStatus,
    SelAdd,
    SelEntry,
    SelLog,
    sel_timestamped,
)
from .core import Completion, Context, IpmiError, NetFn, Privilege, expect_length, registry

BMC_ADDRESS = 0x20
"""The BMC's IPMB slave address: sensor owner, event generator id (§5.5)."""
EVM_REVISION = 0x04  # IPMI v1.5/v2.0 event messages (§29.7)
RECORD_VERSION = 0x51  # SDR and SEL format version (§31.2, §33.9)
SENSOR_SPECIFIC = 0x6F  # event/reading type code: sensor-specific discrete (§42.1, table 42-1)
DEASSERTION = 0x80  # event dir bit of the event dir/type byte (§29.7)
FIRST, LAST = 0x0000, 0xFFFF
UNSPECIFIED_TIME = 0xFFFFFFFF
SEL_RECORD_SIZE = 16
SDR_RESERVATION = 0x0001
MAX_FRU_READ = 128
"""Bytes per Read FRU Data answer: fits every transport; readers continue from the count returned."""

# Sensor types (table 42-3) and the offsets used.
POWER_UNIT, SYSTEM_EVENT, SYSTEM_BOOT, OS_STOP, ACPI_POWER_STATE, WATCHDOG_2 = 0x09, 0x12, 0x1D, 0x20, 0x22, 0x23
POWER_OFF = 0x00  # Power Unit: "Power Off / Power Down"
OEM_SYSTEM_BOOT = 0x01  # System Event: "OEM System Boot Event"
HARD_RESET = 0x01  # System Boot / Restart Initiated: "Initiated by hard reset"
AGENT_NOT_RESPONDING = 0x05  # OS Stop / Shutdown: "graceful shutdown request to agent via BMC did not occur"
S0_WORKING, S5_SOFT_OFF = 0x00, 0x05  # System ACPI Power State: "S0/G0 working", "S5/G2 soft-off"
# Watchdog 2: timer expired (status only), hard reset, power down, power cycle, timer interrupt
WATCHDOG_EXPIRED, WATCHDOG_RESET, WATCHDOG_POWER_DOWN, WATCHDOG_POWER_CYCLE, WATCHDOG_INTERRUPT = 0, 1, 2, 3, 8

# Sensor numbers.
POWER_SENSOR, ACPI_SENSOR, RESTART_SENSOR, BOOT_SENSOR, WATCHDOG_SENSOR, OS_STOP_SENSOR = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Sensor:
    number: int
    name: str
    sensor_type: int
    entity: int
    """Entity id (table 43-13)."""
    events: int = 0
    """Offsets (bit mask) this sensor logs events for."""
    readings: dict[str, int] | None = None
    """The states asserted by machine power state; None: an event-only sensor."""


SENSORS = (
    Sensor(POWER_SENSOR, "System Power", POWER_UNIT, 0x13, events=1 << POWER_OFF,
           readings={"On": 0, "Off": 1 << POWER_OFF}),
    Sensor(ACPI_SENSOR, "ACPI State", ACPI_POWER_STATE, 0x17,
           readings={"On": 1 << S0_WORKING, "Off": 1 << S5_SOFT_OFF}),
    Sensor(RESTART_SENSOR, "System Restart", SYSTEM_BOOT, 0x17, events=1 << HARD_RESET),
    Sensor(BOOT_SENSOR, "Boot Override", SYSTEM_EVENT, 0x22, events=1 << OEM_SYSTEM_BOOT),
    Sensor(WATCHDOG_SENSOR, "Watchdog", WATCHDOG_2, 0x07,
           events=sum(1 << offset for offset in (WATCHDOG_EXPIRED, WATCHDOG_RESET, WATCHDOG_POWER_DOWN,
                                                 WATCHDOG_POWER_CYCLE, WATCHDOG_INTERRUPT))),
    Sensor(OS_STOP_SENSOR, "OS Shutdown", OS_STOP, 0x23, events=1 << AGENT_NOT_RESPONDING),
)
READABLE = {sensor.number: sensor for sensor in SENSORS if sensor.readings is not None}


def sel_event(sensor_type: int, sensor_number: int, offset: int, deassertion: bool = False,
              data2: int | None = None) -> bytes:
    """The 9 bytes after the timestamp of a system event record (§32.1) from the BMC for a
    sensor-specific offset, with event data 3 unspecified and event data 2 unspecified or
    ``data2``, a sensor-specific extension code (event data 1 bits 7:6 = 11b, §29.7 table 29-6)."""
    direction = SENSOR_SPECIFIC | (DEASSERTION if deassertion else 0)
    data1 = offset if data2 is None else 0xC0 | offset
    return bytes([BMC_ADDRESS, 0x00, EVM_REVISION, sensor_type, sensor_number, direction, data1,
                  0xFF if data2 is None else data2, 0xFF])


#: The OEM timestamped record (§32.2) the state service logs for a change of a user account.
USER_CHANGE_RECORD = 0xC0
#: Its manufacturer id: Get Device ID's (§20.1), 000000h "unspecified" (qemu-bmc has no IANA number).
MANUFACTURER_ID = 0x000000
#: What changed (the record's third OEM byte, a bit mask).
(USER_NAME_SET, USER_NAME_CLEARED, USER_ENABLED, USER_DISABLED, USER_PASSWORD_SET, USER_PASSWORD_CLEARED,
 USER_ACCESS) = (1 << bit for bit in range(7))
#: The OEM bytes that do not apply to a change.
NOT_APPLICABLE = 0xFF


def user_change_record(changes: int, slot: int, channel: int = NOT_APPLICABLE, privilege: int = NOT_APPLICABLE,
                       flags: int = NOT_APPLICABLE, payloads: int = NOT_APPLICABLE) -> bytes:
    """The 9 bytes after the timestamp of a USER_CHANGE_RECORD: the manufacturer id (3 bytes,
    least significant first), then six OEM bytes: for a change of channel access (USER_ACCESS)
    flags (bit 0 IPMI messaging, bit 1 link authentication, bit 2 callback only) and the payloads
    the user may activate (one bit per payload type, as Set User Payload Access), then what
    changed (USER_* bits), the user id, and for a change of channel access the channel and the
    user's privilege limit on it; NOT_APPLICABLE where a byte does not apply. The last four are
    the record's bytes 13-16, which Redfish shows as the LogEntry's MessageId."""
    return MANUFACTURER_ID.to_bytes(3, "little") + bytes([flags, payloads, changes, slot, channel, privilege])


def _le16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _le32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _ascii(text: str, limit: int) -> bytes:
    """An 8-bit ASCII type/length byte and the text (§43.15, FRU spec §13)."""
    raw = text.encode("ascii", "replace")[:limit]
    return bytes([0xC0 | len(raw)]) + raw


# ---------------------------------------------------------------- SDR repository

def _sdr(record_id: int, record_type: int, body: bytes) -> bytes:
    return _le16(record_id) + bytes([RECORD_VERSION, record_type, len(body)]) + body


def _sensor_record(record_id: int, sensor: Sensor) -> bytes:
    """A compact sensor record (table 43-2) or, for a sensor with no reading, an event-only one (43-3)."""
    key = bytes([BMC_ADDRESS, 0x00, sensor.number, sensor.entity, 0x01])
    if sensor.readings is None:
        return _sdr(record_id, 0x03, key + bytes([sensor.sensor_type, SENSOR_SPECIFIC, 0x01, 0, 0, 0])
                    + _ascii(sensor.name, 16))
    states = 0
    for bits in sensor.readings.values():
        states |= bits
    # initialisation: scanning (and events when it has some) enabled; capabilities: auto re-arm,
    # no hysteresis or thresholds, events "global disable only" or none
    init, capabilities = (0x63, 0x42) if sensor.events else (0x41, 0x43)
    body = (key + bytes([init, capabilities, sensor.sensor_type, SENSOR_SPECIFIC])
            + struct.pack("<HHH", sensor.events, sensor.events, states)
            + bytes([0xC0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0]) + _ascii(sensor.name, 16))
    return _sdr(record_id, 0x02, body)


def _mc_locator(record_id: int) -> bytes:
    """The management controller device locator record of the BMC (table 43-8): sensor, SDR
    repository, SEL and FRU inventory device; entity 'system management module'."""
    return _sdr(record_id, 0x12, bytes([BMC_ADDRESS, 0x00, 0x00, 0x0F, 0, 0, 0, 0x06, 0x01, 0])
                + _ascii("qemu-bmc", 16))


SDR_RECORDS = (_mc_locator(1), *(_sensor_record(index, sensor) for index, sensor in enumerate(SENSORS, 2)))


def _find(ids: list[int], record_id: int) -> int:
    """Index of a record: 0000h the first, FFFFh the last; 0xCB when absent (§31.5, §33.12)."""
    if ids and record_id in (FIRST, LAST):
        return 0 if record_id == FIRST else len(ids) - 1
    if record_id not in ids:
        raise IpmiError(Completion.NOT_PRESENT, f"no record {record_id:#06x}")
    return ids.index(record_id)


def _read_record(data: bytes, records: list[bytes], reservation: int) -> bytes:
    """Get SDR / Get SEL Entry: next record id and the requested part of a record. A partial read
    (non-zero offset) needs the current reservation."""
    expect_length(data, 6, 6)
    reserved, record_id, offset, count = struct.unpack("<HHBB", data)
    if offset and reserved != reservation:
        raise IpmiError(Completion.RESERVATION_CANCELLED, f"reservation {reserved:#06x} is not current")
    ids = [int.from_bytes(record[:2], "little") for record in records]
    index = _find(ids, record_id)
    record = records[index]
    if offset > len(record):
        raise IpmiError(Completion.PARAMETER_OUT_OF_RANGE, f"offset {offset} beyond the {len(record)}-byte record")
    following = ids[index + 1] if index + 1 < len(ids) else LAST
    return _le16(following) + record[offset:len(record) if count == 0xFF else offset + count]


@registry.command(NetFn.STORAGE, 0x20, Privilege.USER)
async def get_sdr_repository_info(context: Context, data: bytes) -> bytes:
    """Get SDR Repository Info (IPMI v2.0 §33.9): a read-only repository; reserve and allocation info supported."""
    return (bytes([RECORD_VERSION]) + _le16(len(SDR_RECORDS)) + _le16(0)
            + _le32(UNSPECIFIED_TIME) + _le32(UNSPECIFIED_TIME) + bytes([0x03]))


@registry.command(NetFn.STORAGE, 0x21, Privilege.USER)
async def get_sdr_repository_allocation_info(context: Context, data: bytes) -> bytes:
    """Get SDR Repository Allocation Info (IPMI v2.0 §33.10): one 64-byte unit per record, none free."""
    return struct.pack("<HHHHB", len(SDR_RECORDS), 64, 0, 0, 1)


@registry.command(NetFn.STORAGE, 0x22, Privilege.USER)
@registry.command(NetFn.SENSOR, 0x22, Privilege.USER)
async def reserve_sdr_repository(context: Context, data: bytes) -> bytes:
    """Reserve SDR Repository (IPMI v2.0 §33.11) and Reserve Device SDR Repository (§35.4)."""
    return _le16(SDR_RESERVATION)


@registry.command(NetFn.STORAGE, 0x23, Privilege.USER)
@registry.command(NetFn.SENSOR, 0x21, Privilege.USER)
async def get_sdr(context: Context, data: bytes) -> bytes:
    """Get SDR (IPMI v2.0 §33.12) and Get Device SDR (§35.3), from the same records."""
    return _read_record(data, list(SDR_RECORDS), SDR_RESERVATION)


@registry.command(NetFn.SENSOR, 0x20, Privilege.USER)
async def get_device_sdr_info(context: Context, data: bytes) -> bytes:
    """Get Device SDR Info (IPMI v2.0 §35.2): the sensor count, or the SDR count (operation bit 0); static, LUN 0."""
    expect_length(data, 0, 1)
    count = len(SDR_RECORDS) if data and data[0] & 0x01 else len(SENSORS)
    return bytes([count, 0x01])


# ---------------------------------------------------------------- sensors

@registry.command(NetFn.SENSOR, 0x2D, Privilege.USER)
async def get_sensor_reading(context: Context, data: bytes) -> bytes:
    """Get Sensor Reading (IPMI v2.0 §35.14): discrete states from the machine's power state."""
    expect_length(data, 1, 1)
    sensor = READABLE.get(data[0])
    if sensor is None or sensor.readings is None:
        raise IpmiError(Completion.NOT_PRESENT, f"no readable sensor {data[0]}")
    power = await context.call(subjects.POWER_GET, None, PowerStatus)
    # no numeric reading; scanning enabled (bit 6) and event messages (bit 7) if it has events;
    # then states 0-7 and states 8-14 (bit 7 reserved, returned as 1)
    flags = 0xC0 if sensor.events else 0x40
    return bytes([0x00, flags, sensor.readings[power.state], 0x80])


@registry.command(NetFn.SENSOR, 0x2F, Privilege.USER)
async def get_sensor_type(context: Context, data: bytes) -> bytes:
    """Get Sensor Type (IPMI v2.0 §35.16)."""
    expect_length(data, 1, 1)
    sensor = next((sensor for sensor in SENSORS if sensor.number == data[0]), None)
    if sensor is None:
        raise IpmiError(Completion.NOT_PRESENT, f"no sensor {data[0]}")
    return bytes([sensor.sensor_type, SENSOR_SPECIFIC])


# ---------------------------------------------------------------- FRU inventory

def _fru_area(fields: bytes, *head: int) -> bytes:
    """A FRU info area: version 1, length in 8-byte units, ``head``, the fields, end marker C1h,
    padding and the zero checksum (Platform Management FRU Information Storage Definition §10-§12)."""
    body = bytes(head) + fields + b"\xc1"
    size = (len(body) + 2 + 1 + 7) // 8 * 8
    area = bytes([0x01, size // 8]) + body + bytes(size - len(body) - 3)
    return area + bytes([-sum(area) & 0xFF])


def _field(text: str) -> bytes:
    """A text field; 'C1h' is the end marker, so a one-character text gets a trailing space."""
    return _ascii(text if len(text) != 1 else text + " ", 63)


def fru_image(inventory: Inventory) -> bytes:
    """The FRU inventory of the machine: common header, chassis, board and product info areas."""
    serial = _field(inventory.serial or inventory.uuid)
    maker, model = _field(inventory.manufacturer), _field(inventory.model)
    areas = [
        _fru_area(_field("") + serial, 0x01),  # chassis type 'Other' (SMBIOS), part number, serial
        _fru_area(maker + model + serial + _field("") + _field(""),
                  0x00, 0, 0, 0),  # language English, manufacturing date unspecified
        _fru_area(maker + model + _field("") + _field("qemu-bmc") + serial
                  + _field(inventory.machine) + _field(""), 0x00),
    ]
    offsets, position = [], 1
    for area in areas:
        offsets.append(position)
        position += len(area) // 8
    header = bytes([0x01, 0x00, *offsets, 0x00, 0x00])
    return header + bytes([-sum(header) & 0xFF]) + b"".join(areas)


def _fru_device(data: bytes) -> None:
    if data[0] != 0:
        raise IpmiError(Completion.NOT_PRESENT, f"no FRU device {data[0]}")


@registry.command(NetFn.STORAGE, 0x10, Privilege.USER)
async def get_fru_inventory_area_info(context: Context, data: bytes) -> bytes:
    """Get FRU Inventory Area Info (IPMI v2.0 §34.1): size in bytes, accessed by bytes."""
    expect_length(data, 1, 1)
    _fru_device(data)
    image = fru_image(await context.call(subjects.INVENTORY_GET, None, Inventory))
    return _le16(len(image)) + b"\x00"


@registry.command(NetFn.STORAGE, 0x11, Privilege.USER)
async def read_fru_data(context: Context, data: bytes) -> bytes:
    """Read FRU Data (IPMI v2.0 §34.2): at most to the end of the area and MAX_FRU_READ bytes."""
    expect_length(data, 4, 4)
    _fru_device(data)
    offset, count = int.from_bytes(data[1:3], "little"), data[3]
    image = fru_image(await context.call(subjects.INVENTORY_GET, None, Inventory))
    if offset > len(image):
        raise IpmiError(Completion.PARAMETER_OUT_OF_RANGE, f"offset {offset} beyond the {len(image)}-byte area")
    chunk = image[offset:offset + min(count, MAX_FRU_READ)]
    return bytes([len(chunk)]) + chunk


@registry.command(NetFn.STORAGE, 0x12, Privilege.OPERATOR)
async def write_fru_data(context: Context, data: bytes) -> bytes:
    """Write FRU Data (IPMI v2.0 §34.3): refused, the inventory comes from the machine (80h write-protected)."""
    expect_length(data, 3)
    _fru_device(data)
    raise IpmiError(0x80, "the FRU inventory is read-only")


# ---------------------------------------------------------------- system event log

def _sel_reservation(log: SelLog) -> int:
    """Nonzero, and changed by every Clear SEL (one a second)."""
    return log.last_erase % 0xFFFF + 1


def sel_record(entry: SelEntry) -> bytes:
    """The 16-byte SEL record of a stored entry (§31, §32)."""
    body = _le32(entry.timestamp) + entry.data if sel_timestamped(entry.record_type) else entry.data
    return _le16(entry.record_id) + bytes([entry.record_type]) + body


async def _sel(context: Context) -> SelLog:
    return await context.call(subjects.SEL_GET, None, SelLog)


def _timestamp(value: int) -> bytes:
    return _le32(value or UNSPECIFIED_TIME)


@registry.command(NetFn.STORAGE, 0x40, Privilege.USER)
async def get_sel_info(context: Context, data: bytes) -> bytes:
    """Get SEL Info (IPMI v2.0 §31.2): reserve and allocation info supported, overflow once the ring dropped records."""
    log = await _sel(context)
    free = min((log.capacity - len(log.entries)) * SEL_RECORD_SIZE, 0xFFFF)
    overflow = 0x80 if log.entries and log.entries[0].record_id != 1 else 0
    return (bytes([RECORD_VERSION]) + _le16(len(log.entries)) + _le16(free) + _timestamp(log.last_add)
            + _timestamp(log.last_erase) + bytes([overflow | 0x03]))


@registry.command(NetFn.STORAGE, 0x41, Privilege.USER)
async def get_sel_allocation_info(context: Context, data: bytes) -> bytes:
    """Get SEL Allocation Info (IPMI v2.0 §31.3): one 16-byte unit per record."""
    log = await _sel(context)
    free = log.capacity - len(log.entries)
    return struct.pack("<HHHHB", log.capacity, SEL_RECORD_SIZE, free, free, 1)


@registry.command(NetFn.STORAGE, 0x42, Privilege.USER)
async def reserve_sel(context: Context, data: bytes) -> bytes:
    """Reserve SEL (IPMI v2.0 §31.4)."""
    return _le16(_sel_reservation(await _sel(context)))


@registry.command(NetFn.STORAGE, 0x43, Privilege.USER)
async def get_sel_entry(context: Context, data: bytes) -> bytes:
    """Get SEL Entry (IPMI v2.0 §31.5)."""
    log = await _sel(context)
    return _read_record(data, [sel_record(entry) for entry in log.entries], _sel_reservation(log))


@registry.command(NetFn.STORAGE, 0x44, Privilege.OPERATOR)
async def add_sel_entry(context: Context, data: bytes) -> bytes:
    """Add SEL Entry (IPMI v2.0 §31.6): the record id is assigned, timestamped types get the SEL time."""
    expect_length(data, SEL_RECORD_SIZE, SEL_RECORD_SIZE)
    record_type = data[2]
    if record_type == 0x02 or 0xC0 <= record_type <= 0xDF:
        request = SelAdd(data=data[7:], record_type=record_type)
    elif record_type >= 0xE0:
        request = SelAdd(data=data[3:], record_type=record_type)
    else:
        raise IpmiError(Completion.INVALID_FIELD, f"record type {record_type:#04x} is reserved")
    entry = await context.call(subjects.SEL_ADD, request, SelEntry)
    return _le16(entry.record_id)


@registry.command(NetFn.STORAGE, 0x47, Privilege.OPERATOR)
async def clear_sel(context: Context, data: bytes) -> bytes:
    """Clear SEL (IPMI v2.0 §31.9): erasure is immediate, so the status is always 'completed'."""
    expect_length(data, 6, 6)
    if data[2:5] != b"CLR" or data[5] not in (0x00, 0xAA):
        raise IpmiError(Completion.INVALID_FIELD, "expected 'CLR' and AAh (initiate) or 00h (get status)")
    reservation = int.from_bytes(data[:2], "little")
    if reservation != _sel_reservation(await _sel(context)):
        raise IpmiError(Completion.RESERVATION_CANCELLED, f"reservation {reservation:#06x} is not current")
    if data[5] == 0xAA:
        await context.call(subjects.SEL_CLEAR, Empty(), SelLog)
    return b"\x01"


@registry.command(NetFn.STORAGE, 0x48, Privilege.USER)
async def get_sel_time(context: Context, data: bytes) -> bytes:
    """Get SEL Time (IPMI v2.0 §31.10): the BMC's clock, which stamps the SEL's records (the
    state service keeps its offset from the host's clock; Redfish's Manager DateTime is the same)."""
    return _le32(int(bmc_time(await context.call(subjects.MANAGER_GET, None, ManagerSettings))))


@registry.command(NetFn.STORAGE, 0x49, Privilege.OPERATOR)
async def set_sel_time(context: Context, data: bytes) -> bytes:
    """Set SEL Time (IPMI v2.0 §31.11): sets the BMC's clock (seconds since 1970; FFFFFFFFh,
    "unspecified", is refused)."""
    expect_length(data, 4, 4)
    seconds = int.from_bytes(data, "little")
    if seconds == UNSPECIFIED_TIME:
        raise IpmiError(Completion.INVALID_FIELD, "FFFFFFFFh is not a time")
    await context.call(subjects.MANAGER_SET, ManagerSettingsUpdate(clock=float(seconds)), ManagerSettings)
    return b""
