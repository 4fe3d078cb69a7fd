"""The TOML configuration, in the spirit of qqmgr.

::

    runtime_dir = "run"                 # default: .qemu-bmc beside the config file
    [nats]
    url = "nats://127.0.0.1:4222"
    [qemu]
    bin = "qemu-system-x86_64"
    ovmf_code = "/usr/share/OVMF/OVMF_CODE_4M.fd"   # UEFI firmware for boot mode switching (found
    ovmf_vars = "/usr/share/OVMF/OVMF_VARS_4M.fd"   # in the usual places when not given)
    [vars]
    images = "/var/lib/vms"
    [state]
    key_file = "/var/lib/qemu-bmc/state.key"
    default_user = "admin"              # or IPMI_USER; the password comes from IPMI_PASS
    [redfish]
    listen = "0.0.0.0:8443"             # every address (default: 127.0.0.1:8443, loopback only); HTTPS:
    tls = true                          # false for HTTP; cert_file/key_file, or self-signed
    host_name = "bmc.example.com"       # clients' name for it: in the self-signed certificate too
    password_change_required = false    # true: accounts made over Redfish must change their password first
    max_body_bytes = 1048576            # larger request bodies: 413
    allow_internal_targets = false      # true: images and event destinations on loopback, link-local… too
    [ssh]                               # ssh_config options for every VM (`qemu-bmc vm ssh/put/get`)
    User = "root"
    StrictHostKeyChecking = "no"
    [vm.node1]                          # managed: the service launches QEMU
    vars = { mem = "512" }
    cmd = ["-machine", "q35", "-m", "{{.mem}}", "-drive", "file={{.images}}/{{.name}}.qcow2",
           "-nic", "user,hostfwd=tcp:127.0.0.1:{{.vm.ssh.port}}-:{{.vm.ssh.vm_port}}"]
    ipmi = "127.0.0.1:6230"
    vmwire = true                       # in-band IPMI (KCS), carried over the bus (docs/vmwire.md)
    vnc = "127.0.0.1:5901"              # a VNC listener for the graphical console (docs/console.md),
    vnc_password = "secret"             # with this password (VNC Authentication: 1-8 characters)
    kvm_control = "all"                 # "first": one graphical console viewer at a time has control
    graceful_timeout = 60               # seconds a guest has to obey the ACPI power button
    volume_space = 64                   # GiB of disks Redfish may create for the machine (0: none)
    bare_metal_identity = true          # SMBIOS strings below, no VM markers (managed mode only)
    [vm.node1.identity]                 # all optional: vendor, product, version, serial, sku, family,
    vendor = "Example Inc."             # board_vendor, board_product, chassis_vendor, bios_vendor,
    product = "R100"                    # bios_version, bios_date, cpu_model
    [vm.node1.environment]              # the nominal readings of the Redfish power and thermal sensors
    power_watts = 150                   # while the machine is on (off: 0 W, and every temperature the
    cpu_celsius = 50                    # intake's): power_watts, cpu_celsius, board_celsius,
                                        # intake_celsius
    [vm.node2]                          # attach: an existing QEMU's QMP socket
    qmp = "/run/node2/qmp.sock"
    serial = "/run/node2/serial.sock"
    vnc_socket = "/run/node2/vnc.sock"  # QEMU's -vnc unix:PATH: the graphical console
    media_device = "cd0"
    vmwire = "127.0.0.1:9003"           # attach: where QEMU's ipmi-bmc-extern chardev connects
    [vm.node1.ssh]                      # the VM's sshd: port on the host (mandatory), vm_port in the
    port = 2201                         # guest (22), and ssh_config options over the global ones
    IdentityFile = "~/.ssh/lab"

Every error names the file, the key and what is wrong. Two VMs (or a VM and the Redfish
listener) asking for the same host port are refused, naming both.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .subjects import valid_machine_name

log = logging.getLogger(__name__)
TEMPLATE = re.compile(r"\{\{\s*\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}\}")
DEFAULT_QEMU = "qemu-system-x86_64"
DEFAULT_QEMU_IMG = "qemu-img"
#: Where distributions install OVMF (code, variables template): Debian and Ubuntu, Fedora, Arch, openSUSE.
OVMF_FILES = (("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
              ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
              ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
              ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
              ("/usr/share/qemu/ovmf-x86_64-code.bin", "/usr/share/qemu/ovmf-x86_64-vars.bin"))
DEFAULT_GRACEFUL_TIMEOUT = 60.0
DEFAULT_VOLUME_SPACE_GIB = 64.0
#: The demo machine's guest (``qemu-bmc up`` with no config): a boot sector that prints a banner and
#: a login prompt on COM1 and the screen and echoes what it reads (source: demo/guest.asm). Its
#: one-sector disk gets a one-sector geometry (SeaBIOS boots no disk smaller than a cylinder otherwise).
DEMO_GUEST = Path(__file__).parent / "demo" / "guest.img"
DEMO_CMD = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none",
            "-drive", "if=none,id=demo,format=raw,readonly=on,file="
            + str(DEMO_GUEST).replace(",", ",,"),
            "-device", "virtio-blk-pci,drive=demo,id=disk0,bootindex=1,cyls=1,heads=1,secs=1"]
#: The demo: machine node1 with IPMI over LAN and in-band IPMI, Redfish on loopback (the default).
DEMO_CONFIG: dict[str, Any] = {"vm": {"node1": {"cmd": DEMO_CMD, "autostart": True, "ipmi": "127.0.0.1:6230",
                                                "vmwire": True}}}
DEFAULT_PASSWORD = "password"
"""The first administrator's password when ``IPMI_PASS`` is not set."""


class ConfigError(Exception):
    """A configuration error, naming the file and the key."""


# The prefixes systemd-detect-virt looks for in the DMI strings (src/basic/virt.c, dmi_vendor_table).
VM_DMI_MARKERS = ("KVM", "OpenStack", "KubeVirt", "Amazon EC2", "QEMU", "VMware", "VMW", "innotek GmbH",
                  "VirtualBox", "Oracle Corporation", "Xen", "Bochs", "Parallels", "BHYVE", "Hyper-V",
                  "Apple Virtualization", "Google Compute Engine")


@dataclass(frozen=True)
class Identity:
    """``[vm.NAME.identity]``: what a ``bare_metal_identity`` machine says it is (SMBIOS types 0-3).

    The board, chassis and BIOS vendor default to ``vendor``, the board product to ``product``; the
    serial (system, board and chassis) to the machine's UUID when not set; sku and family are then
    left unset ("Not Specified").
    """

    vendor: str = "Generic"
    product: str = "Server"
    version: str = "1.0"
    serial: str | None = None
    sku: str | None = None
    family: str | None = None
    board_vendor: str | None = None
    board_product: str | None = None
    chassis_vendor: str | None = None
    bios_vendor: str | None = None
    bios_version: str = "1.0"
    bios_date: str = "01/01/2024"
    cpu_model: str | None = None
    """The CPU model name (``/proc/cpuinfo``); default: the CPU model's own."""


IDENTITY_KEYS = set(Identity.__dataclass_fields__)
# The identity strings systemd-detect-virt reads: sys_vendor, product_name, product_version, board_vendor,
# bios_vendor (board_product and chassis_vendor are not read, but are DMI strings too).
_DETECTED_KEYS = {"vendor", "product", "version", "board_vendor", "bios_vendor", "board_product", "chassis_vendor"}


@dataclass(frozen=True)
class Environment:
    """``[vm.NAME.environment]``: the nominal readings of the machine's power and thermal sensors
    while it is on (a VM has no sensors: these are a model, not measurements). While it is off
    it draws 0 W and every temperature is the intake's."""

    power_watts: float = 100.0
    cpu_celsius: float = 45.0
    board_celsius: float = 35.0
    intake_celsius: float = 25.0


SshValue = str | int | bool | list[str]
SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
#: ssh_config keywords a VM's generated block sets itself, or that would end it.
SSH_RESERVED = {"host", "match", "port", "include"}


@dataclass(frozen=True)
class SshConfig:
    """``[vm.NAME.ssh]``: the VM's sshd, reached on ``port`` of the host (a QEMU ``hostfwd``
    usually) and ``vm_port`` in the guest; ``options`` are ssh_config options, the global
    ``[ssh]`` ones with the VM's own over them."""

    port: int
    vm_port: int = 22
    options: dict[str, SshValue] = field(default_factory=dict)


@dataclass(frozen=True)
class VmConfig:
    name: str
    mode: Literal["managed", "attach"]
    runtime_dir: Path
    argv: list[str] = field(default_factory=list)
    """Managed mode: the QEMU binary and its arguments, templates substituted."""
    qmp: Path | None = None
    """Attach mode: the QMP socket of a QEMU the operator runs."""
    serial: Path | None = None
    vnc_socket: Path | None = None
    """Attach mode: the unix socket of QEMU's VNC server (its ``-vnc unix:PATH``), the graphical console."""
    media_device: str | None = None
    """The qdev id of the CD drive for virtual media (the managed launcher adds its own)."""
    ipmi: tuple[str, int] | None = None
    vmwire: tuple[str, int] | None = None
    """``vmwire = "host:port"``: in attach mode, where the VM-wire service listens for QEMU's
    ipmi-bmc-extern chardev; on a managed machine it only turns in-band IPMI on (nothing listens)."""
    inband: bool = False
    """In-band IPMI (a KCS interface whose BMC is the VM-wire service): ``vmwire = true`` or an
    address. A managed machine's goes over the bus (the machine service owns QEMU's chardev)."""
    uuid: str | None = None
    autostart: bool = False
    """Power the machine on when the machine service starts and finds it off."""
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    """Seconds the guest has to shut down after the ACPI power button of a graceful shutdown or
    restart; then a restart becomes a reset, a shutdown gives up (the machine stays on)."""
    environment: Environment = field(default_factory=Environment)
    ovmf: tuple[Path, Path] | None = None
    """Managed mode: OVMF's code and variables template, for booting in UEFI mode (None: not found)."""
    ssh: SshConfig | None = None
    identity: Identity | None = None
    """Managed mode, ``bare_metal_identity = true``: the SMBIOS strings the guest sees instead of QEMU's,
    with the VM markers hidden (see the launcher's ``identity_args``)."""
    vnc: tuple[str, int] | None = None
    """``vnc = "host:port"``: where the IPMI over LAN service serves the graphical console to VNC
    viewers, with VNC Authentication by ``vnc_password``."""
    vnc_password: str | None = field(default=None, repr=False)
    kvm_control: Literal["all", "first"] = "all"
    """Who of a machine's graphical console viewers may type and point: ``all`` (each its login
    allows) or ``first`` (the first to open a stream while nobody has control; the others watch)."""
    volume_space_gib: float = 0.0
    """Managed mode: how much disk (GiB, in all) the BMC may create for the machine as Redfish
    Volumes (``volume_space``, 64 by default; 0: none)."""
    nics: tuple[str, ...] = ()
    """Managed mode, lab mode: host (or container) network interfaces handed to the VM, each as a
    virtio NIC of its own (see the machine service's host_nics)."""
    nic_mode: Literal["auto", "macvtap", "bridge"] = "auto"
    """How ``nics`` are handed over: a macvtap device, or a Linux bridge and a tap device; ``auto``:
    macvtap where the kernel offers it, else the bridge."""

    @property
    def bare_metal_identity(self) -> bool:
        return self.identity is not None


@dataclass(frozen=True)
class StateConfig:
    key_file: Path
    default_user: str
    default_password: str = field(repr=False)
    lockout_threshold: int = 5
    """The account policy a machine starts with (AccountService; ``[state]`` keys of the same names)."""
    lockout_duration: int = 60
    lockout_reset_after: int = 60
    min_password_length: int = 8


#: ``[state]`` account policy keys: (smallest, largest) value.
POLICY_RANGES = {"lockout_threshold": (0, 1000), "lockout_duration": (0, 86400), "lockout_reset_after": (0, 86400),
                 "min_password_length": (1, 20)}


@dataclass(frozen=True)
class RedfishConfig:
    """``[redfish]``: the Redfish service (one endpoint for every machine)."""

    listen: tuple[str, int] = ("127.0.0.1", 8443)
    """HTTPS on loopback unless ``listen`` says otherwise (``"0.0.0.0:8443"``: every address)."""
    tls: bool = True
    """HTTPS (the default), with ``cert_file``/``key_file``, or a self-signed certificate made at
    the first start and kept in the runtime directory; false: plain HTTP."""
    cert_file: Path | None = None
    key_file: Path | None = None
    host_name: str | None = None
    """The name (or address) clients reach the service by, put in the self-signed certificate's
    subject alternative names besides the host's name, localhost and 127.0.0.1."""
    session_timeout: int = 1800
    """Seconds a Redfish session lives without being used (SessionService.SessionTimeout)."""
    password_change_required: bool = False
    """Accounts created through Redfish start with PasswordChangeRequired: their first password is
    only good for setting another (DSP0266 "Password change required handling")."""
    max_sessions: int = 64
    """Redfish sessions open at once, all users together."""
    max_sessions_per_user: int = 16
    max_body_bytes: int = 1 << 20
    """The largest request body: a larger one is answered 413 (PayloadTooLarge) before it is read."""
    allow_internal_targets: bool = False
    """Virtual media and firmware images and event destinations may be on loopback, link-local,
    multicast or unspecified addresses, or on the BMC's own (refused by default)."""


#: IPMI 1.5 session authentication types by their ``[ipmi] auth_types`` name: the session header's
#: auth type code (IPMI v2.0 §13.6); §22.13 reports type n as bit n. MD2 is not implemented.
IPMI_AUTH_TYPES = {"none": 0x00, "MD5": 0x02, "straight": 0x04}
#: ``[ipmi]`` keys of earlier versions: auth_none and cipher_suite_0 are mapped to auth_types and
#: cipher_suites; the lockout is the state service's account policy now (``[state]``).
DEPRECATED_IPMI_KEYS = {"auth_none", "cipher_suite_0", "lockout_failures", "lockout_window", "lockout_time"}


@dataclass(frozen=True)
class IpmiConfig:
    """``[ipmi]``: IPMI over LAN security settings (the same for every machine)."""

    auth_types: tuple[str, ...] = ("MD5",)
    """IPMI 1.5 authentication types allowed (names of :data:`IPMI_AUTH_TYPES`); RMCP+ always is."""
    cipher_suites: tuple[int, ...] = (3, 17)
    """RMCP+ cipher suites offered (IPMI v2.0 table 22-20; those qemu-bmc implements)."""
    session_timeout: float = 60.0
    max_sessions: int = 32


@dataclass(frozen=True)
class Config:
    path: Path | None
    runtime_dir: Path
    nats_url: str | None
    vms: dict[str, VmConfig]
    state: StateConfig
    redfish: RedfishConfig = field(default_factory=RedfishConfig)
    ipmi: IpmiConfig = field(default_factory=IpmiConfig)
    qemu_img: str = DEFAULT_QEMU_IMG
    """``[qemu] img``: the qemu-img binary ``qemu-bmc vm disk`` runs."""

    @property
    def machine_names(self) -> list[str]:
        return sorted(self.vms)


class _Reader:
    """Typed access to one TOML table, with errors naming file and key."""

    def __init__(self, file: str, prefix: str, table: dict[str, Any], allowed: set[str]) -> None:
        self.file, self.prefix, self.table = file, prefix, table
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.error(unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def error(self, key: str, problem: str) -> ConfigError:
        where = f"{self.prefix}.{key}" if self.prefix else key
        return ConfigError(f"{self.file}: {where}: {problem}")

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self.table.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"must be a string, not {type(value).__name__}")
        return value

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def table_of(self, key: str) -> dict[str, Any]:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return value

    def str_list(self, key: str) -> list[str] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(key, "must be a list of strings")
        return value

    def address(self, key: str) -> tuple[str, int] | None:
        value = self.str(key)
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise self.error(key, f"must be \"host:port\", not {value!r}")
        return host.strip("[]"), int(port)


#: How many variables deep a value may name other variables (``a = "{{.b}}"``, ``b = "{{.c}}"``...).
MAX_TEMPLATE_DEPTH = 16


def _vars_of(reader: _Reader, key: str) -> dict[str, tuple[str, str]]:
    """A ``vars`` table, flattened: a nested table's values are ``{{.table.key}}`` (at any depth).
    Each name → (its text, which may hold templates itself; the config key it comes from)."""
    top = f"{reader.prefix}.{key}" if reader.prefix else key
    flat: dict[str, tuple[str, str]] = {}

    def walk(table: dict[str, Any], names: list[str]) -> None:
        for name, value in table.items():
            where = ".".join([top, *names, name])
            if isinstance(value, dict):
                walk(value, [*names, name])
            elif isinstance(value, bool):  # (before int: a bool is one) Go templates print true/false
                flat[".".join([*names, name])] = ("true" if value else "false", where)
            elif isinstance(value, str | int | float):
                flat[".".join([*names, name])] = (str(value), where)
            else:
                raise ConfigError(f"{reader.file}: {where}: must be a string, a number, true/false or a table "
                                  f"of them, not {value!r}")

    walk(reader.table_of(key), [])
    return flat


class _Templates:
    """The template variables of one VM: ``{{.name}}`` → its value, each value's own templates
    substituted in turn (at most MAX_TEMPLATE_DEPTH deep); errors name the file and the key."""

    def __init__(self, file: str, variables: dict[str, tuple[str, str]], fixed: dict[str, str]) -> None:
        self.file, self.variables = file, {**variables, **{name: (value, "") for name, value in fixed.items()}}
        self.resolved = dict(fixed)

    def substitute(self, text: str, where: str, chain: tuple[str, ...] = ()) -> str:
        """``text`` (found at config key ``where``) with its templates substituted."""
        leftover = TEMPLATE.sub("", text)
        if "{{" in leftover:
            start = leftover.index("{{")
            raise ConfigError(f"{self.file}: {where}: {leftover[start:start + 40]!r} is not a template qemu-bmc "
                              "substitutes ({{.name}}, {{.table.key}}, {{.vm.key}})")

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.variables:
                known = ", ".join(sorted(self.variables))
                raise ConfigError(f"{self.file}: {where}: unknown template variable {{{{.{name}}}}} (known: {known})")
            return self.value(name, chain)

        return TEMPLATE.sub(replace, text)

    def value(self, name: str, chain: tuple[str, ...]) -> str:
        if name in self.resolved:
            return self.resolved[name]
        text, where = self.variables[name]
        if name in chain:
            loop = " -> ".join(f"{{{{.{link}}}}}" for link in (*chain[chain.index(name):], name))
            raise ConfigError(f"{self.file}: {where}: template loop: {loop}")
        if len(chain) >= MAX_TEMPLATE_DEPTH:
            raise ConfigError(f"{self.file}: {where}: templates nested more than {MAX_TEMPLATE_DEPTH} deep")
        self.resolved[name] = self.substitute(text, where, (*chain, name))
        return self.resolved[name]


def _command_args(templates: _Templates, cmd: list[str], prefix: str) -> tuple[list[str], list[int]]:
    """QEMU's arguments from ``cmd``: each element's templates substituted, then, when it starts
    with "-", split into words as a shell splits them (``"-smp 2 -m 4096"`` is four arguments,
    quotes keep spaces: ``"-append 'console=ttyS0 quiet'"`` is two); an element that does not start
    with "-" is one argument as it is (an option's value: ``"console=ttyS0 quiet"``). Also, for each
    argument, the index of its element in ``cmd``."""
    args: list[str] = []
    elements: list[int] = []
    for index, element in enumerate(cmd):
        where = f"{prefix}.cmd[{index}]"
        text = templates.substitute(element, where)
        words = [text]
        if text.startswith("-"):
            try:
                words = shlex.split(text)
            except ValueError as exc:
                raise ConfigError(f"{templates.file}: {where}: cannot split {text!r} into arguments: {exc} "
                                  "(quotes must be closed)") from None
        args += words
        elements += [index] * len(words)
    return args, elements


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def default_runtime_dir(config_path: Path | None) -> Path:
    env = os.environ.get("QEMU_BMC_RUNTIME_DIR")
    if env:
        return Path(env)
    if config_path is not None:
        return config_path.parent / ".qemu-bmc"
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "qemu-bmc"


def parse(data: dict[str, Any], path: Path | None) -> Config:
    file = str(path) if path else "<demo config>"
    base = path.parent if path else Path.cwd()
    top = _Reader(file, "", data, {"runtime_dir", "nats", "qemu", "vars", "state", "redfish", "ipmi", "ssh", "vm"})
    runtime_value = top.str("runtime_dir")
    runtime_dir = (_resolve(base, runtime_value) if runtime_value else default_runtime_dir(path)).absolute()

    nats = _Reader(file, "nats", top.table_of("nats"), {"url"})
    qemu = _Reader(file, "qemu", top.table_of("qemu"), {"bin", "img", "ovmf_code", "ovmf_vars"})
    qemu_bin = qemu.str("bin", DEFAULT_QEMU)
    ovmf = _ovmf_files(qemu, base)
    global_vars = _vars_of(top, "vars")
    if "vm" in top.table_of("vars"):
        raise top.error("vars.vm", "reserved: {{.vm.KEY}} are the VM's own [vm.NAME.vars]")
    global_ssh = _ssh_options(_Reader(file, "ssh", top.table_of("ssh"), set(top.table_of("ssh"))), set())

    state = _Reader(file, "state", top.table_of("state"), {"key_file", "default_user", *POLICY_RANGES})
    policy = _policy(state)
    key_file = state.str("key_file")
    default_user = state.str("default_user") or os.environ.get("IPMI_USER") or "admin"
    if len(default_user.encode()) > 16:
        raise state.error("default_user", "an IPMI user name has at most 16 bytes")
    default_password = os.environ.get("IPMI_PASS", DEFAULT_PASSWORD)
    if len(default_password.encode()) > 20:
        raise ConfigError("IPMI_PASS: an IPMI password has at most 20 bytes")

    redfish = _Reader(file, "redfish", top.table_of("redfish"),
                      {"listen", "tls", "cert_file", "key_file", "host_name", "session_timeout",
                       "password_change_required",
                       "max_sessions", "max_sessions_per_user", "max_body_bytes", "allow_internal_targets"})
    cert_file, key_file = redfish.str("cert_file"), redfish.str("key_file")
    if (cert_file is None) != (key_file is None):
        raise redfish.error("cert_file" if cert_file is None else "key_file", "give both cert_file and key_file")
    session_timeout = redfish.table.get("session_timeout", RedfishConfig.session_timeout)
    if isinstance(session_timeout, bool) or not isinstance(session_timeout, int) or not 30 <= session_timeout <= 86400:
        raise redfish.error("session_timeout", f"must be seconds from 30 to 86400, not {session_timeout!r}")
    ipmi_reader = _Reader(file, "ipmi", top.table_of("ipmi"),
                          {*IpmiConfig.__dataclass_fields__, "range", *DEPRECATED_IPMI_KEYS})
    ipmi = _parse_ipmi(ipmi_reader)

    vms: dict[str, VmConfig] = {}
    vm_tables = top.table_of("vm")
    for name, table in vm_tables.items():
        if not isinstance(table, dict):
            raise top.error(f"vm.{name}", "must be a table")
        if not valid_machine_name(name):
            raise top.error(f"vm.{name}", "a machine name is 1-63 letters, digits, '-' or '_', starting with a "
                            "letter or digit")
        vms[name] = _parse_vm(file, base, name, table, runtime_dir, qemu_bin, global_vars, global_ssh, ovmf)

    if "range" in ipmi_reader.table:
        vms = _allocate_ipmi(ipmi_reader, vms)
    redfish_listen = redfish.address("listen") or RedfishConfig.listen
    _refuse_port_clashes(file, vms, redfish_listen)
    _refuse_bridged_nic_sharing(file, vms)
    return Config(
        path=path,
        runtime_dir=runtime_dir,
        nats_url=nats.str("url"),
        vms=vms,
        state=StateConfig(
            key_file=_resolve(base, key_file) if key_file else runtime_dir / "state" / "secret.key",
            default_user=default_user,
            default_password=default_password,
            **policy,
        ),
        redfish=RedfishConfig(listen=redfish_listen,
                              tls=redfish.bool("tls", True),
                              cert_file=_resolve(base, cert_file) if cert_file else None,
                              key_file=_resolve(base, key_file) if key_file else None,
                              host_name=redfish.str("host_name") or None,
                              session_timeout=session_timeout,
                              password_change_required=redfish.bool("password_change_required"),
                              max_sessions=_whole_number(redfish, "max_sessions", RedfishConfig.max_sessions, 1, 10000),
                              max_sessions_per_user=_whole_number(redfish, "max_sessions_per_user",
                                                                  RedfishConfig.max_sessions_per_user, 1, 10000),
                              max_body_bytes=_whole_number(redfish, "max_body_bytes", RedfishConfig.max_body_bytes,
                                                           1024, 1 << 30),
                              allow_internal_targets=redfish.bool("allow_internal_targets")),
        ipmi=ipmi,
        qemu_img=qemu.str("img", DEFAULT_QEMU_IMG) or DEFAULT_QEMU_IMG,
    )


def ipmi_range(reader: _Reader) -> list[tuple[str, int]]:
    """``[ipmi] range``: ``"HOST:FIRST-LAST"`` (ports on one address) or
    ``"FIRST_IP-LAST_IP:PORT"`` (one port on consecutive IPv4 addresses)."""
    text = reader.str("range") or ""
    problem = f'must be "host:first-last" or "first_ip-last_ip:port", not {text!r}'
    head, _, tail = text.rpartition(":")
    try:
        if "-" in tail:
            first, last = (int(part) for part in tail.split("-", 1))
            if not head or not 0 < first <= last < 65536:
                raise ValueError
            return [(head.strip("[]"), port) for port in range(first, last + 1)]
        low, high = (ipaddress.IPv4Address(part) for part in head.split("-", 1))
        port = int(tail)
        if not low <= high or not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise reader.error("range", problem) from None
    return [(str(ipaddress.IPv4Address(number)), port) for number in range(int(low), int(high) + 1)]


def _allocate_ipmi(reader: _Reader, vms: dict[str, VmConfig]) -> dict[str, VmConfig]:
    """Each VM without an ``ipmi`` address gets the next free one of the range, in config order
    (adding a VM at the end moves no other)."""
    taken = {vm.ipmi for vm in vms.values() if vm.ipmi}
    free = iter(address for address in ipmi_range(reader) if address not in taken)
    allocated = {}
    for name, vm in vms.items():
        if vm.ipmi is None:
            address = next(free, None)
            if address is None:
                wanting = sum(1 for vm in vms.values() if vm.ipmi is None)
                raise reader.error("range", f"too few addresses for the {wanting} machines without an ipmi address")
            vm = dataclasses.replace(vm, ipmi=address)
        allocated[name] = vm
    return allocated


def _whole_number(reader: _Reader, key: str, default: int, low: int, high: int) -> int:
    value = reader.table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise reader.error(key, f"must be a whole number from {low} to {high}, not {value!r}")
    return value


def _policy(reader: _Reader) -> dict[str, Any]:
    return {name: _whole_number(reader, name, 0, low, high) for name, (low, high) in POLICY_RANGES.items()
            if name in reader.table}


def _parse_ipmi(reader: _Reader) -> IpmiConfig:
    from .ipmi.core import CIPHER_SUITES  # (here: the IPMI package imports this module)

    values: dict[str, Any] = {}
    for name in ("session_timeout", "max_sessions"):
        if name not in reader.table:
            continue
        value = reader.table[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise reader.error(name, f"must be a positive number, not {value!r}")
        values[name] = type(getattr(IpmiConfig, name))(value)
    if values.get("max_sessions", 0) > 63:  # Get Session Info and Get Channel Info count them in 6 bits
        raise reader.error("max_sessions", f"must be at most 63, not {values['max_sessions']}")
    names = {name.lower(): name for name in IPMI_AUTH_TYPES} | {"password": "straight"}
    auth_types = list(IpmiConfig.auth_types)
    if "auth_types" in reader.table:
        listed = reader.str_list("auth_types") or []
        unknown = [name for name in listed if name.lower() not in names]
        if unknown:
            raise reader.error("auth_types", f"unknown or unimplemented authentication type {unknown[0]!r} "
                               f"(known: {', '.join(IPMI_AUTH_TYPES)})")
        auth_types = [names[name.lower()] for name in listed]
    suites = list(IpmiConfig.cipher_suites)
    if "cipher_suites" in reader.table:
        suites = reader.table["cipher_suites"]
        if not isinstance(suites, list) or not all(type(suite) is int and suite in CIPHER_SUITES for suite in suites):
            raise reader.error("cipher_suites", f"must be a list of cipher suite ids among "
                               f"{', '.join(map(str, CIPHER_SUITES))}, not {suites!r}")
    for name in sorted(DEPRECATED_IPMI_KEYS & set(reader.table)):
        value = reader.table[name]
        if name == "auth_none":
            auth_types += ["none"] if reader.bool(name) else []
            instead = 'auth_types = [..., "none"]'
        elif name == "cipher_suite_0":
            suites = [*suites, 0] if reader.bool(name) else suites
            instead = "cipher_suites = [0, ...]"
        else:
            instead = "the account policy ([state] lockout_threshold, lockout_duration, lockout_reset_after)"
        log.warning("%s: ipmi.%s = %r is deprecated%s; use %s", reader.file, name, value,
                    "" if name in ("auth_none", "cipher_suite_0") else " and ignored", instead)
    return IpmiConfig(auth_types=tuple(dict.fromkeys(auth_types)), cipher_suites=tuple(sorted(set(suites))),
                      **values)


def _ssh_options(reader: _Reader, own: set[str]) -> dict[str, SshValue]:
    """The ssh_config options of a ``[ssh]`` or ``[vm.NAME.ssh]`` table (``own``: its other keys)."""
    options: dict[str, SshValue] = {}
    for key, value in reader.table.items():
        if key in own:
            continue
        if not SSH_OPTION.match(key) or key.lower() in SSH_RESERVED:
            raise reader.error(key, "not an ssh_config option qemu-bmc passes on (port and vm_port are set in "
                               "[vm.NAME.ssh]; Host, Match and Include are not allowed)")
        if isinstance(value, list):
            if not all(isinstance(item, str) and item for item in value):
                raise reader.error(key, "a list of ssh option values must hold non-empty strings")
        elif not isinstance(value, str | int | bool) or value == "":
            raise reader.error(key, f"must be a string, a number, true/false or a list of strings, not {value!r}")
        options[key] = value
    return options


def _parse_ssh(vm: _Reader, global_ssh: dict[str, SshValue]) -> SshConfig | None:
    if "ssh" not in vm.table:
        return None
    reader = _Reader(vm.file, f"{vm.prefix}.ssh", vm.table_of("ssh"), set(vm.table_of("ssh")))
    ports = {}
    for key in ("port", "vm_port"):
        value = reader.table.get(key, 22 if key == "vm_port" else None)
        if value is None:
            raise reader.error(key, "missing: the host port the VM's sshd is forwarded to")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise reader.error(key, f"must be a port number (1-65535), not {value!r}")
        ports[key] = value
    own = _ssh_options(reader, {"port", "vm_port"})
    merged = {key: value for key, value in global_ssh.items() if key.lower() not in {k.lower() for k in own}}
    return SshConfig(port=ports["port"], vm_port=ports["vm_port"], options={**merged, **own})


def _ovmf_files(qemu: _Reader, base: Path) -> tuple[Path, Path] | None:
    """``[qemu] ovmf_code`` and ``ovmf_vars`` (both or neither), else the first pair installed."""
    code, variables = qemu.str("ovmf_code"), qemu.str("ovmf_vars")
    if (code is None) != (variables is None):
        raise qemu.error("ovmf_code" if code is None else "ovmf_vars", "give both ovmf_code and ovmf_vars")
    if code is not None and variables is not None:
        pair = (_resolve(base, code), _resolve(base, variables))
        for key, path in zip(("ovmf_code", "ovmf_vars"), pair, strict=True):
            if not path.is_file():
                raise qemu.error(key, f"no such file: {path}")
        return pair
    return next(((Path(code), Path(variables)) for code, variables in OVMF_FILES
                 if Path(code).is_file() and Path(variables).is_file()), None)


def _number(reader: _Reader, key: str, default: float, low: float, high: float) -> float:
    value = reader.table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise reader.error(key, f"must be a number from {low:g} to {high:g}, not {value!r}")
    return float(value)


def _parse_environment(vm: _Reader) -> Environment:
    reader = _Reader(vm.file, f"{vm.prefix}.environment", vm.table_of("environment"),
                     set(Environment.__dataclass_fields__))
    defaults = Environment()
    return Environment(power_watts=_number(reader, "power_watts", defaults.power_watts, 0, 100000),
                       **{key: _number(reader, key, getattr(defaults, key), -50, 150)
                          for key in ("cpu_celsius", "board_celsius", "intake_celsius")})


def _parse_vm(file: str, base: Path, name: str, table: dict[str, Any], runtime_dir: Path, qemu_bin: str,
              global_vars: dict[str, tuple[str, str]], global_ssh: dict[str, SshValue],
              ovmf: tuple[Path, Path] | None = None) -> VmConfig:
    vm = _Reader(file, f"vm.{name}", table,
                 {"cmd", "vars", "bin", "qmp", "serial", "vnc_socket", "media_device", "ipmi", "vmwire", "uuid",
                  "autostart", "bare_metal_identity", "identity", "ssh", "graceful_timeout", "environment",
                  "volume_space", "vnc", "vnc_password", "kvm_control", "nics", "nic_mode"})
    vm_runtime = runtime_dir / "vm" / name
    ssh = _parse_ssh(vm, global_ssh)
    vm_vars = _vars_of(vm, "vars")
    if "ssh" in vm.table_of("vars"):
        raise vm.error("vars.ssh", "reserved: {{.vm.ssh.port}} and {{.vm.ssh.vm_port}} come from [vm.NAME.ssh]")
    # {{.vm.KEY}} (qqmgr) and {{.KEY}} (over the global ones) are the VM's vars; the built-ins win
    fixed = {"name": name, "runtime_dir": str(vm_runtime), "config_dir": str(base)}
    if ssh is not None:
        fixed |= {"vm.ssh.port": str(ssh.port), "vm.ssh.vm_port": str(ssh.vm_port)}
    templates = _Templates(file, {**global_vars, **vm_vars, **{f"vm.{key}": value for key, value in vm_vars.items()}},
                           fixed)
    cmd, qmp = vm.str_list("cmd"), vm.str("qmp")
    if (cmd is None) == (qmp is None):
        raise vm.error("cmd", "give exactly one of cmd (managed: qemu-bmc launches QEMU) "
                       "or qmp (attach: the QMP socket of a running QEMU)")
    uuid = vm.str("uuid")
    if uuid is not None and not re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", uuid):
        raise vm.error("uuid", f"not a UUID: {uuid!r}")
    common: dict[str, Any] = dict(name=name, runtime_dir=vm_runtime, ipmi=vm.address("ipmi"),
                                  vmwire=_vmwire_address(vm, managed=cmd is not None),
                                  inband=vm.table.get("vmwire", False) is not False, uuid=uuid,
                                  media_device=vm.str("media_device"),
                                  autostart=vm.bool("autostart"), ssh=ssh,
                                  graceful_timeout=_number(vm, "graceful_timeout", DEFAULT_GRACEFUL_TIMEOUT, 1, 3600),
                                  **_vnc_listener(vm), kvm_control=_kvm_control(vm),
                                  environment=_parse_environment(vm))
    if cmd is not None:
        if vm.str("serial") is not None:
            raise vm.error("serial", "only for attach mode: the managed launcher makes its own serial socket")
        if vm.str("vnc_socket") is not None:
            raise vm.error("vnc_socket", "only for attach mode: the managed launcher gives QEMU its own VNC socket")
        args, elements = _command_args(templates, cmd, vm.prefix)
        argv = [vm.str("bin", qemu_bin) or qemu_bin, *args]
        identity = _parse_identity(vm, argv, elements) if vm.bool("bare_metal_identity") else None
        if identity is None and "identity" in table:
            raise vm.error("identity", "only with bare_metal_identity = true")
        return VmConfig(mode="managed", argv=argv, identity=identity, ovmf=ovmf,
                        volume_space_gib=_number(vm, "volume_space", DEFAULT_VOLUME_SPACE_GIB, 0, 1 << 20),
                        **_host_nics(vm), **common)
    for key in ("bare_metal_identity", "identity"):
        if key in table:
            raise vm.error(key, "only for managed mode (cmd): qemu-bmc does not build an attached QEMU's command "
                           "line, give its -smbios and -cpu options there")
    if "volume_space" in table:
        raise vm.error("volume_space", "only for managed mode (cmd): qemu-bmc cannot add disks to a QEMU it does "
                       "not launch")
    for key in ("nics", "nic_mode"):
        if key in table:
            raise vm.error(key, "only for managed mode (cmd): an attached QEMU's network is on its own command line")
    serial, vnc_socket = vm.str("serial"), vm.str("vnc_socket")
    return VmConfig(mode="attach", qmp=_resolve(base, templates.substitute(qmp or "", f"{vm.prefix}.qmp")),
                    serial=_resolve(base, serial) if serial else None,
                    vnc_socket=_resolve(base, vnc_socket) if vnc_socket else None, **common)


#: A Linux network interface name: at most 15 bytes (IFNAMSIZ less its NUL), no "/", ":" or white space.
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")


def _host_nics(vm: _Reader) -> dict[str, Any]:
    """``nics`` (host interface names, each once) and ``nic_mode`` ("auto", "macvtap" or "bridge")."""
    nics = vm.str_list("nics") or []
    for index, name in enumerate(nics):
        if not INTERFACE_NAME.fullmatch(name):
            raise vm.error(f"nics[{index}]", f"not a network interface name (1-15 of A-Z a-z 0-9 _ . -): {name!r}")
        if name in nics[:index]:
            raise vm.error(f"nics[{index}]", f"{name!r} is listed twice")
    mode = vm.str("nic_mode", "auto")
    if mode not in ("auto", "macvtap", "bridge"):
        raise vm.error("nic_mode", f'must be "auto", "macvtap" or "bridge", not {mode!r}')
    if "nic_mode" in vm.table and not nics:
        raise vm.error("nic_mode", "only with nics")
    return {"nics": tuple(nics), "nic_mode": mode}


def _kvm_control(vm: _Reader) -> Literal["all", "first"]:
    """``kvm_control``: "all" (the default) or "first" (shared mode: one viewer with control)."""
    value = vm.str("kvm_control", "all")
    if value == "all" or value == "first":
        return value
    raise vm.error("kvm_control", f'must be "all" or "first", not {value!r}')


def _vnc_listener(vm: _Reader) -> dict[str, Any]:
    """``vnc = "host:port"`` and its ``vnc_password`` (VNC Authentication keys are 8 bytes: 1-8
    printable ASCII characters); a listener without a password is refused, not served open."""
    address, password = vm.address("vnc"), vm.str("vnc_password")
    if address is not None and password is None:
        raise vm.error("vnc_password", "missing: the VNC listener (vnc) needs a password (1-8 characters)")
    if password is not None:
        if address is None:
            raise vm.error("vnc_password", 'only with vnc = "host:port" (the VNC listener it protects)')
        if not 1 <= len(password) <= 8 or not all(" " <= char <= "~" for char in password):
            raise vm.error("vnc_password", "must be 1-8 printable ASCII characters (VNC Authentication uses 8 bytes)")
    return {"vnc": address, "vnc_password": password}


def _vmwire_address(vm: _Reader, managed: bool) -> tuple[str, int] | None:
    """``vmwire``: true (managed machines only), false, or "host:port"."""
    value = vm.table.get("vmwire")
    if isinstance(value, bool):
        if value and not managed:
            raise vm.error("vmwire", 'attach mode needs the "host:port" QEMU\'s ipmi-bmc-extern chardev '
                           "connects to (true is for managed machines: over the bus)")
        return None
    if value is not None and not isinstance(value, str):
        raise vm.error("vmwire", f'must be true, false or "host:port", not {value!r}')
    return vm.address("vmwire")


WILDCARD_HOSTS = {"", "0.0.0.0", "::", "*"}


def _refuse_port_clashes(file: str, vms: dict[str, VmConfig], redfish_listen: tuple[str, int]) -> None:
    """Two listeners on the same port and protocol, on the same address or where one of them takes
    every address: the second one would fail at start, so the config is refused, naming both."""
    listeners: list[tuple[str, str, int, str]] = [("tcp", redfish_listen[0], redfish_listen[1], "redfish.listen")]
    for name, vm in vms.items():
        if vm.ssh is not None:  # a QEMU hostfwd without an address takes every address
            listeners.append(("tcp", "", vm.ssh.port, f"vm.{name}.ssh.port"))
        if vm.ipmi is not None:
            listeners.append(("udp", vm.ipmi[0], vm.ipmi[1], f"vm.{name}.ipmi"))
        if vm.vmwire is not None:
            listeners.append(("tcp", vm.vmwire[0], vm.vmwire[1], f"vm.{name}.vmwire"))
        if vm.vnc is not None:
            listeners.append(("tcp", vm.vnc[0], vm.vnc[1], f"vm.{name}.vnc"))
    seen: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for protocol, host, port, key in listeners:
        for other_host, other_key in seen.get((protocol, port), []):
            if host == other_host or host in WILDCARD_HOSTS or other_host in WILDCARD_HOSTS:
                raise ConfigError(f"{file}: {key}: {protocol.upper()} port {port} is already taken by {other_key}")
        seen.setdefault((protocol, port), []).append((host, key))


def _refuse_bridged_nic_sharing(file: str, vms: dict[str, VmConfig]) -> None:
    """A host interface joins one Linux bridge only: in bridge mode it goes to one machine (several
    machines may share an interface through macvtap)."""
    first: dict[str, tuple[str, VmConfig]] = {}
    for name, vm in vms.items():
        for index, interface in enumerate(vm.nics):
            if interface in first:
                other_name, other = first[interface]
                if "bridge" in (vm.nic_mode, other.nic_mode):
                    raise ConfigError(f"{file}: vm.{name}.nics[{index}]: {interface!r} is already vm.{other_name}'s, "
                                      'and in bridge mode a host interface goes to one machine (nic_mode = "macvtap" '
                                      "shares it)")
            else:
                first[interface] = (name, vm)


_SMBIOS_DATE = re.compile(r"(0[1-9]|1[0-2])/(0[1-9]|[12][0-9]|3[01])/[0-9]{4}")
_HYPERVISOR_ON = re.compile(r"(^|,)(\+hypervisor|hypervisor=(on|yes|true))(,|$)")


def _parse_identity(vm: _Reader, argv: list[str], elements: list[int]) -> Identity:
    """The ``identity`` table of a ``bare_metal_identity`` machine, checked against its command
    (``elements``: the ``cmd`` element each argument after the binary comes from)."""
    for index, (flag, value) in enumerate(itertools.pairwise([*argv[1:], ""])):
        if flag in ("-smbios", "--smbios"):
            raise vm.error(f"cmd[{elements[index]}]", "-smbios conflicts with bare_metal_identity = true: set the "
                           "strings in the identity table instead")
        if flag in ("-cpu", "--cpu") and _HYPERVISOR_ON.search(value.replace(",,", "")):
            raise vm.error(f"cmd[{elements[index + 1]}]", f"{value!r} turns the CPUID hypervisor bit on, which "
                           "bare_metal_identity = true hides")
    reader = _Reader(vm.file, f"{vm.prefix}.identity", vm.table_of("identity"), IDENTITY_KEYS)
    values: dict[str, str] = {}
    for key in sorted(reader.table):
        value = reader.str(key) or ""
        if not value or len(value) > 64 or not all(" " <= char <= "~" for char in value):
            raise reader.error(key, f"must be 1-64 printable ASCII characters, not {value!r}")
        if key in _DETECTED_KEYS:
            marker = next((m for m in VM_DMI_MARKERS if value.startswith(m)), None)
            if marker:
                raise reader.error(key, f"{value!r} starts with {marker!r}, which systemd-detect-virt takes for "
                                   "a virtual machine")
        values[key] = value
    if len(values.get("cpu_model", "")) > 48:
        raise reader.error("cpu_model", "a CPU model name (the CPUID brand string) has at most 48 characters")
    if "bios_date" in values and not _SMBIOS_DATE.fullmatch(values["bios_date"]):
        raise reader.error("bios_date", f"must be MM/DD/YYYY (the SMBIOS format), not {values['bios_date']!r}")
    return Identity(**values)


def find_config(explicit: str | Path | None) -> Path | None:
    """The config file: ``explicit`` (``-c``, or QEMU_BMC_CONFIG), else ``./qemu-bmc.toml``, else
    qqmgr's ``./qqmgr.toml``, else ``~/.config/qemu-bmc/config.toml``, else qqmgr's
    ``~/.config/qqmgr/conf.toml`` (``$XDG_CONFIG_HOME`` for ``~/.config`` when set); None when there
    is none. A folder's own config wins over the user's, and qemu-bmc's over qqmgr's."""
    if explicit:
        return Path(explicit)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for candidate in (Path("qemu-bmc.toml"), Path("qqmgr.toml"), config_home / "qemu-bmc" / "config.toml",
                      config_home / "qqmgr" / "conf.toml"):
        if candidate.is_file():
            return candidate.absolute()
    return None


def load(path: str | Path | None) -> Config:
    """Load a config file, or the demo config (one small managed VM) when ``path`` is None."""
    if path is None:
        return parse(DEMO_CONFIG, None)
    path = Path(path).absolute()
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path)
