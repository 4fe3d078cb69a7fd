"""Configuration: templates, modes, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_bmc_shared.config import ConfigError, load


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bmc.toml"
    path.write_text(text)
    return path


def test_templates_modes_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("QEMU_BMC_RUNTIME_DIR", raising=False)
    path = config_file(tmp_path, """
[qemu]
bin = "/opt/qemu/bin/qemu-system-x86_64"
[vars]
images = "/var/lib/vms"
mem = "256"
[redfish]
listen = "0.0.0.0:8443"
[vm.node1]
vars = { mem = 512 }
cmd = ["-m", "{{.mem}}", "-drive", "file={{ .images }}/{{.name}}.qcow2", "-pidfile", "{{.runtime_dir}}/x"]
ipmi = "127.0.0.1:6230"
vmwire = "127.0.0.1:9002"
[vm.node2]
qmp = "node2/qmp.sock"
media_device = "cd0"
""")
    config = load(path)
    node1, node2 = config.vms["node1"], config.vms["node2"]
    assert config.runtime_dir == tmp_path / ".qemu-bmc"
    assert node1.mode == "managed" and node1.argv == [
        "/opt/qemu/bin/qemu-system-x86_64", "-m", "512", "-drive", "file=/var/lib/vms/node1.qcow2",
        "-pidfile", f"{tmp_path}/.qemu-bmc/vm/node1/x"]
    assert node1.ipmi == ("127.0.0.1", 6230) and node1.vmwire == ("127.0.0.1", 9002)
    assert node2.mode == "attach" and node2.qmp == tmp_path / "node2" / "qmp.sock" and node2.media_device == "cd0"
    assert config.redfish_listen == "0.0.0.0:8443"
    assert config.state.default_user == "admin"
    demo = load(None)
    assert list(demo.vms) == ["demo"] and demo.vms["demo"].autostart


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("[vm.a]\ncmd = ['-m', '64']\ncolour = 'red'\n", "vm.a.colour", "unknown key"),
    ("[vm.a]\ncmd = '-m 64'\n", "vm.a.cmd", "list of strings"),
    ("[vm.a]\n", "vm.a.cmd", "exactly one of cmd"),
    ("[vm.a]\ncmd = []\nqmp = 'x'\n", "vm.a.cmd", "exactly one of cmd"),
    ("[vm.a]\ncmd = ['{{.nope}}']\n", "vm.a.cmd[0]", "unknown template variable {{.nope}}"),
    ("[vm.'a.b']\ncmd = []\n", "vm.a.b", "machine name"),
    ("[vm.a]\ncmd = []\nipmi = '6230'\n", "vm.a.ipmi", "host:port"),
    ("[vm.a]\ncmd = []\nipmi = 'h:99999'\n", "vm.a.ipmi", "host:port"),
    ("[vm.a]\ncmd = []\nuuid = 'xyz'\n", "vm.a.uuid", "not a UUID"),
    ("[vm.a]\ncmd = []\nautostart = 'yes'\n", "vm.a.autostart", "true or false"),
    ("[vm.a]\ncmd = []\nserial = '/x'\n", "vm.a.serial", "only for attach mode"),
    ("[qemu]\nbinary = 'x'\n", "qemu.binary", "unknown key"),
    ("[state]\ndefault_user = 'a-very-long-user-name'\n", "state.default_user", "16 bytes"),
    ("vm = 3\n", "vm", "must be a table"),
    ("[vm.a\n", "", "not valid TOML"),
])
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, where: str, problem: str):
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and f"{where}:" in message and problem in message, message


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")
