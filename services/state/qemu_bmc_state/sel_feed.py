"""The SEL feed: System Event Log records from the machine service's power, boot and watchdog events.

Every state replica subscribes in one queue group, so each event is logged once. What the events
tell becomes system event records (IPMI v2.0 §32.1) from the BMC's sensors (see
``qemu_bmc_shared.ipmi.storage``):

* the machine going on or off: Power Unit "System Power", offset 00h "Power Off / Power Down",
  deasserted when it goes on, asserted when it goes off (table 42-3, sensor type 09h);
* a reset of a running machine (QMP ``RESET``): System Boot / Restart Initiated "System Restart",
  offset 01h "Initiated by hard reset" (sensor type 1Dh; QEMU's system reset resets the whole
  platform). SeaBIOS resets the machine once more by itself right after a reset (not after a
  power-on); that reset belongs to the same boot and is not logged again;
* a one-time boot override used by the boot that starts: System Event "Boot Override", offset 01h
  "OEM System Boot Event" (sensor type 12h). The event carries no boot device (the override is
  already cleared), and no standard offset means "boot with a one-time override", so it is this
  OEM-defined boot event;
* the watchdog timer's pre-timeout interrupt and its expiry, unless set with "don't log": Watchdog 2
  "Watchdog", offset 08h "Timer interrupt" or the action taken on expiry (00h status only, 01h hard
  reset, 02h power down, 03h power cycle), event data 2 the interrupt type and the timer use
  (sensor type 23h; see ``qemu_bmc_shared.ipmi.watchdog.sel_record``);
* a graceful shutdown or restart the guest ignored (power event ``graceful-timeout``): OS Stop /
  Shutdown "OS Shutdown", offset 05h "graceful shutdown request to agent via BMC did not occur"
  (sensor type 20h).

The state service itself logs every change of a user account (name, enable, password, channel
access), whichever front-end made it, as an OEM timestamped record (type C0h, see
``storage.user_change_record`` and :func:`user_change`).

The last power state and logged reset of each machine are kept in the state store, so transitions
are found the same whichever replica gets an event, and stale events (older than the last one
seen) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from qemu_bmc_shared import subjects
from qemu_bmc_shared.ipmi.storage import (
    AGENT_NOT_RESPONDING,
    BOOT_SENSOR,
    HARD_RESET,
    OEM_SYSTEM_BOOT,
    OS_STOP,
    OS_STOP_SENSOR,
    POWER_OFF,
    POWER_SENSOR,
    POWER_UNIT,
    RESTART_SENSOR,
    SYSTEM_BOOT,
    SYSTEM_EVENT,
    USER_ACCESS,
    USER_DISABLED,
    USER_ENABLED,
    USER_NAME_CLEARED,
    USER_NAME_SET,
    USER_PASSWORD_CLEARED,
    USER_PASSWORD_SET,
    sel_event,
    user_change_record,
)
from qemu_bmc_shared.ipmi.watchdog import sel_record
from qemu_bmc_shared.messages import BootEvent, PowerEvent, PowerState, SelAdd, User, WatchdogEvent

if TYPE_CHECKING:
    from .service import StateService

log = logging.getLogger(__name__)
QUEUE = "qemu-bmc-state-sel"
FIRMWARE_REBOOT_WINDOW = 2.0
"""A reset this soon (seconds) after a reset is the firmware's own (see the machine service)."""
GRACEFUL_TIMEOUT = "graceful-timeout"


def user_change(before: User, after: User, password_changed: bool) -> bytes | None:
    """The user change record of a user slot's change (None when nothing changed)."""
    changes = 0
    if after.name != before.name:
        changes |= USER_NAME_SET if after.name else USER_NAME_CLEARED
    if after.enabled != before.enabled:
        changes |= USER_ENABLED if after.enabled else USER_DISABLED
    if password_changed:
        changes |= USER_PASSWORD_SET if after.password_set else USER_PASSWORD_CLEARED
    channel = next((number for number, access in sorted(after.channels.items())
                    if before.channels.get(number) != access), None)
    if channel is None:
        return user_change_record(changes, after.slot) if changes else None
    access = after.channels[channel]
    flags = access.ipmi_messaging | access.link_auth << 1 | access.callback_only << 2
    return user_change_record(changes | USER_ACCESS, after.slot, channel, access.privilege, flags, access.payloads)


class FeedState(msgspec.Struct):
    power: PowerState | None = None
    seen: float = 0.0
    """Timestamp of the last event applied."""
    reset: float = 0.0
    """Timestamp of the last reset logged."""


class SelFeed:
    def __init__(self, nc: Client, state: StateService) -> None:
        self.nc = nc
        self.state = state
        self.subscriptions: list[Subscription] = []

    async def start(self) -> SelFeed:
        handlers: list[tuple[str, Callable[[str, Any], Awaitable[None]], type[msgspec.Struct]]] = [
            (subjects.EVENT_POWER, self.power, PowerEvent), (subjects.EVENT_BOOT, self.boot, BootEvent),
            (subjects.EVENT_WATCHDOG, self.watchdog, WatchdogEvent)]
        for event, handler, kind in handlers:
            self.subscriptions.append(await self.nc.subscribe(subjects.any_machine(event), queue=QUEUE,
                                                              cb=self._callback(handler, kind)))
        return self

    async def stop(self) -> None:
        for subscription in self.subscriptions:
            await subscription.unsubscribe()
        self.subscriptions.clear()

    def _callback(self, handler: Callable[[str, Any], Awaitable[None]],
                  kind: type[msgspec.Struct]) -> Callable[[Any], Awaitable[None]]:
        async def receive(message: Any) -> None:
            try:
                machine = subjects.machine_of(message.subject)
                event = msgspec.json.decode(message.data, type=kind)
            except (ValueError, msgspec.DecodeError) as exc:
                log.warning("SEL feed: ignoring a bad event on %s: %s", message.subject, exc)
                return
            if not await self.state.known(machine):
                return
            try:
                await handler(machine, event)
            except Exception:
                log.exception("%s: SEL feed could not log %s", machine, message.subject)

        return receive

    async def _log(self, machine: str, timestamp: float, data: bytes) -> None:
        """A record stamped with the event's time by the BMC's clock (the SEL time)."""
        await self.state.sel_add(machine, SelAdd(data=data, timestamp=await self.state.bmc_time(machine, timestamp)))

    async def power(self, machine: str, event: PowerEvent) -> None:
        records: list[bytes] = []

        def change(last: FeedState) -> FeedState:
            records.clear()
            if event.timestamp < last.seen:
                return last
            reset = last.reset
            if event.cause == GRACEFUL_TIMEOUT:
                records.append(sel_event(OS_STOP, OS_STOP_SENSOR, AGENT_NOT_RESPONDING))
            elif event.state != last.power and (last.power is not None or event.state == "On"):
                records.append(sel_event(POWER_UNIT, POWER_SENSOR, POWER_OFF, deassertion=event.state == "On"))
            elif event.cause == "RESET" and event.state == "On" and event.timestamp - reset >= FIRMWARE_REBOOT_WINDOW:
                records.append(sel_event(SYSTEM_BOOT, RESTART_SENSOR, HARD_RESET))
                reset = event.timestamp
            return FeedState(power=event.state, seen=event.timestamp, reset=reset)

        await self.state.store.modify(f"{machine}.sel-feed", FeedState, FeedState, change)
        for data in records:
            await self._log(machine, event.timestamp, data)

    async def boot(self, machine: str, event: BootEvent) -> None:
        if event.cause == "used":
            await self._log(machine, event.timestamp, sel_event(SYSTEM_EVENT, BOOT_SENSOR, OEM_SYSTEM_BOOT))

    async def watchdog(self, machine: str, event: WatchdogEvent) -> None:
        if not event.dont_log:
            await self._log(machine, event.timestamp, sel_record(event))
