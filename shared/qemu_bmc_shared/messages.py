"""The bus messages: one msgspec Struct per message, used by both ends.

Encoded as JSON (``bytes`` fields as base64), so ``nats req`` shows them readably.
Partial updates use ``msgspec.UNSET`` for the fields a request leaves alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

PowerState = Literal["On", "Off"]
PowerAction = Literal["on", "off", "soft", "reset", "cycle", "nmi"]
BootTarget = Literal["None", "Pxe", "Hdd", "Cd", "BiosSetup"]
BootEnabled = Literal["Disabled", "Once", "Continuous"]
BootMode = Literal["UEFI", "Legacy"]

UserSlot = Annotated[int, msgspec.Meta(ge=1, le=15)]
Channel = Annotated[int, msgspec.Meta(ge=0, le=15)]
Privilege = Annotated[int, msgspec.Meta(ge=1, le=15)]
Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
UserName = Annotated[str, msgspec.Meta(max_length=16)]
Password = Annotated[str, msgspec.Meta(max_length=20)]


class Message(msgspec.Struct, forbid_unknown_fields=True):
    """Base of every bus message: unknown fields are refused, not ignored."""


class Empty(Message):
    """A request with no body."""


class ErrorReply(Message):
    """The body of every error reply (the reply also has the nats.micro error headers)."""

    error: str
    message: str


# ---------------------------------------------------------------- machine service

class PowerStatus(Message):
    machine: str
    state: PowerState
    run_state: str
    """QEMU's run state (``running``, ``shutdown``, ``paused`` …), ``not-running`` or ``disconnected``."""
    mode: Literal["managed", "attach"]
    pid: int | None = None


class PowerQuery(Message):
    fresh: bool = False
    """Ask QEMU now (``query-status``) rather than answer from the state kept current by QMP events."""


class PowerRequest(Message):
    action: PowerAction


class PowerEvent(Message):
    machine: str
    state: PowerState
    cause: str
    """The QMP event (``SHUTDOWN``, ``RESET`` …) or ``launched``, ``exited``, ``connected``, ``disconnected``."""
    timestamp: float


class BootOverride(Message):
    target: BootTarget = "None"
    enabled: BootEnabled = "Disabled"
    mode: BootMode = "Legacy"


class BootOverrideUpdate(Message):
    target: BootTarget | UnsetType = UNSET
    enabled: BootEnabled | UnsetType = UNSET
    mode: BootMode | UnsetType = UNSET


class BootEvent(Message):
    machine: str
    override: BootOverride
    cause: Literal["set", "used"]
    timestamp: float


class MediaStatus(Message):
    machine: str
    device: str
    inserted: bool
    image: str | None = None
    write_protected: bool = True


class MediaInsert(Message):
    image: Annotated[str, msgspec.Meta(min_length=1)]
    """A local path or an http(s) URL."""
    write_protected: bool = True


class Inventory(Message):
    machine: str
    uuid: str
    memory_mib: int
    cpus: int
    macs: list[str]
    firmware: BootMode
    manufacturer: str = "QEMU"
    model: str = "QEMU virtual machine"
    serial: str | None = None
    """The SMBIOS system strings the guest sees (a bare-metal identity's, when configured);
    the serial number is the UUID when None."""
    bare_metal: bool = False


class SystemView(Message):
    """Power, boot override and inventory in one reply (what a Redfish ComputerSystem shows)."""

    power: PowerStatus
    boot: BootOverride
    inventory: Inventory


class ConsoleOutput(Message):
    """Bytes the machine wrote to its serial port (``console.out``). ``end`` counts every byte
    written since the machine service started, up to the end of ``data``: a viewer sees gaps
    and overlaps with the history (``console.get``) from it."""

    machine: str
    data: bytes
    end: int


class ConsoleHistory(Message):
    """The last bytes of the serial console the machine service keeps (a bounded ring), up to
    ``end`` (see ConsoleOutput), for a viewer that attaches."""

    data: bytes
    end: int


class ConsoleInput(Message):
    """Bytes to type on the machine's serial port (``console.in``), after a serial break when
    ``send_break`` is set (SOL's "generate BREAK", IPMI v2.0 §26.2; Linux's magic SysRq key)."""

    data: Annotated[bytes, msgspec.Meta(max_length=4096)]
    send_break: bool = False


class ConsoleWritten(Message):
    """How many bytes of a ConsoleInput reached the serial port (0 while no QEMU is connected)."""

    written: int


# ---------------------------------------------------------------- state service

class UserChannelAccess(Message):
    """One user's access on one channel (IPMI v2.0 §22.26/22.27, §24.6)."""

    privilege: Privilege = 0x0F
    """Privilege limit: 1 callback, 2 user, 3 operator, 4 administrator, 5 OEM, 15 no access."""
    ipmi_messaging: bool = False
    link_auth: bool = False
    callback_only: bool = False
    payloads: Annotated[int, msgspec.Meta(ge=0, le=0xFF)] = 0
    """Standard payload types 1-7 the user may activate, one bit each (bit 1 = SOL)."""
    oem_payloads: Annotated[int, msgspec.Meta(ge=0, le=0xFF)] = 0


class User(Message):
    """A user slot, without its password."""

    slot: UserSlot
    name: str = ""
    enabled: bool = False
    password_set: bool = False
    channels: dict[int, UserChannelAccess] = {}
    changes: int = 0
    """Grows with every change of the slot (a version, for ETags and for sessions to notice it)."""


class UserList(Message):
    users: list[User]


class UserRef(Message):
    slot: UserSlot


class UserUpdate(Message):
    slot: UserSlot
    name: UserName | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    if_name: UserName | UnsetType = UNSET
    """Apply only while the slot's name is this (``""``: a free slot), else the error
    ``invalid_state``: two front-ends taking the same free slot at once cannot both have it."""


class UserAccessUpdate(Message):
    slot: UserSlot
    channel: Channel
    privilege: Privilege | UnsetType = UNSET
    ipmi_messaging: bool | UnsetType = UNSET
    link_auth: bool | UnsetType = UNSET
    callback_only: bool | UnsetType = UNSET
    payloads: Byte | UnsetType = UNSET
    oem_payloads: Byte | UnsetType = UNSET


class PasswordSet(Message):
    slot: UserSlot
    password: Password | None
    """``None`` clears the password."""


class PasswordCheck(Message):
    """Check a password by slot or by user name (exactly one of the two)."""

    password: Password
    slot: UserSlot | None = None
    name: UserName | None = None


class PasswordCheckResult(Message):
    ok: bool
    user: User | None = None


class CredentialsRequest(Message):
    """Look a user up by slot or by name, for a front-end that needs the key (RAKP, IPMI 1.5)."""

    slot: UserSlot | None = None
    name: UserName | None = None


class Credentials(Message):
    user: User
    password: str | None


class ChannelRef(Message):
    channel: Channel
    volatile: bool = True


class ChannelAccess(Message):
    """Channel access settings (IPMI v2.0 §22.22/22.23), volatile or non-volatile."""

    channel: Channel
    volatile: bool
    access_mode: Annotated[int, msgspec.Meta(ge=0, le=3)] = 2
    """0 disabled, 1 pre-boot only, 2 always available, 3 shared."""
    user_auth: bool = True
    per_message_auth: bool = True
    alerting: bool = False
    privilege_limit: Privilege = 4


class ChannelAccessUpdate(Message):
    channel: Channel
    volatile: bool = True
    access_mode: Annotated[int, msgspec.Meta(ge=0, le=3)] | UnsetType = UNSET
    user_auth: bool | UnsetType = UNSET
    per_message_auth: bool | UnsetType = UNSET
    alerting: bool | UnsetType = UNSET
    privilege_limit: Privilege | UnsetType = UNSET


class LanRef(Message):
    channel: Channel = 1


class LanConfig(Message):
    """LAN configuration parameters (IPMI v2.0 §23.2) as raw parameter bytes."""

    channel: Channel
    params: dict[int, bytes]


class LanParamSet(Message):
    param: Byte
    data: bytes
    channel: Channel = 1


class SolConfig(Message):
    """SOL configuration parameters (IPMI v2.0 §26.3) as raw parameter bytes."""

    params: dict[int, bytes]


class SolParamSet(Message):
    param: Byte
    data: bytes


class KgKey(Message):
    """The BMC key K_G (IPMI v2.0 §13.31); ``None`` means unset (K_UID is used)."""

    key: Annotated[bytes, msgspec.Meta(max_length=20)] | None = None


class ChassisConfig(Message):
    """Chassis settings the BMC keeps: System Boot Options parameters as last set (IPMI v2.0
    §28.13, raw bytes by parameter number) and the power restore policy (§28.8: 0 stay off,
    1 restore, 2 power on)."""

    boot_params: dict[int, bytes] = {}
    restore_policy: Annotated[int, msgspec.Meta(ge=0, le=2)] = 0


class ChassisUpdate(Message):
    boot_params: dict[int, bytes] = {}
    """Parameters to set; the others are kept."""
    restore_policy: Annotated[int, msgspec.Meta(ge=0, le=2)] | UnsetType = UNSET


SelData = Annotated[bytes, msgspec.Meta(min_length=9, max_length=13)]


def sel_timestamped(record_type: int) -> bool:
    """System event (0x02) and OEM timestamped (0xC0-0xDF) records carry a timestamp (IPMI v2.0 §32)."""
    return record_type < 0xE0


class SelEntry(Message):
    """One System Event Log record (IPMI v2.0 §31, §32): its id, type, timestamp and what follows.
    ``data`` is the 9 bytes after the timestamp for timestamped types (for a system event record:
    generator id 2, EvM revision, sensor type, sensor number, event dir/type, event data 1-3), and
    the 13 bytes after the type for the others (0xE0-0xFF, OEM non-timestamped)."""

    record_id: int
    record_type: Byte = 0x02
    timestamp: int = 0
    data: SelData = bytes(9)


class SelAdd(Message):
    data: SelData
    """9 bytes for a timestamped type, 13 for the others (see :class:`SelEntry`)."""
    record_type: Byte = 0x02
    timestamp: int | None = None
    """Seconds since 1970; the state service's clock when absent."""


class StateChanged(Message):
    """A machine's BMC state changed (published after the change is stored, before the reply)."""

    machine: str
    area: Literal["users", "channel", "lan", "sol", "kg", "chassis", "sel"]
    timestamp: float


class SelLog(Message):
    entries: list[SelEntry]
    last_add: int = 0
    last_erase: int = 0
    capacity: int = 512

