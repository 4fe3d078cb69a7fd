"""Configuration: templates, modes, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_bmc_shared.config import VM_DMI_MARKERS, ConfigError, Identity, load


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
    assert config.redfish.listen == ("0.0.0.0", 8443) and config.redfish.tls
    assert config.state.default_user == "admin"
    demo = load(None)
    assert list(demo.vms) == ["node1"] and demo.vms["node1"].autostart and demo.vms["node1"].inband
    assert demo.vms["node1"].ipmi == ("127.0.0.1", 6230) and demo.redfish.listen == ("127.0.0.1", 8443)
    assert load(config_file(tmp_path, "")).redfish.listen == ("127.0.0.1", 8443), "Redfish on loopback by default"


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
    ("[vm.a]\ncmd = []\nbare_metal_identity = 'yes'\n", "vm.a.bare_metal_identity", "true or false"),
    ("[vm.a]\nqmp = '/q'\nbare_metal_identity = true\n", "vm.a.bare_metal_identity", "only for managed mode"),
    ("[vm.a]\nqmp = '/q'\n[vm.a.identity]\nvendor = 'X'\n", "vm.a.identity", "only for managed mode"),
    ("[vm.a]\ncmd = []\n[vm.a.identity]\nvendor = 'X'\n", "vm.a.identity", "only with bare_metal_identity"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\nidentity = 'x'\n", "vm.a.identity", "must be a table"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\ncolour = 'red'\n", "vm.a.identity.colour",
     "unknown key"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nserial = 42\n", "vm.a.identity.serial",
     "must be a string"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nproduct = ''\n", "vm.a.identity.product",
     "1-64 printable ASCII"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nvendor = 'caf\u00e9'\n",
     "vm.a.identity.vendor", "1-64 printable ASCII"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nserial = \"a\\tb\"\n", "vm.a.identity.serial",
     "1-64 printable ASCII"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nsku = '{}'\n".format("x" * 65),
     "vm.a.identity.sku", "1-64 printable ASCII"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nvendor = 'QEMU'\n", "vm.a.identity.vendor",
     "systemd-detect-virt"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nbios_vendor = 'Bochs'\n",
     "vm.a.identity.bios_vendor", "starts with 'Bochs'"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nproduct = 'KVM box'\n",
     "vm.a.identity.product", "starts with 'KVM'"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\nbios_date = '2024-01-31'\n",
     "vm.a.identity.bios_date", "MM/DD/YYYY"),
    ("[vm.a]\ncmd = []\nbare_metal_identity = true\n[vm.a.identity]\ncpu_model = '{}'\n".format("x" * 49),
     "vm.a.identity.cpu_model", "48 characters"),
    ("[vm.a]\ncmd = ['-m', '64', '-smbios', 'type=1,serial=x']\nbare_metal_identity = true\n", "vm.a.cmd[2]",
     "-smbios conflicts"),
    ("[vm.a]\ncmd = ['-cpu', 'max,hypervisor=on']\nbare_metal_identity = true\n", "vm.a.cmd[1]",
     "hypervisor bit"),
    ("[vm.a]\ncmd = ['-cpu', 'host,+hypervisor,migratable=on']\nbare_metal_identity = true\n", "vm.a.cmd[1]",
     "hypervisor bit"),
    ("[vm.a]\ncmd = []\n[vm.a.ssh]\nUser = 'root'\n", "vm.a.ssh.port", "missing"),
    ("[vm.a]\ncmd = []\n[vm.a.ssh]\nport = 0\n", "vm.a.ssh.port", "port number"),
    ("[vm.a]\ncmd = []\n[vm.a.ssh]\nport = 2222\nvm_port = '22'\n", "vm.a.ssh.vm_port", "port number"),
    ("[vm.a]\ncmd = []\n[vm.a.ssh]\nport = 2222\nHost = 'x'\n", "vm.a.ssh.Host", "not an ssh_config option"),
    ("[ssh]\nPort = 22\n", "ssh.Port", "not an ssh_config option"),
    ("[ssh]\nIdentityFile = [1]\n", "ssh.IdentityFile", "list of ssh option values"),
    ("[ssh]\nUser = {name = 'x'}\n", "ssh.User", "must be a string"),
    ("[vm.a]\ncmd = []\nipmi = '0.0.0.0:623'\n[vm.b]\ncmd = []\nipmi = '10.0.0.2:623'\n", "vm.b.ipmi",
     "UDP port 623 is already taken by vm.a.ipmi"),
    ("[vm.a]\ncmd = []\nvmwire = '127.0.0.1:8443'\n", "vm.a.vmwire", "TCP port 8443 is already taken by "
     "redfish.listen"),
    ("[ipmi]\nrange = '6230-6240'\n", "ipmi.range", "host:first-last"),
    ("[ipmi]\nrange = '127.0.0.1:6240-6230'\n", "ipmi.range", "host:first-last"),
    ("[ipmi]\nrange = '10.0.0.9-10.0.0.1:623'\n", "ipmi.range", "first_ip-last_ip:port"),
    ("[ipmi]\nrange = '127.0.0.1:6230-6230'\n[vm.a]\ncmd = []\n[vm.b]\ncmd = []\n", "ipmi.range",
     "too few addresses for the 2 machines"),
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


def test_ssh_options_ports_and_templates(tmp_path: Path):
    path = config_file(tmp_path, """
[ssh]
User = "root"
ServerAliveInterval = 300
ForwardAgent = false
[vm.a]
cmd = ["-nic", "user,hostfwd=tcp:127.0.0.1:{{.vm.ssh.port}}-:{{.vm.ssh.vm_port}}"]
ipmi = "10.0.0.1:623"
[vm.a.ssh]
port = 2201
vm_port = 2022
serveraliveinterval = 60
IdentityFile = ["~/.ssh/a", "~/.ssh/b"]
[vm.b]
cmd = []
ipmi = "10.0.0.2:623"
""")
    vms = load(path).vms
    assert vms["a"].argv[-1] == "user,hostfwd=tcp:127.0.0.1:2201-:2022"
    ssh = vms["a"].ssh
    assert ssh is not None and (ssh.port, ssh.vm_port) == (2201, 2022)
    assert ssh.options == {"User": "root", "ForwardAgent": False, "serveraliveinterval": 60,
                           "IdentityFile": ["~/.ssh/a", "~/.ssh/b"]}  # the VM's own win, whatever their case
    assert vms["b"].ssh is None  # one address per machine on one port: no clash


@pytest.mark.parametrize(("range_", "expected"), [
    ("127.0.0.1:6230-6239", [("127.0.0.1", 6230), ("127.0.0.1", 6232), ("127.0.0.1", 6233)]),
    ("10.0.0.1-10.0.0.9:623", [("10.0.0.1", 623), ("10.0.0.2", 623), ("10.0.0.3", 623)]),
])
def test_ipmi_addresses_from_a_range(tmp_path: Path, range_: str, expected: list[tuple[str, int]]):
    path = config_file(tmp_path, f'[ipmi]\nrange = "{range_}"\n[vm.c]\ncmd = []\n[vm.b]\ncmd = []\n'
                                 '[vm.x]\ncmd = []\nipmi = "127.0.0.1:6231"\n[vm.a]\ncmd = []\n')
    vms = load(path).vms
    assert [vms[name].ipmi for name in ("c", "b", "a")] == expected  # config order; taken addresses skipped
    assert vms["x"].ipmi == ("127.0.0.1", 6231)


def test_bare_metal_identity(tmp_path: Path):
    path = config_file(tmp_path, """
[vm.plain]
cmd = ["-m", "64"]
[vm.defaults]
cmd = ["-cpu", "max,hypervisor=off"]
bare_metal_identity = true
[vm.custom]
cmd = ["-cpu", "host"]
bare_metal_identity = true
[vm.custom.identity]
vendor = "Dell Inc."
product = "PowerEdge R650"
serial = "ABC1234"
bios_vendor = "Dell Inc., BIOS"
bios_date = "12/31/2023"
cpu_model = "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
""")
    vms = load(path).vms
    assert vms["plain"].identity is None and not vms["plain"].bare_metal_identity
    defaults = vms["defaults"].identity
    assert vms["defaults"].bare_metal_identity and defaults == Identity()
    assert (defaults.vendor, defaults.product, defaults.serial, defaults.bios_vendor) == ("Generic", "Server", None,
                                                                                          None)
    for value in (defaults.vendor, defaults.product, defaults.version, defaults.bios_version):
        assert not value.startswith(VM_DMI_MARKERS)
    custom = vms["custom"].identity
    assert custom == Identity(vendor="Dell Inc.", product="PowerEdge R650", serial="ABC1234",
                              bios_vendor="Dell Inc., BIOS", bios_date="12/31/2023",
                              cpu_model="Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "absent.toml")
