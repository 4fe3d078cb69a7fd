"""Messages, completion codes, privileges, the handler registry and dispatch."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .. import bus, subjects
from ..bus import BusError

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R")


class NetFn(IntEnum):
    """Network function codes (IPMI v2.0 §5.1, table 5-1); requests use the even codes."""

    CHASSIS = 0x00
    BRIDGE = 0x02
    SENSOR = 0x04
    APP = 0x06
    FIRMWARE = 0x08
    STORAGE = 0x0A
    TRANSPORT = 0x0C
    GROUP = 0x2C
    OEM = 0x2E


class Completion(IntEnum):
    """Completion codes (IPMI v2.0 §5.2, table 5-2)."""

    OK = 0x00
    NODE_BUSY = 0xC0
    INVALID_COMMAND = 0xC1
    INVALID_FOR_LUN = 0xC2
    TIMEOUT = 0xC3
    OUT_OF_SPACE = 0xC4
    RESERVATION_CANCELLED = 0xC5
    DATA_TRUNCATED = 0xC6
    LENGTH_INVALID = 0xC7
    LENGTH_TOO_LONG = 0xC8
    PARAMETER_OUT_OF_RANGE = 0xC9
    CANNOT_RETURN_BYTES = 0xCA
    NOT_PRESENT = 0xCB
    INVALID_FIELD = 0xCC
    ILLEGAL_FOR_SENSOR = 0xCD
    CANNOT_RESPOND = 0xCE
    DUPLICATE_REQUEST = 0xCF
    SDR_UPDATE_MODE = 0xD0
    FIRMWARE_UPDATE_MODE = 0xD1
    INITIALIZING = 0xD2
    DESTINATION_UNAVAILABLE = 0xD3
    INSUFFICIENT_PRIVILEGE = 0xD4
    NOT_SUPPORTED_IN_STATE = 0xD5
    SUBFUNCTION_DISABLED = 0xD6
    UNSPECIFIED = 0xFF


class Privilege(IntEnum):
    """Privilege levels (IPMI v2.0 §6.8)."""

    CALLBACK = 1
    USER = 2
    OPERATOR = 3
    ADMINISTRATOR = 4
    OEM = 5
    NO_ACCESS = 0x0F


class IpmiError(Exception):
    """Ends a command with a completion code (and optionally response data)."""

    def __init__(self, completion: int, message: str = "", data: bytes = b"") -> None:
        super().__init__(message or f"completion code {completion:#04x}")
        self.completion = completion
        self.data = data


@dataclass(frozen=True)
class Request:
    netfn: int
    cmd: int
    data: bytes = b""
    lun: int = 0


@dataclass(frozen=True)
class Response:
    completion: int
    data: bytes = b""

    def encode(self) -> bytes:
        return bytes([self.completion]) + self.data


#: The system interface (KCS) channel number (IPMI v2.0 §6.3).
SYSTEM_INTERFACE = 0x0F
#: The channel qemu-bmc's IPMI over LAN uses.
LAN_CHANNEL = 1
#: "This channel", in requests that name a channel (IPMI v2.0 §6.3).
CURRENT_CHANNEL = 0x0E

#: The RMCP+ cipher suites qemu-bmc implements (IPMI v2.0 §22.15.2, table 22-20): suite id →
#: (authentication, integrity, confidentiality) algorithm numbers (§13.28-13.29).
CIPHER_SUITES: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0),
    1: (1, 0, 0),
    2: (1, 1, 0),
    3: (1, 1, 1),
    15: (3, 0, 0),
    16: (3, 4, 0),
    17: (3, 4, 1),
}


#: State service reads a front-end may keep (see :class:`StateReads`) and the writes after which
#: it drops what it kept.
CACHED_READS = frozenset({subjects.USERS_LIST, subjects.USERS_GET, subjects.CHANNEL_GET, subjects.LAN_GET,
                          subjects.SOL_GET, subjects.KG_GET, subjects.CHASSIS_GET})
STATE_WRITES = frozenset({subjects.USERS_SET, subjects.USERS_ACCESS, subjects.USERS_PASSWORD, subjects.CHANNEL_SET,
                          subjects.LAN_SET, subjects.SOL_SET, subjects.KG_SET, subjects.CHASSIS_SET,
                          subjects.SEL_ADD, subjects.SEL_CLEAR})


class StateReads:
    """What a front-end read from the state service for one machine, kept until the state service
    announces a change of that machine's state (``event.state``, sent before it answers the
    request that made the change; see :func:`follow_state_changes`), until this front-end writes
    to it, and for ``max_age`` seconds at most in case an announcement is lost. A read that was
    under way when a change was announced is not kept; failed reads are not kept.

    An announcement reaches each front-end a moment after the write is acknowledged: what must
    see every acknowledged write (a request that changes something) reads with ``fresh``."""

    def __init__(self, max_age: float = 5.0, max_entries: int = 256) -> None:
        self.max_age, self.max_entries = max_age, max_entries
        self.entries: dict[object, tuple[float, object]] = {}
        self.generation = 0

    async def get(self, key: object, fetch: Callable[[], Awaitable[R]], keep: Callable[[R], bool] | None = None,
                  fresh: bool = False) -> R:
        """The value kept for ``key``, or what ``fetch`` reads now (kept unless ``keep`` says no);
        ``fresh``: read now in any case."""
        now = time.monotonic()
        kept = None if fresh else self.entries.get(key)
        if kept is not None and now - kept[0] < self.max_age:
            return kept[1]  # type: ignore[return-value]
        generation = self.generation
        value = await fetch()
        if generation == self.generation and (keep is None or keep(value)):
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = (now, value)
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.generation += 1


async def follow_state_changes(nc: Client, reads: dict[str, StateReads]) -> Subscription:
    """Clear a machine's :class:`StateReads` whenever the state service announces a change of it."""

    async def changed(message: Msg) -> None:
        kept = reads.get(subjects.machine_of(message.subject))
        if kept is not None:
            kept.clear()

    subscription = await nc.subscribe(subjects.any_machine(subjects.EVENT_STATE), cb=changed)
    await nc.flush()
    return subscription


@dataclass
class Context:
    """Where a request comes from: the machine, the bus, the channel and who asks.

    ``privilege`` is the session's current privilege level; requests on the system interface
    have no session and are not privilege-checked (IPMI v2.0 §6.8: the system interface is not
    authenticated). ``session`` is an opaque object of the transport, for the commands the
    transport itself registers (session management).
    """

    machine: str
    nc: Client
    channel: int = SYSTEM_INTERFACE
    privilege: Privilege = Privilege.ADMINISTRATOR
    user_slot: int | None = None
    session: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    reads: StateReads | None = None
    """The front-end's kept state service reads, if it keeps them."""

    @property
    def system_interface(self) -> bool:
        return self.channel == SYSTEM_INTERFACE

    async def call(self, operation: str, message: msgspec.Struct | None, reply_type: type[T],
                   timeout: float = 10.0) -> T:
        """A bus request for this machine; bus failures end the command with a completion code."""
        if self.reads is not None and operation in CACHED_READS:
            key = (operation, bus.encode(message) if message is not None else b"")
            return await self.reads.get(key, lambda: self._request(operation, message, reply_type, timeout))
        reply = await self._request(operation, message, reply_type, timeout)
        if self.reads is not None and operation in STATE_WRITES:
            self.reads.clear()
        return reply

    async def _request(self, operation: str, message: msgspec.Struct | None, reply_type: type[T],
                       timeout: float) -> T:
        """The bus request; while the bus is down, 0xC0 (node busy) at once: the client's retry may
        find it back, and a request made now would wait for the reconnection."""
        if not self.nc.is_connected:
            raise IpmiError(Completion.NODE_BUSY, "the bus is unreachable")
        try:
            return await bus.request(self.nc, self.machine, operation, message, reply_type, timeout=timeout)
        except BusError as exc:
            raise IpmiError(_BUS_COMPLETIONS.get(exc.error, Completion.UNSPECIFIED), str(exc)) from None
        except nats.errors.Error as exc:  # the connection lost under the request
            raise IpmiError(Completion.NODE_BUSY, f"the bus: {exc}") from None


_BUS_COMPLETIONS = {
    "bad_request": Completion.INVALID_FIELD,
    "not_found": Completion.NOT_PRESENT,
    "conflict": Completion.INVALID_FIELD,
    "invalid_state": Completion.NOT_SUPPORTED_IN_STATE,
    "timeout": Completion.TIMEOUT,
    "unavailable": Completion.NODE_BUSY,
    "unknown_machine": Completion.DESTINATION_UNAVAILABLE,
    "qemu_error": Completion.UNSPECIFIED,
}

Handler = Callable[[Context, bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class Command:
    netfn: int
    cmd: int
    name: str
    privilege: Privilege
    handler: Handler
    sessionless: bool = False
    """Allowed outside a session on LAN (Get Channel Auth Capabilities, Get Channel Cipher Suites …)."""


class Registry:
    """(netfn, cmd) → :class:`Command`."""

    def __init__(self) -> None:
        self.commands: dict[tuple[int, int], Command] = {}

    def command(self, netfn: int, cmd: int, privilege: Privilege, *, sessionless: bool = False
                ) -> Callable[[Handler], Handler]:
        """Register ``handler`` for (netfn, cmd), usable from ``privilege`` up."""

        def register(handler: Handler) -> Handler:
            key = (int(netfn), cmd)
            if key in self.commands:
                raise ValueError(f"netfn {netfn:#04x} cmd {cmd:#04x} registered twice")
            self.commands[key] = Command(int(netfn), cmd, handler.__name__, privilege, handler, sessionless)
            return handler

        return register

    def extended(self, other: Registry) -> Registry:
        """A registry with this one's commands and ``other``'s (a transport's own commands)."""
        combined = Registry()
        combined.commands = {**self.commands, **other.commands}
        return combined

    def find(self, netfn: int, cmd: int) -> Command | None:
        return self.commands.get((netfn, cmd))

    async def dispatch(self, context: Context, request: Request) -> Response:
        """Run a request: 0xC1 for an unknown command, 0xD4 below its privilege, the handler's
        completion code otherwise. No exception escapes."""
        command = self.find(request.netfn, request.cmd)
        if command is None:
            return Response(Completion.INVALID_COMMAND)
        if not context.system_interface and context.privilege < command.privilege:
            return Response(Completion.INSUFFICIENT_PRIVILEGE)
        try:
            return Response(Completion.OK, await command.handler(context, request.data))
        except IpmiError as exc:
            return Response(exc.completion, exc.data)
        except Exception:
            log.exception("%s: %s failed", context.machine, command.name)
            return Response(Completion.UNSPECIFIED)


#: The shared commands; the netfn modules register into it when imported (see :func:`load`).
registry = Registry()


def lan_channel(context: Context, channel: int) -> int:
    """The LAN channel a request names (0x0E: the one it came in on; on the system interface,
    the LAN channel); any other channel is not a LAN channel: 0xCC."""
    channel &= 0x0F
    if channel == CURRENT_CHANNEL:
        channel = LAN_CHANNEL if context.system_interface else context.channel
    if channel != LAN_CHANNEL:
        raise IpmiError(Completion.INVALID_FIELD, f"channel {channel} is not a LAN channel")
    return channel


def expect_length(data: bytes, minimum: int, maximum: int | None = None) -> None:
    """Request data length check: 0xC7 when it is wrong (IPMI v2.0 §5.2)."""
    if len(data) < minimum or (maximum is not None and len(data) > maximum):
        raise IpmiError(Completion.LENGTH_INVALID, f"{len(data)} data bytes, expected {minimum}..{maximum}")
