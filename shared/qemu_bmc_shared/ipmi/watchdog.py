"""The BMC watchdog timer commands (netfn 0x06, IPMI v2.0 §27.5-27.7): Reset, Set and Get Watchdog
Timer, and the Watchdog 2 SEL record of what the timer did (§42.2, table 42-3).

The timer runs in the machine service (``bmc.<m>.watchdog.*``), one per machine, so that IPMI
over LAN, the VM wire and their replicas all see one timer, and its action happens where the
machine is. Here the requests are decoded and checked and the answers encoded; what a Set with
a running timer does, and when the timer stops, is the machine service's (its ``watchdog``
module).
"""

from __future__ import annotations

from .. import subjects
from ..messages import WatchdogAction, WatchdogEvent, WatchdogPretimeout, WatchdogSet, WatchdogStatus
from .core import Completion, Context, IpmiError, NetFn, Privilege, expect_length, registry
from .storage import WATCHDOG_2, WATCHDOG_INTERRUPT, WATCHDOG_SENSOR, sel_event

command = registry.command

#: Timer actions byte (§27.6 byte 2): time-out actions (bits 2:0) and pre-timeout interrupts
#: (bits 6:4), by their codes. The Watchdog 2 offsets 00h-03h of an expiry are the same codes as
#: the action (table 42-3), and event data 2 carries the interrupt's code in bits 7:4.
ACTIONS: tuple[WatchdogAction, ...] = ("none", "reset", "off", "cycle")
PRETIMEOUTS: tuple[WatchdogPretimeout, ...] = ("none", "smi", "nmi", "interrupt")
TIMER_USES = range(1, 6)
"""1 BIOS FRB2, 2 BIOS/POST, 3 OS load, 4 SMS/OS, 5 OEM; 0, 6 and 7 are reserved."""
DONT_LOG = 0x80
DONT_STOP = 0x40
"""Set: a running timer goes on with the new countdown. Get: the same bit says the timer runs."""
RESERVED_USE_BITS = 0x38
RESERVED_ACTION_BITS = 0x88
EXPIRATION_FLAGS = 0x3E
"""Timer use expiration flags (§27.6 byte 4, §27.7 byte 5): bit n for timer use n."""
UNINITIALIZED = 0x80
"""Reset Watchdog Timer: "attempt to start un-initialized watchdog" (§27.5)."""


def decode_set(data: bytes) -> WatchdogSet:
    """The six bytes of Set Watchdog Timer (§27.6); reserved bits or values: 0xCC."""
    expect_length(data, 6, 6)
    use, actions, interval, clear = data[:4]
    if use & RESERVED_USE_BITS or use & 0x07 not in TIMER_USES:
        raise IpmiError(Completion.INVALID_FIELD, f"timer use byte {use:#04x}: reserved bits or timer use")
    pretimeout, action = actions >> 4 & 0x07, actions & 0x07
    if actions & RESERVED_ACTION_BITS or pretimeout >= len(PRETIMEOUTS) or action >= len(ACTIONS):
        raise IpmiError(Completion.INVALID_FIELD, f"timer actions byte {actions:#04x}: reserved bits or values")
    if clear & ~EXPIRATION_FLAGS:
        raise IpmiError(Completion.INVALID_FIELD, f"expiration flags to clear {clear:#04x}: reserved bits")
    return WatchdogSet(timer_use=use & 0x07, countdown=int.from_bytes(data[4:6], "little"),
                       dont_log=bool(use & DONT_LOG), dont_stop=bool(use & DONT_STOP), action=ACTIONS[action],
                       pretimeout=PRETIMEOUTS[pretimeout], pretimeout_seconds=interval, clear_flags=clear)


def encode_status(status: WatchdogStatus) -> bytes:
    """Get Watchdog Timer's eight bytes (§27.7)."""
    return (bytes([(DONT_LOG if status.dont_log else 0) | (DONT_STOP if status.running else 0) | status.timer_use,
                   PRETIMEOUTS.index(status.pretimeout) << 4 | ACTIONS.index(status.action),
                   status.pretimeout_seconds, status.expiration_flags])
            + status.countdown.to_bytes(2, "little") + status.remaining.to_bytes(2, "little"))


@command(NetFn.APP, 0x22, Privilege.OPERATOR)
async def reset_watchdog_timer(context: Context, data: bytes) -> bytes:
    """Reset Watchdog Timer (§27.5): (re)start the countdown from the initial countdown; 80h when
    the timer was never set. Once the pre-timeout interrupt of a running countdown happened, the
    countdown is not restarted (only a Set stops it then), and the command still succeeds."""
    expect_length(data, 0, 0)
    try:
        await context.call(subjects.WATCHDOG_RESET, None, WatchdogStatus)
    except IpmiError as error:
        if error.completion == Completion.NOT_SUPPORTED_IN_STATE:
            raise IpmiError(UNINITIALIZED, "the watchdog timer was never set") from None
        raise
    return b""


@command(NetFn.APP, 0x24, Privilege.OPERATOR)
async def set_watchdog_timer(context: Context, data: bytes) -> bytes:
    """Set Watchdog Timer (§27.6): timer use, don't log, don't stop, time-out action, pre-timeout
    interrupt and interval (seconds), expiration flags to clear, initial countdown (100 ms).
    A pre-timeout interval longer than the countdown is refused (0xCC, by the machine service)."""
    await context.call(subjects.WATCHDOG_SET, decode_set(data), WatchdogStatus)
    return b""


@command(NetFn.APP, 0x25, Privilege.USER)
async def get_watchdog_timer(context: Context, data: bytes) -> bytes:
    """Get Watchdog Timer (§27.7): the settings, whether the timer runs, the expiration flags, the
    initial and the present countdown (100 ms)."""
    expect_length(data, 0, 0)
    return encode_status(await context.call(subjects.WATCHDOG_GET, None, WatchdogStatus))


def sel_record(event: WatchdogEvent) -> bytes:
    """The Watchdog 2 system event record of a pre-timeout (offset 08h "timer interrupt") or of an
    expiry (00h "timer expired, status only", 01h hard reset, 02h power down, 03h power cycle),
    event data 2 the interrupt type (bits 7:4) and the timer use (bits 3:0) (table 42-3)."""
    offset = WATCHDOG_INTERRUPT if event.phase == "pretimeout" else ACTIONS.index(event.action)
    return sel_event(WATCHDOG_2, WATCHDOG_SENSOR, offset,
                     data2=PRETIMEOUTS.index(event.pretimeout) << 4 | event.timer_use)
