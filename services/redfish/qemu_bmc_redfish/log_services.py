"""LogServices of each Manager and ComputerSystem: the machine's IPMI System Event Log (state service
``sel.get``/``sel.clear``, the same log IPMI's SEL commands serve) as Redfish LogEntries, with
ClearLog (Redfish LogService and LogEntry schemas; IPMI v2.0 §31-§32, §42).

Both LogServices are the one SEL. A LogEntry is one SEL record, its Id the record id:

* a system event record (type 02h): ``MessageId`` in the LogEntry schema's SEL form
  ``0xNNaabbcc`` (event dir/type, event data 1-3: record bytes 13-16), ``SensorType`` (table 42-3
  as the schema's strings), ``SensorNumber``, ``EntryCode`` (Assert/Deassert, the threshold
  crossed for a threshold event, table 42-2), ``GeneratorId``, and a ``Message`` decoded from the
  sensor type and offset (the BMC's own events, see qemu_bmc_shared.ipmi.storage, by name; others
  generically);
* an OEM record (C0h-FFh): ``MessageId`` its record bytes 13-16 too; the state service's user
  account change records (C0h of manufacturer 000000h, storage.user_change_record) are decoded,
  other OEM records shown as bytes.

Times are the BMC's clock in its local time offset (the Manager's DateTime and DateTimeLocalOffset).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from fastapi import FastAPI, Request, Response
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.ipmi import storage
from qemu_bmc_shared.manager_settings import bmc_time
from qemu_bmc_shared.messages import Empty, ManagerSettings, SelEntry, SelLog, sel_timestamped

from .errors import RedfishError
from .resources import ENABLED, Redfish, collection, etag_of, json_response, link
from .virtual_media import action_body

LOG_SERVICE_TYPE = "#LogService.v1_9_0.LogService"
LOG_ENTRY_TYPE = "#LogEntry.v1_21_0.LogEntry"
SEL = "SEL"
CLEAR_LOG = "#LogService.ClearLog"
#: Who may clear the log, by where the LogService is.
CLEAR_PRIVILEGE = {"Managers": "ConfigureManager", "Systems": "ConfigureComponents"}
#: IPMI sensor type codes 01h-2Ch (table 42-3) as LogEntry SensorType strings; C0h-FFh are "OEM".
SENSOR_TYPES = (
    "Temperature", "Voltage", "Current", "Fan", "Physical Chassis Security", "Platform Security Violation Attempt",
    "Processor", "Power Supply / Converter", "PowerUnit", "CoolingDevice", "Other Units-based Sensor", "Memory",
    "Drive Slot/Bay", "POST Memory Resize", "System Firmware Progress", "Event Logging Disabled", "Watchdog",
    "System Event", "Critical Interrupt", "Button/Switch", "Module/Board", "Microcontroller/Coprocessor",
    "Add-in Card", "Chassis", "ChipSet", "Other FRU", "Cable/Interconnect", "Terminator", "SystemBoot/Restart",
    "Boot Error", "BaseOSBoot/InstallationStatus", "OS Stop/Shutdown", "Slot/Connector", "System ACPI PowerState",
    "Watchdog", "Platform Alert", "Entity Presence", "Monitor ASIC/IC", "LAN", "Management Subsystem Health",
    "Battery", "Session Audit", "Version Change", "FRUState")
THRESHOLD = 0x01  # event/reading type code of threshold sensors (table 42-1)
#: Threshold event offsets 00h-0Bh (table 42-2) as LogEntry EntryCode strings.
THRESHOLD_CODES = tuple(f"{side} {level} - going {direction}" for side in ("Lower", "Upper")
                        for level in ("Non-critical", "Critical", "Non-recoverable") for direction in ("low", "high"))
#: The events the BMC logs: (sensor type, offset) → message when asserted, when deasserted, severity.
EVENTS: dict[tuple[int, int], tuple[str, str, str]] = {
    (storage.POWER_UNIT, storage.POWER_OFF): ("The machine was powered off.", "The machine was powered on.", "OK"),
    (storage.SYSTEM_BOOT, storage.HARD_RESET): ("The machine was reset (hard reset).",
                                                "Hard reset condition cleared.", "OK"),
    (storage.SYSTEM_EVENT, storage.OEM_SYSTEM_BOOT): ("The machine booted with its one-time boot override.",
                                                      "Boot override event cleared.", "OK"),
    (storage.OS_STOP, storage.AGENT_NOT_RESPONDING): (
        "The operating system did not shut down after the power button was pressed: graceful shutdown request "
        "to agent via BMC did not occur (agent not responding).", "OS agent responding again.", "Warning"),
    (storage.ACPI_POWER_STATE, storage.S0_WORKING): ("ACPI power state S0/G0 (working).", "Left ACPI S0/G0.", "OK"),
    (storage.ACPI_POWER_STATE, storage.S5_SOFT_OFF): ("ACPI power state S5/G2 soft-off.", "Left ACPI S5/G2.", "OK"),
    (storage.WATCHDOG_2, storage.WATCHDOG_EXPIRED): ("The watchdog timer expired (no action).",
                                                     "Watchdog expiry cleared.", "Warning"),
    (storage.WATCHDOG_2, storage.WATCHDOG_RESET): ("The watchdog timer expired and reset the machine.",
                                                   "Watchdog reset cleared.", "Warning"),
    (storage.WATCHDOG_2, storage.WATCHDOG_POWER_DOWN): ("The watchdog timer expired and powered the machine off.",
                                                        "Watchdog power down cleared.", "Warning"),
    (storage.WATCHDOG_2, storage.WATCHDOG_POWER_CYCLE): ("The watchdog timer expired and power cycled the machine.",
                                                         "Watchdog power cycle cleared.", "Warning"),
    (storage.WATCHDOG_2, storage.WATCHDOG_INTERRUPT): ("The watchdog timer reached its pre-timeout interrupt.",
                                                       "Watchdog pre-timeout cleared.", "Warning"),
}
#: Watchdog 2 event data 2, bits 3:0: the timer use at expiry (table 42-3).
TIMER_USES = {1: "BIOS FRB2", 2: "BIOS/POST", 3: "OS load", 4: "SMS/OS", 5: "OEM"}
#: IPMI privilege levels (§6.8) by number.
PRIVILEGES = {1: "Callback", 2: "User", 3: "Operator", 4: "Administrator", 5: "OEM", 15: "No access"}
USER_CHANGES = ((storage.USER_NAME_SET, "name set"), (storage.USER_NAME_CLEARED, "name cleared"),
                (storage.USER_ENABLED, "enabled"), (storage.USER_DISABLED, "disabled"),
                (storage.USER_PASSWORD_SET, "password set"), (storage.USER_PASSWORD_CLEARED, "password cleared"))
ACCESS_FLAGS = ((1, "IPMI messaging"), (2, "link authentication"), (4, "callback only"))
OFFSET = re.compile(r"^([-+])(\d\d):(\d\d)$")
MANUFACTURER = storage.MANUFACTURER_ID.to_bytes(3, "little")


def sensor_type_name(code: int) -> str | None:
    if 0xC0 <= code:
        return "OEM"
    return SENSOR_TYPES[code - 1] if 1 <= code <= len(SENSOR_TYPES) else None


def local_zone(settings: ManagerSettings) -> timezone:
    """The BMC's local time offset (``[+-]hh:mm``), UTC when it has none."""
    match = OFFSET.match(settings.local_offset)
    if not match:
        return UTC
    minutes = int(match[2]) * 60 + int(match[3])
    return timezone(timedelta(minutes=-minutes if match[1] == "-" else minutes))


def generic_event(what: str, event_type: int, offset: int, deasserted: bool) -> tuple[str, str, str]:
    """Message, severity and entry code of an event of ``what`` (a sensor) the BMC does not log itself."""
    state = "deasserted" if deasserted else "asserted"
    if event_type == THRESHOLD and offset < len(THRESHOLD_CODES):
        code = THRESHOLD_CODES[offset]
        severity = "OK" if deasserted else "Warning" if offset // 2 % 3 == 0 else "Critical"  # non-critical: Warning
        return f"{what}: {code} {state}.", severity, code
    return (f"{what}: event type {event_type:02X}h, offset {offset:02X}h {state}.", "OK",
            "Deassert" if deasserted else "Assert")


def system_event(data: bytes) -> dict[str, Any]:
    """The LogEntry properties of a system event record's 9 bytes (§32.1)."""
    generator, sensor_type, number, direction, data1, data2 = (int.from_bytes(data[:2], "little"), data[3], data[4],
                                                               data[5], data[6], data[7])
    event_type, deasserted, offset = direction & 0x7F, bool(direction & storage.DEASSERTION), data1 & 0x0F
    type_name = sensor_type_name(sensor_type)
    known = EVENTS.get((sensor_type, offset)) if event_type == storage.SENSOR_SPECIFIC else None
    if known is not None:
        message, severity, code = known[1 if deasserted else 0], known[2], "Deassert" if deasserted else "Assert"
        if sensor_type == storage.WATCHDOG_2 and data1 >> 6 == 0b11 and (data2 & 0x0F) in TIMER_USES:
            message = f"{message[:-1]} ({TIMER_USES[data2 & 0x0F]} timer)."
    else:
        sensor = next((sensor.name for sensor in storage.SENSORS
                       if sensor.number == number and generator == storage.BMC_ADDRESS), f"sensor {number}")
        message, severity, code = generic_event(f"{type_name or f'Sensor type {sensor_type:02X}h'} {sensor}",
                                                event_type, offset, deasserted)
    properties = {"Message": message, "Severity": severity, "SensorNumber": number, "EntryCode": code,
                  "GeneratorId": f"0x{generator:04X}"}
    if type_name is not None:
        properties["SensorType"] = type_name
    return properties


def user_change_message(oem: bytes) -> str:
    """The message of a user change record's six OEM bytes (storage.user_change_record)."""
    flags, _, changes, slot, channel, privilege = oem
    parts = [text for bit, text in USER_CHANGES if changes & bit]
    if changes & storage.USER_ACCESS:
        granted = [text for bit, text in ACCESS_FLAGS if flags & bit]
        parts.append(f"access on channel {channel}: {PRIVILEGES.get(privilege, f'privilege {privilege}')}"
                     + (f" with {', '.join(granted)}" if granted else ""))
    return f"User {slot}: {', '.join(parts) or 'changed'}."


def oem_record(entry: SelEntry) -> dict[str, Any]:
    """The LogEntry properties of an OEM record (§32.2, §32.3)."""
    if entry.record_type == storage.USER_CHANGE_RECORD and entry.data[:3] == MANUFACTURER:
        return {"Message": user_change_message(entry.data[3:]), "Severity": "OK"}
    if sel_timestamped(entry.record_type):
        text = (f"OEM record {entry.record_type:02X}h of manufacturer {int.from_bytes(entry.data[:3], 'little'):06X}h:"
                f" {entry.data[3:].hex(' ').upper()}.")
    else:
        text = f"OEM record {entry.record_type:02X}h: {entry.data.hex(' ').upper()}."
    return {"Message": text, "Severity": "OK"}


def log_entry(path: str, entry: SelEntry, zone: timezone) -> dict[str, Any]:
    """The LogEntry of a SEL record, in the Entries collection at ``path``."""
    record = storage.sel_record(entry)
    body: dict[str, Any] = {
        "@odata.id": f"{path}/{entry.record_id}", "@odata.type": LOG_ENTRY_TYPE, "Id": str(entry.record_id),
        "Name": f"SEL record {entry.record_id}", "EntryType": "SEL", "MessageId": f"0x{record[12:16].hex().upper()}",
        **(system_event(entry.data) if entry.record_type == 0x02 else oem_record(entry))}
    if sel_timestamped(entry.record_type) and entry.timestamp not in (0, storage.UNSPECIFIED_TIME):
        body["Created"] = datetime.fromtimestamp(entry.timestamp, zone).isoformat()
    return body


async def manager_settings(redfish: Redfish, machine: str) -> ManagerSettings:
    return await bus.request(redfish.nc, machine, subjects.MANAGER_GET, None, ManagerSettings)


async def sel_log(redfish: Redfish, machine: str) -> SelLog:
    return await bus.request(redfish.nc, machine, subjects.SEL_GET, None, SelLog)


async def entry_collection(redfish: Redfish, path: str, machine: str) -> dict[str, Any]:
    """The LogEntryCollection at ``path``, with the entries themselves as members (as rf_logs.py
    and other clients read them)."""
    log, zone = await sel_log(redfish, machine), local_zone(await manager_settings(redfish, machine))
    members = [log_entry(path, entry, zone) for entry in log.entries]
    return {**collection(path, "LogEntryCollection", "SEL entries", []), "Members@odata.count": len(members),
            "Members": members}


def register(app: FastAPI, redfish: Redfish) -> None:
    for container in ("Managers", "Systems"):
        register_container(app, redfish, container)


def register_container(app: FastAPI, redfish: Redfish, container: str) -> None:
    """The LogServices of every Manager or of every ComputerSystem (``container``)."""
    base = f"/redfish/v1/{container}/{{machine}}/LogServices"

    def services_path(machine: str) -> str:
        return f"/redfish/v1/{container}/{machine}/LogServices"

    def entries_path(machine: str) -> str:
        return f"{services_path(machine)}/{SEL}/Entries"

    @app.get(base)
    async def log_services(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        path = services_path(machine)
        return json_response(collection(path, "LogServiceCollection", "Log services", [f"{path}/{SEL}"]))

    @app.get(f"{base}/{SEL}")
    async def log_service(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        path = f"{services_path(machine)}/{SEL}"
        log, manager = await sel_log(redfish, machine), await manager_settings(redfish, machine)
        now = datetime.fromtimestamp(bmc_time(manager), local_zone(manager))
        return json_response({
            "@odata.id": path, "@odata.type": LOG_SERVICE_TYPE, "Id": SEL, "Name": "System Event Log",
            "Description": "The machine's IPMI System Event Log (the same records IPMI's SEL commands read)",
            "LogEntryType": "SEL", "OverWritePolicy": "WrapsWhenFull", "MaxNumberOfRecords": log.capacity,
            "ServiceEnabled": True, "Persistency": True,
            "Overflow": bool(log.entries) and log.entries[0].record_id != 1,  # the ring dropped records
            "DateTime": now.isoformat(timespec="seconds"), "DateTimeLocalOffset": manager.local_offset,
            "Status": ENABLED, "Entries": link(f"{path}/Entries"),
            "Actions": {CLEAR_LOG: {"target": f"{path}/Actions/LogService.ClearLog"}}})

    @app.get(f"{base}/{SEL}/Entries")
    async def log_entries(request: Request, machine: str) -> Response:
        await redfish.login(request, machine)
        return json_response(await entry_collection(redfish, entries_path(machine), machine))

    @app.get(f"{base}/{SEL}/Entries/{{entry_id}}")
    async def log_entry_of(request: Request, machine: str, entry_id: str) -> Response:
        await redfish.login(request, machine)
        log = await sel_log(redfish, machine)
        entry = next((entry for entry in log.entries if str(entry.record_id) == entry_id), None)
        if entry is None:
            raise RedfishError(404, "ResourceNotFound", "LogEntry", entry_id)
        return json_response(log_entry(entries_path(machine), entry,
                                       local_zone(await manager_settings(redfish, machine))))

    @app.post(f"{base}/{SEL}/Actions/LogService.ClearLog")
    async def clear_log(request: Request, machine: str) -> Response:
        """ClearLog: the SEL is erased (IPMI's too); with LogEntriesETag, only while it is the
        Entries collection's current ETag (else 428)."""
        await redfish.login(request, machine, CLEAR_PRIVILEGE[container])
        body = await action_body(request)
        for key in body:
            if key != "LogEntriesETag":
                raise RedfishError(400, "ActionParameterUnknown", CLEAR_LOG, key)
        if "LogEntriesETag" in body:
            expected = body["LogEntriesETag"]
            if not isinstance(expected, str):
                raise RedfishError(400, "ActionParameterValueTypeError", expected, "LogEntriesETag", CLEAR_LOG)
            if expected != etag_of(await entry_collection(redfish, entries_path(machine), machine)):
                raise RedfishError(428, "PreconditionFailed")
        await bus.request(redfish.nc, machine, subjects.SEL_CLEAR, Empty(), SelLog)
        return Response(status_code=204)
