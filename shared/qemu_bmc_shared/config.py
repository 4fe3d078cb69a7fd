"""The TOML configuration, in the spirit of qqmgr.

::

    runtime_dir = "run"                 # default: .qemu-bmc beside the config file
    [nats]
    url = "nats://127.0.0.1:4222"
    [qemu]
    bin = "qemu-system-x86_64"
    [vars]
    images = "/var/lib/vms"
    [state]
    key_file = "/var/lib/qemu-bmc/state.key"
    default_user = "admin"              # or IPMI_USER; the password comes from IPMI_PASS
    [redfish]
    listen = "0.0.0.0:8443"
    [vm.node1]                          # managed: the service launches QEMU
    vars = { mem = "512" }
    cmd = ["-machine", "q35", "-m", "{{.mem}}", "-drive", "file={{.images}}/{{.name}}.qcow2"]
    ipmi = "127.0.0.1:6230"
    vmwire = "127.0.0.1:9002"
    [vm.node2]                          # attach: an existing QEMU's QMP socket
    qmp = "/run/node2/qmp.sock"
    serial = "/run/node2/serial.sock"
    media_device = "cd0"

Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .subjects import valid_machine_name

TEMPLATE = re.compile(r"\{\{\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
DEFAULT_QEMU = "qemu-system-x86_64"
DEMO_CMD = ["-machine", "q35", "-accel", "tcg", "-m", "128", "-display", "none"]


class ConfigError(Exception):
    """A configuration error, naming the file and the key."""


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
    media_device: str | None = None
    """The qdev id of the CD drive for virtual media (the managed launcher adds its own)."""
    ipmi: tuple[str, int] | None = None
    vmwire: tuple[str, int] | None = None
    uuid: str | None = None
    autostart: bool = False
    """Power the machine on when the machine service starts and finds it off."""


@dataclass(frozen=True)
class StateConfig:
    key_file: Path
    default_user: str
    default_password: str = field(repr=False)


@dataclass(frozen=True)
class IpmiConfig:
    """``[ipmi]``: IPMI over LAN security settings (the same for every machine)."""

    cipher_suite_0: bool = False
    auth_none: bool = False
    session_timeout: float = 60.0
    max_sessions: int = 32
    lockout_failures: int = 5
    lockout_window: float = 30.0
    lockout_time: float = 60.0


@dataclass(frozen=True)
class Config:
    path: Path | None
    runtime_dir: Path
    nats_url: str | None
    vms: dict[str, VmConfig]
    state: StateConfig
    redfish_listen: str | None = None
    ipmi: IpmiConfig = field(default_factory=IpmiConfig)

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


def _vars_of(reader: _Reader, key: str) -> dict[str, str]:
    table = reader.table_of(key)
    for name, value in table.items():
        if not isinstance(value, str | int | float):
            raise reader.error(f"{key}.{name}", "must be a string or a number")
    return {name: str(value) for name, value in table.items()}


def _substitute(text: str, variables: dict[str, str], reader: _Reader, key: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            known = ", ".join(sorted(variables))
            raise reader.error(key, f"unknown template variable {{{{.{name}}}}} (known: {known})")
        return variables[name]

    return TEMPLATE.sub(replace, text)


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
    top = _Reader(file, "", data, {"runtime_dir", "nats", "qemu", "vars", "state", "redfish", "ipmi", "vm"})
    runtime_value = top.str("runtime_dir")
    runtime_dir = (_resolve(base, runtime_value) if runtime_value else default_runtime_dir(path)).absolute()

    nats = _Reader(file, "nats", top.table_of("nats"), {"url"})
    qemu = _Reader(file, "qemu", top.table_of("qemu"), {"bin"})
    qemu_bin = qemu.str("bin", DEFAULT_QEMU)
    global_vars = _vars_of(top, "vars")

    state = _Reader(file, "state", top.table_of("state"), {"key_file", "default_user"})
    key_file = state.str("key_file")
    default_user = state.str("default_user") or os.environ.get("IPMI_USER") or "admin"
    if len(default_user.encode()) > 16:
        raise state.error("default_user", "an IPMI user name has at most 16 bytes")
    default_password = os.environ.get("IPMI_PASS", "password")
    if len(default_password.encode()) > 20:
        raise ConfigError("IPMI_PASS: an IPMI password has at most 20 bytes")

    redfish = _Reader(file, "redfish", top.table_of("redfish"), {"listen"})
    redfish.address("listen")
    ipmi = _parse_ipmi(_Reader(file, "ipmi", top.table_of("ipmi"), set(IpmiConfig.__dataclass_fields__)))

    vms: dict[str, VmConfig] = {}
    vm_tables = top.table_of("vm")
    for name, table in vm_tables.items():
        if not isinstance(table, dict):
            raise top.error(f"vm.{name}", "must be a table")
        if not valid_machine_name(name):
            raise top.error(f"vm.{name}", "a machine name is 1-63 letters, digits, '-' or '_', starting with a "
                            "letter or digit")
        vms[name] = _parse_vm(file, base, name, table, runtime_dir, qemu_bin, global_vars)

    return Config(
        path=path,
        runtime_dir=runtime_dir,
        nats_url=nats.str("url"),
        vms=vms,
        state=StateConfig(
            key_file=_resolve(base, key_file) if key_file else runtime_dir / "state" / "secret.key",
            default_user=default_user,
            default_password=default_password,
        ),
        redfish_listen=redfish.str("listen"),
        ipmi=ipmi,
    )


def _parse_ipmi(reader: _Reader) -> IpmiConfig:
    values: dict[str, Any] = {}
    for name, default in IpmiConfig().__dict__.items():
        if name not in reader.table:
            continue
        value = reader.table[name]
        if isinstance(default, bool):
            values[name] = reader.bool(name)
        elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise reader.error(name, f"must be a positive number, not {value!r}")
        else:
            values[name] = type(default)(value)
    return IpmiConfig(**values)


def _parse_vm(file: str, base: Path, name: str, table: dict[str, Any], runtime_dir: Path, qemu_bin: str,
              global_vars: dict[str, str]) -> VmConfig:
    vm = _Reader(file, f"vm.{name}", table,
                 {"cmd", "vars", "bin", "qmp", "serial", "media_device", "ipmi", "vmwire", "uuid", "autostart"})
    vm_runtime = runtime_dir / "vm" / name
    variables = {**global_vars, **_vars_of(vm, "vars"), "name": name, "runtime_dir": str(vm_runtime),
                 "config_dir": str(base)}
    cmd, qmp = vm.str_list("cmd"), vm.str("qmp")
    if (cmd is None) == (qmp is None):
        raise vm.error("cmd", "give exactly one of cmd (managed: qemu-bmc launches QEMU) "
                       "or qmp (attach: the QMP socket of a running QEMU)")
    uuid = vm.str("uuid")
    if uuid is not None and not re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", uuid):
        raise vm.error("uuid", f"not a UUID: {uuid!r}")
    common: dict[str, Any] = dict(name=name, runtime_dir=vm_runtime, ipmi=vm.address("ipmi"),
                                  vmwire=vm.address("vmwire"), uuid=uuid, media_device=vm.str("media_device"),
                                  autostart=vm.bool("autostart"))
    if cmd is not None:
        if vm.str("serial") is not None:
            raise vm.error("serial", "only for attach mode: the managed launcher makes its own serial socket")
        argv = [vm.str("bin", qemu_bin) or qemu_bin]
        argv += [_substitute(arg, variables, vm, f"cmd[{index}]") for index, arg in enumerate(cmd)]
        return VmConfig(mode="managed", argv=argv, **common)
    serial = vm.str("serial")
    return VmConfig(mode="attach", qmp=_resolve(base, _substitute(qmp or "", variables, vm, "qmp")),
                    serial=_resolve(base, serial) if serial else None, **common)


def load(path: str | Path | None) -> Config:
    """Load a config file, or the demo config (one small managed VM) when ``path`` is None."""
    if path is None:
        return parse({"vm": {"demo": {"cmd": DEMO_CMD, "autostart": True}}}, None)
    path = Path(path).absolute()
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path)
