"""The ComputerSystem's own settings, kept by the state service (ChassisConfig) so that every
Redfish and IPMI front-end agrees on them: its asset tag, and its indicator LED, which is IPMI's
chassis identify (IPMI v2.0 §28.5). ``IndicatorLED`` (deprecated since ComputerSystem v1.13, still
read by the OCP baseline profile and Ironic) and ``LocationIndicatorActive`` show the same state:

| chassis identify (Get Chassis Status, §28.2)       | IndicatorLED | LocationIndicatorActive |
|----------------------------------------------------|--------------|-------------------------|
| off                                                | Off          | false                   |
| on for an interval (``ipmitool chassis identify``) | Blinking     | true                    |
| on until turned off (``... identify force``)       | Lit          | true                    |

A PATCH of IndicatorLED ``Lit`` or LocationIndicatorActive ``true`` turns identify on until it is
turned off; ``Blinking`` turns it on for IPMI's default interval, 15 s; ``Off`` or ``false`` off."""

from __future__ import annotations

from typing import Any

from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.ipmi.chassis import IDENTIFY_INDEFINITE, IDENTIFY_OFF, IDENTIFY_TIMED, identify_state
from qemu_bmc_shared.messages import ChassisConfig, ChassisUpdate

from .errors import RedfishError
from .resources import Redfish

#: ComputerSystem properties a PATCH may change here (Boot is the machine service's, see systems.py).
WRITABLE: tuple[str, ...] = ("AssetTag", "IndicatorLED", "LocationIndicatorActive")
MAX_ASSET_TAG = 64
#: IndicatorLED for each chassis identify state.
LED_STATES = {IDENTIFY_OFF: "Off", IDENTIFY_TIMED: "Blinking", IDENTIFY_INDEFINITE: "Lit"}
#: IndicatorLED asked for → (seconds on, on until turned off), as a Chassis Identify request.
LED_REQUESTS = {"Off": (0, False), "Blinking": (15, False), "Lit": (0, True)}


def properties(chassis: ChassisConfig) -> dict[str, Any]:
    """The settings as ComputerSystem properties."""
    led = LED_STATES[identify_state(chassis)]
    return {"AssetTag": chassis.asset_tag, "IndicatorLED": led, "LocationIndicatorActive": led != "Off",
            "IndicatorLED@Redfish.AllowableValues": list(LED_REQUESTS)}


def asset_tag(value: Any) -> str:
    if not isinstance(value, str):
        raise RedfishError(400, "PropertyValueTypeError", value, "AssetTag")
    if len(value) > MAX_ASSET_TAG or not value.isprintable():
        raise RedfishError(400, "PropertyValueFormatError", value, "AssetTag")
    return value


def indicator(changes: dict[str, Any]) -> str | None:
    """The IndicatorLED state a PATCH asks for, by either property (None: neither is changed)."""
    led = changes.get("IndicatorLED")
    if "IndicatorLED" in changes and led not in LED_REQUESTS:
        raise RedfishError(400, "PropertyValueNotInList" if isinstance(led, str) else "PropertyValueTypeError",
                           led, "IndicatorLED")
    if "LocationIndicatorActive" in changes:
        active = changes["LocationIndicatorActive"]
        if not isinstance(active, bool):
            raise RedfishError(400, "PropertyValueTypeError", active, "LocationIndicatorActive")
        if led is not None and (led != "Off") != active:
            raise RedfishError(400, "PropertyValueConflict", "LocationIndicatorActive", "IndicatorLED")
        led = led or ("Lit" if active else "Off")
    return led


async def patch(redfish: Redfish, machine: str, changes: dict[str, Any]) -> None:
    """Apply ``changes`` (only keys of WRITABLE): 400 naming what is wrong, nothing applied then."""
    if not changes:
        return
    update = ChassisUpdate()
    if "AssetTag" in changes:
        update.asset_tag = asset_tag(changes["AssetTag"])
    if (led := indicator(changes)) is not None:
        update.identify_seconds, update.identify_forced = LED_REQUESTS[led]
    await bus.request(redfish.nc, machine, subjects.CHASSIS_SET, update, ChassisConfig)
