"""Lab mode (``[vm.NAME] nics``): a host interface handed to the VM, through macvtap and through a
Linux bridge with a tap device, with real network namespaces.

Two namespaces joined by a veth pair: one end stays in the machine service's (the root)
namespace and is the VM's ``nics`` interface, the other is in a peer namespace with an address.
The tiny Linux guest (tests/linux_guest.py, plus the virtio-net driver, which the Debian kernel
has as modules) puts an address on its eth0; a ping from the peer namespace must be answered.
Once the machine is off, the devices the machine service made are gone. Needs root (namespaces,
links); the config checks do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, serial_log, toml_list, wait_for, write_config
from linux_guest import Cpio, LinuxGuest, _decompress_module, _module_dependencies, _module_name, default_cache
from qemu_bmc_machine import host_nics
from qemu_bmc_shared import bus, subjects
from qemu_bmc_shared.bus import BusError
from qemu_bmc_shared.config import ConfigError, load
from qemu_bmc_shared.launcher import HostNic, LaunchError, RuntimeFiles, launch_detached, managed_argv
from qemu_bmc_shared.messages import PowerRequest, PowerStatus

NET_MODULES = ("virtio_pci", "virtio_net")
GUEST_UP = "LAB-NIC-UP"
BUSYBOX = "/bin/busybox"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2")


# ------------------------------------------------------------------ the guest's virtio-net driver

def _net_module_archive(guest: LinuxGuest) -> bytes:
    """A cpio archive with the virtio-net modules (and what they depend on) of the guest's kernel
    package in lib/modules/net/, and their load order in lib/modules/net/order; cached beside the guest."""
    cached = default_cache() / f"net-modules_{guest.kernel_package}_{guest.kernel_version}.cpio"
    if cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(dir=default_cache()) as staging:
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        subprocess.run(["apt-get", "download", "-qq", *sandbox, f"{guest.kernel_package}={guest.kernel_version}"],
                       cwd=staging, check=True, capture_output=True)
        (deb,) = Path(staging).glob("*.deb")
        wanted, modules = set(NET_MODULES), {}
        while wanted - set(modules):  # each pass adds the dependencies of the modules it found
            before = len(modules)
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as unpacker:
                with tarfile.open(fileobj=unpacker.stdout, mode="r|") as tar:
                    for member in tar:
                        name = _module_name(member.name)
                        if member.isfile() and re.search(r"\.ko(\.(xz|gz|zst))?$", member.name) \
                                and name in wanted and name not in modules:
                            modules[name] = _decompress_module(member.name, tar.extractfile(member).read())
                            wanted.update(_module_dependencies(modules[name]))
            assert len(modules) > before, f"{deb.name} has no modules {sorted(wanted - set(modules))}"
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dependency in _module_dependencies(modules[name]):
                visit(dependency)
            order.append(name)

    for name in NET_MODULES:
        visit(name)
    archive = Cpio()
    for name in order:
        archive.file(f"lib/modules/net/{name}.ko", modules[name])
    archive.file("lib/modules/net/order", " ".join(order).encode())
    data = archive.finish()
    temporary = cached.with_suffix(f".{os.getpid()}")
    temporary.write_bytes(data)
    temporary.replace(cached)
    return data


@pytest.fixture(scope="session")
def net_modules(linux_guest: LinuxGuest) -> bytes:
    return _net_module_archive(linux_guest)


def lab_guest_argv(guest: LinuxGuest, modules: bytes, directory: Path, address: str) -> list[str]:
    """The guest's QEMU arguments: it loads the virtio-net driver, puts ``address`` on eth0, says
    GUEST_UP and stays up."""
    script = f"""\
for module in $(cat /lib/modules/net/order); do insmod /lib/modules/net/$module.ko || echo "insmod $module failed"; done
ip link set dev eth0 up
ip addr add {address} dev eth0
echo "{GUEST_UP} $(cat /sys/class/net/eth0/address)"
while true; do sleep 60; done
"""
    initrd = guest.initrd(script, directory)
    with initrd.open("ab") as output:  # a third archive, after the cached base and the script
        output.write(modules)
    return guest.qemu_args(initrd)


# ------------------------------------------------------------------ namespaces

def ip(*args: str, check: bool = True) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check).stdout


def link_names() -> set[str]:
    return {link["ifname"] for link in json.loads(ip("-json", "link", "show"))}


@contextlib.contextmanager
def veth_to_a_peer_namespace(peer_address: str):
    """A veth pair: (the end in this namespace, the peer namespace), the other end in the peer
    namespace with ``peer_address``; both removed afterwards."""
    tag = secrets.token_hex(3)
    host_end, peer_end, namespace = f"qbv{tag}h", f"qbv{tag}p", f"qbn{tag}"
    try:
        ip("netns", "add", namespace)
        ip("link", "add", host_end, "type", "veth", "peer", "name", peer_end, "netns", namespace)
        ip("-n", namespace, "addr", "add", peer_address, "dev", peer_end)
        ip("-n", namespace, "link", "set", "dev", peer_end, "up")
        ip("-n", namespace, "link", "set", "dev", "lo", "up")
        yield host_end, namespace
    finally:
        ip("netns", "delete", namespace, check=False)  # takes its veth end, and with it the pair
        ip("link", "delete", "dev", host_end, check=False)


async def pinged(namespace: str, address: str) -> bool:
    process = await asyncio.create_subprocess_exec("ip", "netns", "exec", namespace, BUSYBOX, "ping", "-c", "1",
                                                   "-W", "5", address, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    return await process.wait() == 0


def peer_neighbour_mac(namespace: str, address: str) -> str:
    for entry in json.loads(ip("-n", namespace, "-json", "neigh", "show", address)):
        return entry.get("lladdr", "")
    return ""


# ------------------------------------------------------------------ the tests

@needs_root
@pytest.mark.parametrize("mode", ["macvtap", "bridge"])
async def test_the_guest_on_a_host_interface_answers_a_ping_from_the_other_namespace(
        mode: str, nc, services, short_dir: Path, linux_guest: LinuxGuest, net_modules: bytes) -> None:
    octet = secrets.randbelow(200) + 20
    guest_ip, peer_ip = f"10.231.{octet}.2", f"10.231.{octet}.1"
    with veth_to_a_peer_namespace(f"{peer_ip}/24") as (host_end, namespace):
        argv = lab_guest_argv(linux_guest, net_modules, short_dir, f"{guest_ip}/24")
        config = write_config(short_dir, f'[vm.lab]\ncmd = {toml_list(argv)}\nnics = ["{host_end}"]\n'
                                         f'nic_mode = "{mode}"\n')
        vm = load(config).vms["lab"]
        await services("machine", config, "--stop-vms-on-exit")
        await bus.request(nc, "lab", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=60)

        made = {host_nics.device_name("qmt", vm, 0)} if mode == "macvtap" else \
            {host_nics.device_name("qbr", vm, 0), host_nics.device_name("qtp", vm, 0)}
        assert made <= link_names()
        if mode == "bridge":  # the interface is a port of the machine's bridge
            assert json.loads(ip("-json", "link", "show", "dev", host_end))[0]["master"] == \
                host_nics.device_name("qbr", vm, 0)
        await wait_for(lambda: GUEST_UP in serial_log(short_dir, "lab"), timeout=300, interval=0.5,
                       message=f"the guest's eth0 up: {serial_log(short_dir, 'lab')[-2000:]}")
        mac = host_nics.guest_mac(vm, host_end)
        assert f"{GUEST_UP} {mac}" in serial_log(short_dir, "lab")  # the guest's NIC has the MAC it was given
        await wait_for(lambda: pinged(namespace, guest_ip), timeout=120, interval=0.5,
                       message=f"an answer to ping {guest_ip} from {namespace}")
        assert peer_neighbour_mac(namespace, guest_ip) == mac  # the answer came from the guest's NIC

        await bus.request(nc, "lab", subjects.POWER_SET, PowerRequest(action="off"), PowerStatus, timeout=60)
        await wait_for(lambda: not made & link_names(), timeout=30, message=f"{made} removed")
        assert host_end in link_names()  # the interface itself stays, out of any bridge
        assert "master" not in json.loads(ip("-json", "link", "show", "dev", host_end))[0]


@needs_root
async def test_devices_a_crash_left_are_removed_when_the_machine_service_starts(
        nc, services, short_dir: Path) -> None:
    config = write_config(short_dir, f'[vm.lab]\ncmd = {toml_list(["-m", "64", "-nodefaults"])}\n'
                                     'nics = ["lo"]\nnic_mode = "bridge"\n')
    vm = load(config).vms["lab"]
    stale = host_nics.device_name("qbr", vm, 0)
    other = f"qbr-{secrets.token_hex(3)}-0"  # another machine's: not this one's to remove
    try:
        ip("link", "add", "name", stale, "type", "bridge")
        ip("link", "add", "name", other, "type", "bridge")
        await services("machine", config)
        await wait_for(lambda: stale not in link_names(), timeout=30, message=f"{stale} removed")
        assert other in link_names()
    finally:
        ip("link", "delete", "dev", stale, check=False)
        ip("link", "delete", "dev", other, check=False)


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
async def test_a_missing_interface_fails_the_power_on_and_the_service_keeps_serving(
        nc, services, short_dir: Path) -> None:
    missing = f"qbx{secrets.token_hex(3)}"
    config = write_config(short_dir, f'[vm.lab]\ncmd = {toml_list(["-m", "64", "-nodefaults"])}\n'
                                     f'nics = ["{missing}"]\n')
    await services("machine", config)
    with pytest.raises(BusError) as error:
        await bus.request(nc, "lab", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
    assert error.value.error == "qemu_error" and f"no network interface {missing!r}" in error.value.message
    status = await bus.request(nc, "lab", subjects.POWER_GET, None, PowerStatus, timeout=10)
    assert status.state == "Off" and status.pid is None


@needs_root
async def test_an_interface_already_in_a_bridge_is_refused(nc, services, short_dir: Path) -> None:
    """Another machine's bridge (or any bridge or bond) holds the interface: taking it would cut
    that one off, so the power on fails and says why."""
    tag = secrets.token_hex(3)
    interface, bridge = f"qbd{tag}", f"qbb{tag}"
    config = write_config(short_dir, f'[vm.lab]\ncmd = {toml_list(["-m", "64", "-nodefaults"])}\n'
                                     f'nics = ["{interface}"]\n')
    try:
        ip("link", "add", interface, "type", "veth", "peer", "name", f"qbe{tag}")
        ip("link", "add", "name", bridge, "type", "bridge")
        ip("link", "set", "dev", interface, "master", bridge)
        await services("machine", config)
        with pytest.raises(BusError) as error:
            await bus.request(nc, "lab", subjects.POWER_SET, PowerRequest(action="on"), PowerStatus, timeout=30)
        assert error.value.error == "qemu_error" and f"already a port of {bridge}" in error.value.message
        assert json.loads(ip("-json", "link", "show", "dev", interface))[0]["master"] == bridge
    finally:
        ip("link", "delete", "dev", interface, check=False)
        ip("link", "delete", "dev", bridge, check=False)


@pytest.mark.parametrize("modes", [("bridge", "bridge"), ("auto", "bridge"), ("bridge", "macvtap")])
def test_two_machines_cannot_bridge_one_interface(tmp_path: Path, modes: tuple[str, str]) -> None:
    config = write_config(tmp_path, f'[vm.m]\ncmd = ["-m", "64"]\nnics = ["eth1"]\nnic_mode = "{modes[0]}"\n'
                                    f'[vm.n]\ncmd = ["-m", "64"]\nnics = ["eth2", "eth1"]\nnic_mode = "{modes[1]}"\n')
    with pytest.raises(ConfigError, match=re.escape("vm.n.nics[1]: 'eth1' is already vm.m's")):
        load(config)


def test_machines_may_share_an_interface_through_macvtap(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[vm.m]\ncmd = ["-m", "64"]\nnics = ["eth1"]\nnic_mode = "macvtap"\n'
                                    '[vm.n]\ncmd = ["-m", "64"]\nnics = ["eth1"]\n')
    assert load(config).vms["n"].nics == ("eth1",)


@pytest.mark.parametrize("text, where, problem", [
    ('nics = ["eth1", "eth1"]', "vm.m.nics[1]", "listed twice"),
    ('nics = ["a-very-long-interface-name"]', "vm.m.nics[0]", "not a network interface name"),
    ('nics = ["eth/1"]', "vm.m.nics[0]", "not a network interface name"),
    ('nics = "eth1"', "vm.m.nics", "must be a list of strings"),
    ('nics = ["eth1"]\nnic_mode = "tap"', "vm.m.nic_mode", 'must be "auto", "macvtap" or "bridge"'),
    ('nic_mode = "bridge"', "vm.m.nic_mode", "only with nics"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, where: str, problem: str) -> None:
    config = write_config(tmp_path, f'[vm.m]\ncmd = ["-m", "64"]\n{text}\n')
    with pytest.raises(ConfigError, match=re.escape(where)) as error:
        load(config)
    assert problem in str(error.value)


def test_attach_mode_has_no_nics(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[vm.m]\nqmp = "/run/q.sock"\nnics = ["eth1"]\n')
    with pytest.raises(ConfigError, match=r"vm\.m\.nics: only for managed mode"):
        load(config)


def test_config_and_command_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[vm.m]\ncmd = ["-m", "64"]\nnics = ["eth1", "eth2"]\n'
                                    '[vm.n]\ncmd = ["-m", "64"]\n')
    vms = load(config).vms
    assert vms["m"].nics == ("eth1", "eth2") and vms["m"].nic_mode == "auto"
    assert vms["n"].nics == () and vms["n"].nic_mode == "auto"
    nics = (HostNic(mac="02:00:00:00:00:01", fd=7), HostNic(mac="02:00:00:00:00:02", tap="qtp-abcdef-1"))
    (tmp_path / "rt").mkdir()
    argv = managed_argv(vms["m"], RuntimeFiles(tmp_path / "rt"), nics=nics)
    tail = argv[argv.index("64") + 1:]  # after the operator's arguments
    assert tail == ["-netdev", "tap,id=qbmc-nic0,fd=7",
                    "-device", "virtio-net-pci,netdev=qbmc-nic0,mac=02:00:00:00:00:01",
                    "-netdev", "tap,id=qbmc-nic1,ifname=qtp-abcdef-1,script=no,downscript=no",
                    "-device", "virtio-net-pci,netdev=qbmc-nic1,mac=02:00:00:00:00:02"]
    names = [host_nics.device_name(kind, vms["m"], 1) for kind in host_nics.PREFIXES]
    assert all(len(name) <= 15 for name in names) and len(set(names)) == 3
    assert host_nics.guest_mac(vms["m"], "eth1") != host_nics.guest_mac(vms["m"], "eth2")


def test_the_vm_manager_leaves_a_machine_with_nics_to_the_machine_service(tmp_path: Path) -> None:
    vm = load(write_config(tmp_path, '[vm.m]\ncmd = ["-m", "64"]\nnics = ["eth1"]\n')).vms["m"]
    with pytest.raises(LaunchError, match="machine service"):
        launch_detached(vm, RuntimeFiles(vm.runtime_dir))
    assert not (vm.runtime_dir / "qemu.log").exists()  # no QEMU was started


def test_the_containerlab_example_config_hands_eth1_to_its_vm() -> None:
    vm = load(REPO / "examples" / "containerlab" / "qemu-bmc.toml").vms["node1"]
    assert vm.mode == "managed" and vm.nics == ("eth1",) and vm.nic_mode == "auto"
    topology = (REPO / "examples" / "containerlab" / "qemu-bmc-lab.clab.yml").read_text()
    assert "kind: linux" in topology and "qemu-bmc.toml:/etc/qemu-bmc/config.toml" in topology
