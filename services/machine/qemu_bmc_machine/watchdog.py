"""The BMC watchdog timer of one machine (IPMI v2.0 §27): set, reset and read over the bus, run
here, where the machine is, so that its action happens whichever front-end (IPMI over LAN, the VM
wire, any of their replicas) set it, and there is one timer per machine.

* Set (§27.6) stops the timer and loads the new initial countdown, unless "don't stop" is set and
  the timer runs: it then goes on counting from the new countdown. It clears the timer use
  expiration flags it names and the pre-timeout flag, and re-arms the pre-timeout.
* Reset (§27.5) restarts the countdown from the initial countdown (a timer never set:
  ``invalid_state``, IPMI's 80h). Once the pre-timeout interrupt of a running countdown happened,
  Reset no longer restarts it (§27.5: only a Set can stop it then).
* Pre-timeout, ``pretimeout_seconds`` before expiry: an NMI for the NMI type (QMP ``inject-nmi``,
  the machine's diagnostic interrupt); the pre-timeout flag (Get Message Flags bit 3, §22.4) for
  every type, until Clear Message Flags or a Set clears it; an ``event.watchdog`` (phase
  ``pretimeout``). QEMU cannot raise an SMI from outside: the SMI type only sets the flag and logs.
* Expiry: the timer stops at 0, the expiration flag of its timer use is set (§27.2),
  ``event.watchdog`` (phase ``expired``, naming the action taken) is published, then the action is
  taken through the machine's own power path: hard reset, power down (hard off) or power cycle. A
  machine that is off is left off (action ``none``).
* The timer stops, keeping its present countdown, when the machine resets (the BMC's reset, a
  power cycle, or the guest's own reboot) or its power state changes, as a BMC's timer stops when
  the system is reset or powered down (FreeIPMI's bmc-watchdog relies on it: the firmware or OS of
  the next boot sets it up again); the pre-timeout flag, an interrupt of the system that was, is
  cleared with it. The expiration flags stay until a Set clears them: they tell the next boot what
  happened.
* The timer is the BMC's volatile state: it lives in this process only. The machine service
  stopping stops it, and a restarted service starts with a timer never set, so no action ever
  follows a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from qemu_bmc_shared import subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.ipmi.watchdog import EXPIRATION_FLAGS
from qemu_bmc_shared.messages import (
    PowerAction,
    PowerState,
    WatchdogAction,
    WatchdogEvent,
    WatchdogSet,
    WatchdogStatus,
)

if TYPE_CHECKING:
    from .machine import Machine, Publisher

log = logging.getLogger(__name__)

#: Expiry actions taken through the machine's power path.
POWER_ACTIONS: dict[WatchdogAction, PowerAction] = {"reset": "reset", "off": "off", "cycle": "cycle"}


class Watchdog:
    def __init__(self, machine: Machine, publish: Publisher) -> None:
        self.machine = machine
        self._publish = publish
        self._settings: WatchdogSet | None = None
        """The last Set; None: never set."""
        self._expiration_flags = 0
        self._pretimeout_flag = False
        self._remaining = 0
        """The present countdown (100 ms) while the timer is stopped."""
        self._deadline: float | None = None
        """While the timer runs: the event loop time it expires at."""
        self._pretimeout_done = False
        """The pre-timeout interrupt of the running countdown happened."""
        self._countdown: asyncio.Task[None] | None = None
        self._reactions: set[asyncio.Task[None]] = set()
        self._in_order = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._deadline is not None

    def _present_countdown(self) -> int:
        if self._deadline is None:
            return self._remaining
        return max(0, math.ceil((self._deadline - asyncio.get_running_loop().time()) * 10))

    def status(self) -> WatchdogStatus:
        settings = self._settings
        if settings is None:
            return WatchdogStatus(expiration_flags=self._expiration_flags, pretimeout_occurred=self._pretimeout_flag)
        return WatchdogStatus(timer_use=settings.timer_use, running=self.running, dont_log=settings.dont_log,
                              action=settings.action, pretimeout=settings.pretimeout,
                              pretimeout_seconds=settings.pretimeout_seconds,
                              expiration_flags=self._expiration_flags, countdown=settings.countdown,
                              remaining=self._present_countdown(), pretimeout_occurred=self._pretimeout_flag)

    async def set(self, request: WatchdogSet) -> WatchdogStatus:
        if request.clear_flags & ~EXPIRATION_FLAGS:
            raise BusError("bad_request", f"clear_flags {request.clear_flags:#04x}: bits 0, 6 and 7 are reserved")
        if request.pretimeout != "none" and request.pretimeout_seconds * 10 > request.countdown:
            raise BusError("bad_request", f"the pre-timeout interval ({request.pretimeout_seconds} s) is longer "
                           f"than the countdown ({request.countdown / 10:g} s)")
        keep_running = request.dont_stop and self.running
        self._halt(request.countdown)
        self._settings = request
        self._expiration_flags &= ~request.clear_flags
        self._pretimeout_flag = False
        if keep_running:
            self._start()
        log.info("%s: watchdog set: %s", self.machine.name, request)
        return self.status()

    async def reset(self) -> WatchdogStatus:
        if self._settings is None:
            raise BusError("invalid_state", f"machine {self.machine.name}: the watchdog timer was never set")
        if not (self.running and self._pretimeout_done):
            self._halt(self._settings.countdown)
            self._start()
        return self.status()

    def clear_pretimeout(self) -> WatchdogStatus:
        self._pretimeout_flag = False
        return self.status()

    def power_changed(self, state: PowerState, cause: str) -> None:
        """The machine's power state changed, or it reset (``cause`` RESET): the timer stops."""
        if self.running:
            log.info("%s: watchdog stopped (machine %s, %s)", self.machine.name, state, cause)
        self._halt()
        self._pretimeout_flag = False

    def stop(self) -> None:
        """The machine service stops: no countdown, no action goes on."""
        self._halt()
        for task in list(self._reactions):
            task.cancel()

    # ------------------------------------------------------------------ the countdown

    def _halt(self, remaining: int | None = None) -> None:
        """Stop the countdown where it is, or load ``remaining``."""
        if self._countdown is not None:
            self._countdown.cancel()
            self._countdown = None
        self._remaining = self._present_countdown() if remaining is None else remaining
        self._deadline = None
        self._pretimeout_done = False

    def _start(self) -> None:
        assert self._settings is not None
        self._deadline = asyncio.get_running_loop().time() + self._remaining / 10
        self._countdown = asyncio.ensure_future(self._count_down(self._settings, self._deadline))

    async def _count_down(self, settings: WatchdogSet, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if settings.pretimeout != "none":
            await asyncio.sleep(deadline - settings.pretimeout_seconds - loop.time())
            self._pretimeout_done = self._pretimeout_flag = True
            self._react(lambda: self._pretimeout(settings))
        await asyncio.sleep(deadline - loop.time())
        self._countdown = None
        self._deadline = None
        self._remaining = 0
        self._pretimeout_done = False
        self._expiration_flags |= 1 << settings.timer_use
        self._react(lambda: self._expired(settings))

    def _react(self, reaction: Callable[[], Awaitable[None]]) -> None:
        """Run what the timer does apart from the countdown, one reaction after the other: what a
        machine reset or power change does to the timer never cancels it half-way."""

        async def in_order() -> None:
            async with self._in_order:
                try:
                    await reaction()
                except BusError as exc:
                    log.error("%s: watchdog action failed: %s", self.machine.name, exc)

        task = asyncio.ensure_future(in_order())
        self._reactions.add(task)
        task.add_done_callback(self._reactions.discard)

    async def _pretimeout(self, settings: WatchdogSet) -> None:
        log.warning("%s: watchdog pre-timeout (%s interrupt)", self.machine.name, settings.pretimeout)
        if settings.pretimeout == "nmi" and self.machine.power_state == "On":
            await self.machine.power("nmi")
        await self._event("pretimeout", settings, settings.action)

    async def _expired(self, settings: WatchdogSet) -> None:
        """The event tells the action taken: none for a machine that is off."""
        action = settings.action if self.machine.power_state == "On" else "none"
        log.warning("%s: watchdog expired (timer use %d): action %s", self.machine.name, settings.timer_use, action)
        await self._event("expired", settings, action)
        if action != "none":
            await self.machine.power(POWER_ACTIONS[action])

    async def _event(self, phase: Literal["pretimeout", "expired"], settings: WatchdogSet,
                     action: WatchdogAction) -> None:
        await self._publish(self.machine.name, subjects.EVENT_WATCHDOG, WatchdogEvent(
            machine=self.machine.name, phase=phase, timer_use=settings.timer_use, action=action,
            pretimeout=settings.pretimeout, dont_log=settings.dont_log, timestamp=time.time()))
