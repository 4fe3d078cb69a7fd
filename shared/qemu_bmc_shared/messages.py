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
BootTarget = Literal["None", "Pxe", "Hdd", "Cd", "BiosSetup", "UefiTarget", "UefiBootNext"]
BootDeviceKind = Literal["Pxe", "Hdd", "Cd"]
BootEnabled = Literal["Disabled", "Once", "Continuous"]
BootMode = Literal["UEFI", "Legacy"]

UserSlot = Annotated[int, msgspec.Meta(ge=1, le=15)]
Channel = Annotated[int, msgspec.Meta(ge=0, le=15)]
Privilege = Annotated[int, msgspec.Meta(ge=1, le=15)]
Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
UserName = Annotated[str, msgspec.Meta(max_length=16)]
Password = Annotated[str, msgspec.Meta(max_length=20)]
SourceAddress = Annotated[str, msgspec.Meta(max_length=64)]


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
    """The boot override of the next boot(s). ``target`` UefiTarget boots the boot option whose
    UEFI device path is ``uefi_target``, UefiBootNext (Once only) the boot option ``boot_next``
    (a BootOptionReference); ``alias`` is then the kind of that option's device. ``mode`` is the
    boot mode (firmware) of the next boot, whatever the override."""

    target: BootTarget = "None"
    enabled: BootEnabled = "Disabled"
    mode: BootMode = "Legacy"
    uefi_target: str | None = None
    boot_next: str | None = None
    alias: BootDeviceKind | None = None


class BootOverrideUpdate(Message):
    target: BootTarget | UnsetType = UNSET
    enabled: BootEnabled | UnsetType = UNSET
    mode: BootMode | UnsetType = UNSET
    uefi_target: str | UnsetType | None = UNSET
    boot_next: str | UnsetType | None = UNSET


class BootOption(Message):
    """A device the machine can boot from (a Redfish BootOption)."""

    reference: str
    """``Boot0000``…, stable for the machine's command line."""
    kind: BootDeviceKind
    name: str
    uefi_path: str
    """The device's UEFI device path (text form, UEFI 2.10 §10.6)."""


class BootOptions(Message):
    options: list[BootOption]
    order: list[str]
    """The references in the machine's own boot order (its command line's bootindexes)."""


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
    architecture: str | None = "x86"
    """Redfish ProcessorArchitecture: x86, ARM, MIPS, Power, RISC-V (None: another target)."""
    instruction_set: str | None = "x86-64"
    """Redfish InstructionSet: x86, x86-64, ARM-A32, ARM-A64, MIPS32, MIPS64, PowerISA, RV32, RV64."""
    manufacturer: str | None = None
    """From the CPUID vendor the guest sees (``GenuineIntel``: Intel, ``AuthenticAMD``: AMD)."""


class MemoryModule(Message):
    """A block of the machine's RAM as QEMU has it: its boot memory (one per NUMA node when it has
    nodes) or a memory device (``query-memory-devices``). The sizes add up to the machine's memory."""

    id: str
    size_mib: int
    kind: str = "DRAM"
    """Redfish MemoryType: DRAM, or NVDIMM_N for persistent memory (``nvdimm``, ``virtio-pmem``)."""
    device: str | None = None
    """The QEMU memory device (``pc-dimm``, ``nvdimm``, ``virtio-mem`` …); None: boot memory."""
    node: int | None = None
    """The NUMA node it belongs to."""


class Disk(Message):
    """A disk QEMU gives the guest (``query-block`` with a medium, not a CD drive, not pflash)."""

    id: str
    """The device's qdev id, else its block device name (``ide0-hd0``, ``virtio0``)."""
    device: str
    """The QEMU device type (``ide-hd``, ``virtio-blk-pci``, ``scsi-hd``, ``nvme`` …)."""
    capacity_bytes: int | None
    """The virtual size (None: not known while QEMU is not running, e.g. a network image)."""
    protocol: str | None
    """Redfish Protocol of the drive: SATA (IDE on AHCI), SAS (SCSI), NVMe, PCIe (virtio-blk), USB."""
    controller: str
    """The id of the controller it hangs on (a virtio-blk or NVMe device is its own controller)."""
    controller_device: str
    """The controller's QEMU device type (``ich9-ahci``, ``virtio-scsi-pci`` …)."""
    media: Literal["HDD", "SSD"] = "HDD"
    """SSD for ``rotation_rate=1`` and NVMe."""
    read_only: bool = False
    model: str | None = None
    serial: str | None = None


class Nic(Message):
    """A network adapter of the machine."""

    id: str
    """Its network client name in QEMU (the qdev id, else ``<device type>.<n>``), what ``set_link`` takes."""
    mac: str
    device: str
    """The QEMU device type (``virtio-net-pci``, ``e1000`` …)."""
    enabled: bool = True
    """The link as the BMC set it (QMP ``set_link``); kept for the machine across QEMU restarts."""
    connected: bool = True
    """It has a network backend (``-netdev``) behind it."""
    speed_mbps: int | None = None


class Hardware(Message):
    """What the machine is made of, read from QEMU (kept until a device is added or removed, or
    QEMU is started again); while QEMU is not running, the last read of the same command line,
    else what the command line says."""

    machine: str
    processors: list[Processor]
    memory: list[MemoryModule]
    disks: list[Disk]
    nics: list[Nic]
    bios_version: str | None = None
    """A bare-metal identity's, else the firmware's (the SeaBIOS image's version, ``EDK II``)."""
    sku: str | None = None
    """A bare-metal identity's SKU, else QEMU's machine type (``pc-q35-7.2``)."""
    bios_manufacturer: str | None = None
    """Who made the firmware: a bare-metal identity's ``bios_vendor`` (else its ``vendor``: what the
    guest's SMBIOS says), else the firmware's project (``SeaBIOS``, ``TianoCore`` for OVMF)."""
    bios_updateable: bool = False
    """A firmware image can be installed for the boot mode the machine runs in (``firmware.update``)."""


class NicUpdate(Message):
    id: str
    enabled: bool


class FirmwareUpdate(Message):
    """Install a system firmware image (Redfish UpdateService SimpleUpdate): the machine service
    downloads it, checks that it is firmware for the boot mode the machine runs in (a SeaBIOS ROM
    for Legacy, OVMF code for UEFI), and launches the machine with it from its next boot on."""

    image_uri: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    """An http(s) URL."""
    username: str | None = None
    password: str | None = None
    """HTTP Basic credentials for the image's server (never sent to another host a redirect names)."""


class FirmwareUpdated(Message):
    """A firmware update done (a Redfish Task, completed when SimpleUpdate answers): the firmware
    the machine boots in ``mode`` from its next boot on. The machine service keeps the last ones."""

    number: int
    """Unique for the machine."""
    image_uri: str
    """Without credentials."""
    mode: BootMode
    version: str | None
    manufacturer: str | None
    requested: float
    finished: float
    restored: bool = False
    """The image is the machine's configured firmware: the installed update was removed."""
    next_boot: bool = True
    """The machine runs other firmware until its next boot (a reset or power-on launches QEMU again)."""


class FirmwareUpdates(Message):
    updates: list[FirmwareUpdated]


class SystemView(Message):
    """Power, boot override, inventory and hardware in one reply (what a Redfish ComputerSystem shows)."""

    power: PowerStatus
    boot: BootOverride
    inventory: Inventory
    hardware: Hardware | None = None
    boot_options: BootOptions | None = None


VolumeRaidType = Literal["None", "RAID0"]


class Volume(Message):
    """A disk the BMC made for the machine (a Redfish Volume created on one of its storage
    controllers): a qcow2 image in its runtime directory, given to QEMU from the next boot on."""

    id: str
    """Its QEMU device id and serial number (``qbmc-vol<n>``): the Redfish Volume and Drive Id."""
    controller: str
    """The storage controller it was created on (a Disk's ``controller``)."""
    capacity_bytes: int
    raid_type: VolumeRaidType
    name: str
    state: Literal["creating", "attached", "deleting"]
    """``creating``: QEMU gets it at the next boot; ``attached``: QEMU has it; ``deleting``: QEMU
    has it until the next boot, which removes it."""
    device: str
    """The QEMU device it is (``virtio-blk-pci``, ``ide-hd`` on an AHCI port, ``scsi-hd``)."""
    bus: str | None = None
    """The QEMU bus it sits on (``sata.2``, ``scsi0.0``); None: a PCI slot QEMU picks."""


class VolumeCreate(Message):
    controller: str
    capacity_bytes: Annotated[int, msgspec.Meta(gt=0)]
    """Rounded up to a whole 512-byte sector."""
    raid_type: VolumeRaidType = "None"
    name: Annotated[str, msgspec.Meta(max_length=64)] = ""


class VolumeDelete(Message):
    id: str


class VolumeTask(Message):
    """A volume creation or deletion (a Redfish Task): Pending until the machine's next boot
    applies it (DSP0266 "Operation apply time": OnReset), then Completed, or Exception when that
    boot could not apply it (``message`` says why; the machine booted without the change)."""

    number: int
    """Unique for the machine."""
    operation: Literal["create", "delete"]
    volume: str
    controller: str
    state: Literal["Pending", "Completed", "Exception"]
    requested: float
    finished: float | None = None
    message: str = ""


class VolumeList(Message):
    """The machine's volumes, its volume tasks (the pending ones and the last ones finished), and
    the storage controllers on which no volume can be created, each with the reason (the others
    of its hardware take new volumes)."""

    volumes: list[Volume]
    tasks: list[VolumeTask]
    cannot_create: dict[str, str]


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
    """Timer use expiration flags to clear (bit n: timer use n; bits 0, 6 and 7 reserved)."""


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
    """The watchdog reached its pre-timeout (``pretimeout``: ``action`` is the one set) or expired
    (``expired``: ``action`` is the one taken, ``none`` for a machine that was off)."""

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


# ---------------------------------------------------------------- graphical console (KVM) and screenshots

class KvmOpen(Message):
    """Open a graphical console stream (``kvm.open``): the machine service connects to QEMU's VNC
    server and sends what it says, as KvmOutput messages, to ``inbox`` (a subject of the front-end's)."""

    inbox: Annotated[str, msgspec.Meta(max_length=256, pattern=r"^(?!bmc\.)[A-Za-z0-9_.-]+$")]
    """A plain subject (no wildcards) outside ``bmc.``: the output goes nowhere a service listens."""
    control: bool = True
    """The viewer wants control (keys, pointer): its login allows it."""
    web: bool = False
    """A viewer of the web KVM page: the machine service takes kvm.WEB_VIEWERS of them per machine,
    whichever Redfish replicas serve them."""


class KvmOpened(Message):
    """The stream's id (for ``kvm.input.<stream>`` and ``kvm.ack.<stream>``) and its flow control
    window: the machine service sends at most ``window`` bytes the front-end has not acknowledged."""

    stream: str
    window: int
    control: bool = True
    """Control is granted (``kvm_control = "first"``: to one stream at a time; else to every
    stream that wants it); without it the front-end serves the viewer view-only."""


class KvmOutput(Message):
    """Bytes QEMU's VNC server sent on a stream, in order; ``end`` counts the stream's bytes up to
    the end of ``data`` (a gap means a message was lost: the front-end ends the stream). The last
    message of a stream has ``closed`` set and ``reason`` says why it ended."""

    data: bytes
    end: int
    closed: bool = False
    reason: str = ""


class KvmInput(Message):
    """Bytes for QEMU's VNC server (a request on ``kvm.input.<stream>``, answered Empty once
    they are written; in order, one at a time)."""

    data: Annotated[bytes, msgspec.Meta(max_length=65536)]


class KvmAck(Message):
    """Published on ``kvm.ack.<stream>``: the front-end has taken ``received`` bytes of the stream
    (flow control); sent as a request it is also a keepalive (answered Empty). ``close`` ends the stream."""

    received: Annotated[int, msgspec.Meta(ge=0)]
    close: bool = False


class ScreenshotPart(Message):
    """Take a screenshot (no ``shot``), or ask for a part of one taken before (``display.screenshot``)."""

    shot: Annotated[str, msgspec.Meta(max_length=32)] = ""
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class Screenshot(Message):
    """The machine's screen as a PNG image (QMP ``screendump``), or the part of it from
    ``offset``: ``size`` is the whole image's; a PNG larger than one message is sent in parts,
    which the machine service keeps a while under the id ``shot`` for the requests of the others."""

    png: bytes
    size: int = 0
    shot: str = ""


# ---------------------------------------------------------------- VM-wire service (in-band IPMI over the bus)

class VmWireFrame(Message):
    """A message frame QEMU's ``ipmi-bmc-extern`` device sent on a managed machine's in-band link
    (``vmwire.frame``), as it came: escapes kept, its end marker included. ``link`` names the
    connection (a new one at every connect), ``number`` counts its frames: a retry of an
    unanswered frame sends the same pair, and the VM-wire service that runs it still answers it
    without running it twice. ``enables``: the system interface's BMC Global Enables (IPMI v2.0
    §22.1), which the link keeps, so that any VM-wire service (a restarted one, a replica) has them."""

    link: Annotated[str, msgspec.Meta(max_length=64)]
    number: int
    frame: Annotated[bytes, msgspec.Meta(max_length=605)]  # vmwire.MAX_WIRE_FRAME
    enables: Byte = 0x08


class VmWireGreeting(Message):
    """The bytes QEMU gets when its in-band link (re)connects (``vmwire.greeting``), for the
    link's BMC Global Enables."""

    enables: Byte = 0x08


class VmWireAnswer(Message):
    """What to write back to QEMU's chardev: a response frame and any control commands (the
    interrupt enable), or nothing for a malformed frame (QEMU answers the guest 0xC3 itself);
    and the link's BMC Global Enables after the request."""

    data: bytes
    enables: Byte


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
    password_change_required: bool = False
    """The user must change its password before anything else (Redfish ManagerAccount
    PasswordChangeRequired); any new password clears it."""
    password_changes: int = 0
    """Grows with every change of the password: a session made before it ends."""


class UserList(Message):
    users: list[User]


class UserRef(Message):
    slot: UserSlot


class UserUpdate(Message):
    slot: UserSlot
    name: UserName | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    password_change_required: bool | UnsetType = UNSET
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
    """Check a password by slot or by user name (exactly one of the two). With ``source`` (the
    client's address) the check is a login: refused while that user is locked out from that
    source, and counted towards the lockout when it fails (see :class:`AccountPolicy`)."""

    password: Password
    slot: UserSlot | None = None
    name: UserName | None = None
    source: SourceAddress | None = None


class PasswordCheckResult(Message):
    ok: bool
    user: User | None = None
    locked: bool = False
    """Refused without checking: the user is locked out from this source."""


class AccountPolicy(Message):
    """A machine's account policy (Redfish AccountService; the IPMI front-ends apply it too)."""

    lockout_threshold: int = 5
    """Failed logins of one user from one source that lock it out from there (0: never)."""
    lockout_duration: int = 60
    """Seconds the first lockout lasts; each following one, without a success between, twice as long
    (at most 16 times)."""
    lockout_reset_after: int = 60
    """Seconds after a user's last failed login from a source that its failure count restarts."""
    min_password_length: int = 8


class AccountPolicyUpdate(Message):
    lockout_threshold: Annotated[int, msgspec.Meta(ge=0, le=1000)] | UnsetType = UNSET
    lockout_duration: Annotated[int, msgspec.Meta(ge=0, le=86400)] | UnsetType = UNSET
    lockout_reset_after: Annotated[int, msgspec.Meta(ge=0, le=86400)] | UnsetType = UNSET
    min_password_length: Annotated[int, msgspec.Meta(ge=1, le=20)] | UnsetType = UNSET


class LoginAttempt(Message):
    """May ``name`` try to log in from ``source`` now? With no source: is it locked out anywhere?"""

    name: str
    source: SourceAddress | None = None


class LoginOutcome(Message):
    """A login a front-end checked itself (RAKP, IPMI 1.5 auth codes): a failure counts towards the
    lockout of (name, source), a success clears it."""

    name: str
    source: SourceAddress
    ok: bool


class LoginVerdict(Message):
    allowed: bool
    retry_after: float = 0.0
    """Seconds until the lockout ends (0 when allowed)."""


class LoginUnlock(Message):
    """End every lockout of a user (an administrator's ManagerAccount ``Locked: false``)."""

    name: UserName


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


AssetTag = Annotated[str, msgspec.Meta(max_length=64)]


class ChassisConfig(Message):
    """Chassis settings the BMC keeps: System Boot Options parameters as last set (IPMI v2.0
    §28.13, raw bytes by parameter number), the power restore policy (§28.8: 0 stay off,
    1 restore, 2 power on), the system's asset tag, and chassis identify (§28.5): on until
    ``identify_until`` (seconds since 1970 by the state service's host clock), or indefinitely
    while ``identify_forced``."""

    boot_params: dict[int, bytes] = {}
    restore_policy: Annotated[int, msgspec.Meta(ge=0, le=2)] = 0
    asset_tag: AssetTag = ""
    identify_until: float = 0.0
    identify_forced: bool = False


class ChassisUpdate(Message):
    boot_params: dict[int, bytes] = {}
    """Parameters to set; the others are kept."""
    restore_policy: Annotated[int, msgspec.Meta(ge=0, le=2)] | UnsetType = UNSET
    asset_tag: AssetTag | UnsetType = UNSET
    identify_seconds: Byte | UnsetType = UNSET
    """Chassis identify on for this many seconds from now (0: off)."""
    identify_forced: bool | UnsetType = UNSET
    """Chassis identify on until turned off (True), or as ``identify_seconds`` says (False)."""


class Ipv6Address(Message):
    """A static IPv6 address or default gateway of the BMC, with its prefix length."""

    address: str
    prefix_length: Annotated[int, msgspec.Meta(ge=0, le=128)] = 64


class ManagerSettings(Message):
    """The BMC's own settings besides its IPMI LAN parameters (Redfish Manager, EthernetInterface
    and ManagerNetworkProtocol): its names, DNS and NTP servers, static IPv6 configuration, and
    its clock. Each machine's BMC has its own; by default the host name is the machine's name."""

    host_name: str
    domain_name: str = ""
    name_servers: list[str] = []
    ntp_enabled: bool = False
    ntp_servers: list[str] = []
    """Host names or IP addresses (kept for clients that configure them: no NTP client runs)."""
    ipv6_addresses: list[Ipv6Address] = []
    ipv6_gateways: list[Ipv6Address] = []
    clock_offset: float = 0.0
    """Seconds the BMC's clock (SEL time, Redfish DateTime) is ahead of the state service's host clock."""
    local_offset: str = "+00:00"
    """The BMC's local time offset from UTC, ``[+-]hh:mm`` (Redfish DateTimeLocalOffset)."""


class ManagerSettingsUpdate(Message):
    """Any of the :class:`ManagerSettings` to change (checked by the state service: ``bad_request``
    naming what is wrong, nothing changed then)."""

    host_name: str | UnsetType = UNSET
    domain_name: str | UnsetType = UNSET
    name_servers: list[str] | UnsetType = UNSET
    ntp_enabled: bool | UnsetType = UNSET
    ntp_servers: list[str] | UnsetType = UNSET
    ipv6_addresses: list[Ipv6Address] | UnsetType = UNSET
    ipv6_gateways: list[Ipv6Address] | UnsetType = UNSET
    clock: float | UnsetType = UNSET
    """Set the BMC's clock to this time (seconds since 1970): the state service keeps its difference
    from its own clock as ``clock_offset``."""
    local_offset: str | UnsetType = UNSET


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

