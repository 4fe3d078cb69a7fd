"""The demo: `qemu-bmc up` with no config serves machine node1 over IPMI, in-band IPMI and Redfish,
on loopback only; the commands its banner prints work as pasted, and the guest shows its banner
on the serial console (SOL)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from processes import processes_with
from qemu_bmc.up import describe, warn_if_exposed
from qemu_bmc_shared.config import DEMO_GUEST, load
from test_sol import Terminal

DEMO_IPMI = ("127.0.0.1", 6230)
DEMO_REDFISH = ("127.0.0.1", 8443)
GUEST_BANNER = "qemu-bmc demo - node1"
PROMPT = "node1 login: "


def test_the_shipped_guest_is_its_source_assembled(tmp_path: Path):
    output = tmp_path / "guest.img"
    subprocess.run(["nasm", "-f", "bin", "-o", str(output), str(DEMO_GUEST.with_suffix(".asm"))], check=True)
    assert output.read_bytes() == DEMO_GUEST.read_bytes()
    assert len(DEMO_GUEST.read_bytes()) == 512 and GUEST_BANNER.encode() in DEMO_GUEST.read_bytes()


def free(kind: int, address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


def descendants(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def socket_inodes(pids: set[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def listeners(inodes: set[int]) -> list[tuple[str, str, int]]:
    """The TCP sockets listening and the UDP sockets bound among ``inodes``: (protocol, address, port)."""
    found = []
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if inode not in inodes or (protocol.startswith("tcp") and state != "0A"):  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            # /proc/net shows the address as 32-bit words in host (little-endian) order
            words = b"".join(raw[index:index + 4][::-1] for index in range(0, len(raw), 4))
            family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
            found.append((protocol, socket.inet_ntop(family, words), int(port_hex, 16)))
    return found


def loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1") or address.startswith("::ffff:127.")


async def test_the_demo_works_as_its_banner_says(short_dir: Path):
    if not free(socket.SOCK_DGRAM, DEMO_IPMI) or not free(socket.SOCK_STREAM, DEMO_REDFISH):
        pytest.fail(f"the demo's ports, udp {DEMO_IPMI[0]}:{DEMO_IPMI[1]} and tcp {DEMO_REDFISH[0]}:{DEMO_REDFISH[1]},"
                    " must be free for this test: another program (or a qemu-bmc up) holds one")
    home = short_dir / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("QEMU_BMC_CONFIG", "QEMU_BMC_RUNTIME_DIR", "NATS_URL", "IPMI_USER", "IPMI_PASS")}
    env |= {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"), "XDG_STATE_HOME": str(short_dir / "st"),
            "XDG_CACHE_HOME": str(home / "cache")}
    log = short_dir / "up.log"
    with log.open("wb") as output:
        up = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_bmc", "up", cwd=home, env=env,
                                                  stdout=output, stderr=output)
    terminal = Terminal()
    try:
        await wait_for(lambda: "Ctrl-C stops everything" in log.read_text() or up.returncode is not None,
                       timeout=90, message="the banner")
        banner = log.read_text()
        assert "Ctrl-C stops everything" in banner, banner
        assert "IPMI over LAN: udp 127.0.0.1:6230" in banner and "in-band IPMI" in banner, banner
        assert "ERROR" not in banner and "beyond this machine" not in banner, banner  # all on loopback
        pasted = {line.split()[0]: line.strip() for line in banner.splitlines() if line.startswith("  ")}
        ipmitool, curl, console = pasted["ipmitool"], pasted["curl"], pasted["console:"]
        cli = next(line.strip() for line in banner.splitlines() if " power status node1" in line)
        assert console == "console: https://127.0.0.1:8443/console/node1"
        assert pasted["kvm:"] == "kvm: https://127.0.0.1:8443/kvm/node1"
        assert ipmitool == "ipmitool -I lanplus -H 127.0.0.1 -p 6230 -U admin -P password power status"

        def run_pasted(line: str) -> subprocess.CompletedProcess:
            return subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60, env=env, cwd=home)

        await wait_for(lambda: "node1: On" in run_pasted(cli).stdout, timeout=60, message=f"{cli!r}: On")
        serial = short_dir / "st" / "qemu-bmc" / "vm" / "node1" / "serial.log"
        await wait_for(lambda: serial.exists() and PROMPT in serial.read_text(errors="replace"), timeout=60,
                       message="the guest's prompt on its serial port")

        result = await asyncio.to_thread(run_pasted, ipmitool)
        assert result.returncode == 0 and result.stdout.strip() == "Chassis Power is on", result
        result = await asyncio.to_thread(run_pasted, curl)
        assert result.returncode == 0, result
        system = json.loads(result.stdout)
        assert system["Id"] == "node1" and system["PowerState"] == "On", system

        # SOL, opened after the guest printed its banner: Enter shows it again
        sol = [*shlex.split(ipmitool)[:-2], "sol", "activate"]
        await terminal.start(*sol)
        await terminal.expect("SOL Session operational")
        start = len(terminal.output)
        await terminal.type("\r")
        end = await terminal.expect(GUEST_BANNER, after=start)
        end = await terminal.expect(PROMPT, after=end)
        await terminal.type("hello")
        await terminal.expect("hello", after=end)
        await terminal.type("\r~.")
        assert await terminal.exited() == 0, terminal.text

        # nothing listens beyond this machine: the tree of `up` (nats-server, the services, QEMU)
        qemu = json.loads(run_pasted(cli + " --json").stdout)["pid"]
        pids = descendants(up.pid) | {qemu}
        bound = listeners(socket_inodes(pids))
        assert ("udp", *DEMO_IPMI) in bound and ("tcp", *DEMO_REDFISH) in bound, bound
        assert [entry for entry in bound if not loopback(entry[1])] == [], bound
    finally:
        await terminal.close()
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(up.wait(), 60)
    assert code == 0, log.read_text()[-3000:]
    assert processes_with(str(short_dir / "st")) == [], "everything of the demo stopped, its VM too"


def test_a_listener_beyond_loopback_with_the_default_password_is_warned_about(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.delenv("IPMI_PASS", raising=False)
    path = tmp_path / "qemu-bmc.toml"
    path.write_text('[redfish]\nlisten = "0.0.0.0:8443"\n[vm.n1]\ncmd = []\nipmi = "127.0.0.1:6230"\n'
                    '[vm.n2]\ncmd = []\nipmi = "192.0.2.1:6230"\n')
    warn_if_exposed(load(path))
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "Redfish 0.0.0.0:8443, IPMI over LAN of n2 192.0.2.1:6230 listen beyond this machine" in caplog.text
    caplog.clear()
    warn_if_exposed(load(None))  # the demo: loopback only
    monkeypatch.setenv("IPMI_PASS", "Not-The-Default-1")
    warn_if_exposed(load(path))  # a password of one's own
    assert caplog.records == []


def test_the_banner_prints_a_password_of_ones_own_as_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IPMI_PASS", "Not-The-Default-1")
    path = tmp_path / "my config.toml"
    path.write_text('[state]\ndefault_user = "root"\n[vm.n1]\ncmd = []\nipmi = "0.0.0.0:6231"\n')
    banner = describe(load(path), "nats://127.0.0.1:4222", tmp_path, set(), [])
    assert "Not-The-Default-1" not in banner
    assert "  ipmitool -I lanplus -H 127.0.0.1 -p 6231 -U root -P \"$IPMI_PASS\" power status\n" in banner
    assert "  curl -k -u \"root:$IPMI_PASS\" https://127.0.0.1:8443/redfish/v1/Systems/n1\n" in banner
    assert f" power status n1 -c '{path}'\n" in banner
