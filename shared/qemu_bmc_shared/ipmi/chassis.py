"""Chassis commands (netfn 0x00): power control and status, identify, restore policy, restart
cause and the system boot options (IPMI v2.0 §28)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .. import subjects
from ..messages import (
    BootOverride,
    BootOverrideUpdate,
    BootTarget,
    ChassisConfig,
    ChassisUpdate,
    Inventory,
    PowerAction,
    PowerQuery,
    PowerRequest,
    PowerStatus,
)
from .core import Completion, Context, IpmiError, NetFn, Privilege, expect_length, registry

log = logging.getLogger(__name__)
command = registry.command


@dataclass
class _ChassisRuntime:
    """What a BMC knows only while it runs: the last power-on cause, restart cause. (Chassis
    identify is the state service's, so that every front-end agrees on it.)"""

    powered_on_by_command: bool = False
    restart_cause: int = 0
    restart_channel: int = 0


_runtime: dict[str, _ChassisRuntime] = {}


def runtime(machine: str) -> _ChassisRuntime:
    return _runtime.setdefault(machine, _ChassisRuntime())


#: Chassis identify states (§28.2, Get Chassis Status byte 3 bits 5:4).
IDENTIFY_OFF, IDENTIFY_TIMED, IDENTIFY_INDEFINITE = 0, 1, 2


def identify_state(config: ChassisConfig) -> int:
    """Off, on for an interval (until ``identify_until``) or on until turned off (forced)."""
    if config.identify_forced:
        return IDENTIFY_INDEFINITE
    return IDENTIFY_TIMED if time.time() < config.identify_until else IDENTIFY_OFF


@command(NetFn.CHASSIS, 0x00, Privilege.USER)
async def get_chassis_capabilities(context: Context, data: bytes) -> bytes:
    """Get Chassis Capabilities (§28.1): a diagnostic interrupt, and the BMC (0x20) holding the
    FRU, SDR, SEL and system management functions."""
    return bytes([0x04, 0x20, 0x20, 0x20, 0x20])


@command(NetFn.CHASSIS, 0x01, Privilege.USER)
async def get_chassis_status(context: Context, data: bytes) -> bytes:
    """Get Chassis Status (§28.2): power state and restore policy, the last power event, and
    the identify state."""
    power, config = await asyncio.gather(context.call(subjects.POWER_GET, PowerQuery(), PowerStatus),
                                         context.call(subjects.CHASSIS_GET, None, ChassisConfig))
    state = runtime(context.machine)
    return bytes([(0x01 if power.state == "On" else 0) | config.restore_policy << 5,
                  0x10 if state.powered_on_by_command else 0, 0x40 | identify_state(config) << 4])


#: Chassis Control (§28.3) actions → machine power actions.
_CONTROL_ACTIONS: dict[int, PowerAction] = {0: "off", 1: "on", 2: "cycle", 3: "reset", 4: "nmi", 5: "soft"}


@command(NetFn.CHASSIS, 0x02, Privilege.OPERATOR)
async def chassis_control(context: Context, data: bytes) -> bytes:
    """Chassis Control (§28.3): 0 power down, 1 up, 2 cycle, 3 hard reset, 4 diagnostic
    interrupt (NMI), 5 soft shutdown (ACPI power button). Cycle, reset and NMI of a machine that
    is off answer 0xD5, as the specification recommends (FreeIPMI's --on-if-off relies on it)."""
    expect_length(data, 1, 1)
    action = _CONTROL_ACTIONS.get(data[0] & 0x0F)
    if action is None:
        raise IpmiError(Completion.INVALID_FIELD, f"chassis control {data[0]:#04x}")
    if action == "cycle" and (await context.call(subjects.POWER_GET, PowerQuery(), PowerStatus)).state == "Off":
        raise IpmiError(Completion.NOT_SUPPORTED_IN_STATE, "power cycle of a machine that is off")
    await context.call(subjects.POWER_SET, PowerRequest(action=action), PowerStatus, timeout=30.0)
    state = runtime(context.machine)
    if action in ("on", "cycle", "reset"):
        state.powered_on_by_command |= action != "reset"
        state.restart_cause, state.restart_channel = 0x01, context.channel
    return b""


@command(NetFn.CHASSIS, 0x04, Privilege.OPERATOR)
async def chassis_identify(context: Context, data: bytes) -> bytes:
    """Chassis Identify (§28.5): on for the interval (15 s by default, 0 turns it off) or, with
    the force bit, until turned off; kept by the state service (Redfish's IndicatorLED shows it)."""
    expect_length(data, 0, 2)
    interval = data[0] if data else 15
    forced = len(data) == 2 and bool(data[1] & 0x01)
    await context.call(subjects.CHASSIS_SET, ChassisUpdate(identify_seconds=interval, identify_forced=forced),
                       ChassisConfig)
    return b""


@command(NetFn.CHASSIS, 0x06, Privilege.OPERATOR)
async def set_power_restore_policy(context: Context, data: bytes) -> bytes:
    """Set Power Restore Policy (§28.8): 0 stay off, 1 restore, 2 power on, 3 no change; the
    answer lists the supported policies."""
    expect_length(data, 1, 1)
    policy = data[0] & 0x07
    if policy > 3:
        raise IpmiError(Completion.INVALID_FIELD, f"restore policy {policy}")
    if policy != 3:
        await context.call(subjects.CHASSIS_SET, ChassisUpdate(restore_policy=policy), ChassisConfig)
    return b"\x07"


@command(NetFn.CHASSIS, 0x07, Privilege.USER)
async def get_system_restart_cause(context: Context, data: bytes) -> bytes:
    """Get System Restart Cause (§28.11): a chassis control command, or unknown."""
    state = runtime(context.machine)
    return bytes([state.restart_cause, state.restart_channel])


# ---------------------------------------------------------------- system boot options (§28.12, §28.13)

#: Parameter → (data length, or None for the mailbox's variable length).
BOOT_PARAMETERS: dict[int, int | None] = {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 5, 6: 9, 7: None}
BOOT_FLAGS = 5
MAILBOX = 7
MAILBOX_BLOCKS = 5

#: Boot device selector (parameter 5, data 2 bits 5:2) → the machine's boot target.
_DEVICE_TARGETS: dict[int, BootTarget] = {
    0x0: "None", 0x1: "Pxe", 0x2: "Hdd", 0x3: "Hdd", 0x5: "Cd", 0x6: "BiosSetup", 0x8: "Cd", 0x9: "Cd",
    0xB: "Hdd",
}
_TARGET_DEVICES: dict[str, int] = {"None": 0x0, "Pxe": 0x1, "Hdd": 0x2, "Cd": 0x5, "BiosSetup": 0x6}


def _stored_key(parameter: int, set_selector: int) -> int:
    return MAILBOX << 8 | set_selector if parameter == MAILBOX else parameter


def override_of(flags: bytes) -> BootOverride:
    """The machine's boot override that boot flags (parameter 5) ask for."""
    target = _DEVICE_TARGETS.get(flags[1] >> 2 & 0x0F)
    if target is None:
        raise IpmiError(Completion.INVALID_FIELD, f"boot device selector {flags[1] >> 2 & 0x0F:#x} not supported")
    valid, persistent = bool(flags[0] & 0x80), bool(flags[0] & 0x40)
    enabled = "Disabled" if not valid or target == "None" else "Continuous" if persistent else "Once"
    return BootOverride(target=target, enabled=enabled, mode="UEFI" if flags[0] & 0x20 else "Legacy")


def flags_of(override: BootOverride, stored: bytes | None) -> bytes:
    """Boot flags as the machine's override stands: the bytes last set when they still describe
    it (so every bit a client wrote reads back), the valid bit cleared once the override is
    used or cleared; otherwise flags built from the override (set over Redfish, say)."""
    if stored is not None and len(stored) == BOOT_FLAGS and stored[1] >> 2 & 0x0F in _DEVICE_TARGETS:
        asked = override_of(stored)
        if asked == override or (asked.enabled == "Disabled" and override.enabled == "Disabled"):
            return stored
        if override.enabled == "Disabled":  # used, or cleared
            return bytes([stored[0] & 0x7F]) + stored[1:]
    if override.enabled == "Disabled":
        return bytes(BOOT_FLAGS)
    first = 0x80 | (0x40 if override.enabled == "Continuous" else 0) | (0x20 if override.mode == "UEFI" else 0)
    target = (override.alias or "None") if override.target in ("UefiTarget", "UefiBootNext") else override.target
    return bytes([first, _TARGET_DEVICES[target] << 2, 0, 0, 0])


@command(NetFn.CHASSIS, 0x08, Privilege.OPERATOR)
async def set_system_boot_options(context: Context, data: bytes) -> bytes:
    """Set System Boot Options (§28.12): parameters 0-7 are stored as written; boot flags (5)
    also set the machine's boot override, in the firmware's mode when it has that mode."""
    expect_length(data, 1)
    parameter, value = data[0] & 0x7F, data[1:]
    if parameter not in BOOT_PARAMETERS:
        raise IpmiError(0x80, f"boot option parameter {parameter} not supported")
    length = BOOT_PARAMETERS[parameter]
    if not (len(value) == length if length is not None else 2 <= len(value) <= 17):
        raise IpmiError(Completion.LENGTH_INVALID, f"parameter {parameter}: {len(value)} data bytes")
    if parameter == 0:
        if value[0] & 0x03 == 3:
            raise IpmiError(Completion.INVALID_FIELD, "reserved set-in-progress value")
        value = bytes([value[0] & 0x01])  # writes apply at once: a commit write completes the set
    if parameter == MAILBOX and value[0] >= MAILBOX_BLOCKS:
        raise IpmiError(Completion.INVALID_FIELD, f"mailbox block {value[0]} out of range")
    config = await context.call(subjects.CHASSIS_GET, None, ChassisConfig)
    if parameter == 4:  # boot info acknowledge: data 1 is a write mask for data 2
        previous = config.boot_params.get(4, b"\x00\x00")[1]
        value = bytes([0, previous & ~value[0] | value[1] & value[0]])
    elif parameter == BOOT_FLAGS:
        override = override_of(value)
        update = BootOverrideUpdate(target=override.target, enabled=override.enabled)
        if value[0] & 0x80:  # the BIOS boot type bit counts in valid flags: the boot mode of the next boot
            inventory = await context.call(subjects.INVENTORY_GET, None, Inventory)
            if override.mode in (inventory.firmwares or [inventory.firmware]):
                update.mode = override.mode
            else:
                log.info("%s: boot flags ask for %s boot; the machine can boot in %s only", context.machine,
                         override.mode, inventory.firmware)
        await context.call(subjects.BOOT_SET, update, BootOverride)
    key = _stored_key(parameter, value[0] if parameter == MAILBOX else 0)
    await context.call(subjects.CHASSIS_SET, ChassisUpdate(boot_params={key: bytes(value)}), ChassisConfig)
    return b""


@command(NetFn.CHASSIS, 0x09, Privilege.OPERATOR)
async def get_system_boot_options(context: Context, data: bytes) -> bytes:
    """Get System Boot Options (§28.13): parameter version 1, the parameter, its data."""
    expect_length(data, 3, 3)
    parameter, set_selector = data[0] & 0x7F, data[1]
    if parameter not in BOOT_PARAMETERS:
        raise IpmiError(0x80, f"boot option parameter {parameter} not supported")
    if parameter == MAILBOX and set_selector >= MAILBOX_BLOCKS:
        raise IpmiError(Completion.INVALID_FIELD, f"mailbox block {set_selector} out of range")
    config = await context.call(subjects.CHASSIS_GET, None, ChassisConfig)
    stored = config.boot_params.get(_stored_key(parameter, set_selector))
    if parameter == BOOT_FLAGS:
        value = flags_of(await context.call(subjects.BOOT_GET, None, BootOverride), stored)
    elif parameter == MAILBOX:
        value = stored or bytes([set_selector]) + bytes(16)
    else:
        value = stored or bytes(BOOT_PARAMETERS[parameter] or 0)
    return bytes([0x01, parameter]) + value
