"""The bus messages: one msgspec Struct per message, used by both ends.

Encoded as JSON (``bytes`` fields as base64), so ``nats req`` shows them readably.
Partial updates use ``msgspec.UNSET`` for the fields a request leaves alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

PowerState = Literal["On", "Off"]
PowerAction = Literal["on", "off", "soft", "reset", "cycle", "nmi", "graceful_restart"]
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
    """A power action. ``soft`` presses the ACPI power button and ``graceful_restart`` does too,
    then powers on once the guest is off; either gives up after the machine's graceful time-out
    (a shutdown leaves the machine on, a restart resets it) and is cancelled by any later power
    request. ``reset`` of a machine that is off is refused, unless ``on_if_off`` (Redfish's
    ForceRestart, which real BMCs answer by powering on)."""

    action: PowerAction
    on_if_off: bool = False


class PowerEvent(Message):
    machine: str
    state: PowerState
    cause: str
    """The QMP event (``SHUTDOWN``, ``RESET`` …), ``launched``, ``exited``, ``connected``,
    ``disconnected``, or ``graceful-timeout`` (the guest ignored the power button of a graceful
    shutdown or restart for the machine's graceful time-out)."""
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


class EnvironmentModel(Message):
    """The nominal readings of a machine's power and thermal sensors while it is on (from its
    config, ``[vm.NAME.environment]``: a VM has no sensors, these are a model); off, it draws 0 W
    and every temperature is the intake's."""

    power_watts: float = 100.0
    cpu_celsius: float = 45.0
    board_celsius: float = 35.0
    intake_celsius: float = 25.0


class Inventory(Message):
    machine: str
    uuid: str
    memory_mib: int
    cpus: int
    macs: list[str]
    firmware: BootMode
    """The firmware the machine runs (its QEMU is launched with), or will run at its next power-on."""
    firmwares: list[BootMode] = []
    """The boot modes the machine can be switched to (both for a managed machine when OVMF is
    installed; attach mode: its own firmware's)."""
    manufacturer: str = "QEMU"
    model: str = "QEMU virtual machine"
    serial: str | None = None
    """The SMBIOS system strings the guest sees (a bare-metal identity's, when configured);
    the serial number is the UUID when None."""
    bare_metal: bool = False
    environment: EnvironmentModel = msgspec.field(default_factory=EnvironmentModel)


class Processor(Message):
    """One CPU socket of the machine (QMP ``query-cpus-fast``; its CPUs' ``model-id``)."""

    socket: int
    cores: int
    threads: int
    """Logical processors in the socket (cores × threads per core)."""
    model: str
    architecture: str = "x86"
    """Redfish ProcessorArchitecture: x86, ARM, MIPS, Power, RISC-V."""
    instruction_set: str = "x86-64"
    """Redfish InstructionSet: x86, x86-64, IA-64, ARM-A32, ARM-A64, MIPS32, MIPS64, PowerISA, RV64 …"""


class MemoryModule(Message):
    """A block of the machine's RAM as QEMU has it: its boot memory (per NUMA node when it has
    nodes) or a memory device (``query-memory-devices``)."""

    id: str
    size_mib: int
    kind: str = "DRAM"


class Disk(Message):
    """A disk QEMU gives the guest (``query-block`` with a medium, not a CD drive)."""

    id: str
    """The device's qdev id (or its QOM path's last element)."""
    device: str
    """The QEMU device type (``ide-hd``, ``virtio-blk-pci``, ``scsi-hd``, ``nvme`` …)."""
    capacity_bytes: int
    protocol: str
    """Redfish Protocol of the drive: SATA, SAS, NVMe, PCIe (virtio), USB."""
    media: Literal["HDD", "SSD"] = "HDD"
    read_only: bool = False


class Nic(Message):
    """A network adapter of the machine."""

    id: str
    mac: str
    device: str
    """The QEMU device type (``virtio-net-pci``, ``e1000`` …)."""
    enabled: bool = True
    """The link as the BMC set it (QMP ``set_link``)."""
    connected: bool = True
    """It has a network backend (``-netdev``) behind it."""
    speed_mbps: int | None = None


class Hardware(Message):
    """What the machine is made of, read from QEMU (kept until a device is added or removed, or
    QEMU is started again); from the command line while QEMU is not running."""

    machine: str
    processors: list[Processor]
    memory: list[MemoryModule]
    disks: list[Disk]
    nics: list[Nic]
    bios_version: str | None = None


class NicUpdate(Message):
    id: str
    enabled: bool


class SystemView(Message):
    """Power, boot override, inventory and hardware in one reply (what a Redfish ComputerSystem shows)."""

    power: PowerStatus
    boot: BootOverride
    inventory: Inventory
    hardware: Hardware | None = None


WatchdogAction = Literal["none", "reset", "off", "cycle"]
WatchdogPretimeout = Literal["none", "smi", "nmi", "interrupt"]


class WatchdogSet(Message):
    """Set Watchdog Timer (IPMI v2.0 §27.6), decoded."""

    timer_use: Annotated[int, msgspec.Meta(ge=1, le=5)]
    """1 BIOS FRB2, 2 BIOS/POST, 3 OS load, 4 SMS/OS, 5 OEM."""
    countdown: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    """Initial countdown, in 100 ms."""
    dont_log: bool = False
    dont_stop: bool = False
    """A running timer keeps running (with the new countdown); otherwise Set stops it."""
    action: WatchdogAction = "none"
    pretimeout: WatchdogPretimeout = "none"
    pretimeout_seconds: Byte = 0
    clear_flags: Annotated[int, msgspec.Meta(ge=0, le=0x3E)] = 0
    """Timer use expiration flags to clear (bit n: timer use n)."""


class WatchdogStatus(Message):
    """Get Watchdog Timer (IPMI v2.0 §27.7): the settings, whether it runs, what is left."""

    timer_use: int = 0
    """0: never set (Reset Watchdog Timer then answers 80h)."""
    running: bool = False
    dont_log: bool = False
    action: WatchdogAction = "none"
    pretimeout: WatchdogPretimeout = "none"
    pretimeout_seconds: int = 0
    expiration_flags: int = 0
    countdown: int = 0
    remaining: int = 0
    """The present countdown, in 100 ms."""
    pretimeout_occurred: bool = False
    """Get Message Flags bit 3 (IPMI v2.0 §22.4), until cleared."""


class WatchdogEvent(Message):
    """The watchdog expired (``expired``, the action taken) or reached its pre-timeout."""

    machine: str
    phase: Literal["pretimeout", "expired"]
    timer_use: int
    action: WatchdogAction
    pretimeout: WatchdogPretimeout
    dont_log: bool
    timestamp: float


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
    area: Literal["users", "channel", "lan", "sol", "kg", "chassis", "manager", "sel"]
    timestamp: float


class SelLog(Message):
    entries: list[SelEntry]
    last_add: int = 0
    last_erase: int = 0
    capacity: int = 512

