"""The VM manager (``qemu-bmc vm ...``, the qqmgr workflow) as a user runs it: the real command
against real QEMU, on its own and through a machine service on the bus; ``ssh``/``put``/``get``
against a real OpenSSH sshd on a loopback port standing in for a VM's forwarded SSH port."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_tcp_port, toml_list, wait_for, write_config
from guest_images import GuestImages

QEMU_BMC = [sys.executable, "-m", "qemu_bmc"]
SSHD = "/usr/sbin/sshd"
# scripts/setup.sh installs Debian's openssh-server for the sshd
assert Path(SSHD).exists(), f"{SSHD} is missing: run scripts/setup.sh"

#: A machine with nothing to boot: SeaBIOS waits for ever and ignores the ACPI power button.
BARE = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-display", "none", "-nodefaults"]


async def qemu_bmc(config: Path, action: str, *args: str, options: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """``qemu-bmc vm ACTION -c CONFIG [OPTIONS] ARGS`` (options first: ssh takes the rest as its command)."""
    process = await asyncio.create_subprocess_exec(*QEMU_BMC, "vm", action, "-c", str(config), *options, *args,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   stdin=subprocess.DEVNULL)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode(), err.decode()


async def vm_json(config: Path, action: str, *args: str) -> Any:
    code, out, err = await qemu_bmc(config, action, *args, options=("--json",))
    assert code == 0, (action, args, out, err)
    return json.loads(out)


@pytest.fixture
async def stop_at_end() -> AsyncIterator[list[Path]]:
    """The configs whose VMs are stopped after the test, whatever happened."""
    configs: list[Path] = []
    yield configs
    for config in configs:
        await qemu_bmc(config, "stop", "--all", options=("--timeout", "0"))


def is_qemu(pid: int, qmp: str) -> bool:
    try:
        return qmp.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def test_start_status_stop_and_stale_files(short_dir: Path, images: GuestImages, stop_at_end: list[Path]):
    config = write_config(short_dir, f"[vm.guest]\ncmd = {toml_list(images.qemu_args(nic=False))}\n"
                                     f"[vm.bare]\ncmd = {toml_list(BARE)}\n")
    stop_at_end.append(config)
    listed = await vm_json(config, "list")
    assert [(vm["name"], vm["state"], vm["pid"]) for vm in listed] == [("guest", "stopped", None),
                                                                      ("bare", "stopped", None)]

    started = await vm_json(config, "start", "guest", "bare")  # no NATS here: the VM manager launches QEMU
    assert [vm["started_by"] for vm in started] == ["vm manager", "vm manager"]
    status = await vm_json(config, "status", "guest")
    runtime = status["runtime"]
    assert status["state"] == "running" and is_qemu(status["pid"], runtime["qmp"])
    assert Path(runtime["pid_file"]).read_text().strip() == str(status["pid"]) and Path(runtime["qmp"]).is_socket()
    assert Path(runtime["dir"]).is_relative_to(config.parent)  # the runtime directory sits beside the config
    code, out, _ = await qemu_bmc(config, "list")
    assert code == 0 and f"guest                managed  running   {status['pid']:>8}" in out, out

    await wait_for(lambda: "MARKER-HDD" in Path(runtime["serial_log"]).read_text(errors="replace"), timeout=60,
                   message="the guest running (it is continued after the paused launch)")
    stopped = (await vm_json(config, "stop", "guest"))[0]  # ACPI power button: the guest powers off
    assert stopped["how"] == "graceful" and stopped["pid"] is None and not is_qemu(status["pid"], runtime["qmp"])
    assert "POWER-BUTTON" in Path(runtime["serial_log"]).read_text(errors="replace")

    bare = await vm_json(config, "status", "bare")
    began = time.monotonic()
    stopped = (await vm_json(config, "stop", "bare", "--timeout", "1"))[0]  # the button is ignored: killed
    assert stopped["how"] == "forced" and time.monotonic() - began >= 1 and not is_qemu(bare["pid"],
                                                                                           bare["runtime"]["qmp"])
    assert (await vm_json(config, "stop", "bare"))[0]["how"] == "not running"

    # stale files: a pid file naming a live process that is not the VM's QEMU, a leftover socket
    other = subprocess.Popen(["sleep", "60"])
    try:
        Path(bare["runtime"]["pid_file"]).write_text(f"{other.pid}\n")
        Path(bare["runtime"]["qmp"]).write_text("")
        status = await vm_json(config, "status", "bare")
        assert status["state"] == "stopped" and status["pid"] is None
        assert sorted(status["stale_files_removed"]) == sorted([bare["runtime"]["pid_file"], bare["runtime"]["qmp"]])
        assert not Path(bare["runtime"]["pid_file"]).exists() and other.poll() is None  # only files removed
        Path(bare["runtime"]["qmp"]).write_text("")  # a socket file left by a killed QEMU does not stop a start
        started = (await vm_json(config, "start", "bare"))[0]
        assert started["state"] == "running" and is_qemu(started["pid"], bare["runtime"]["qmp"])
        assert (await vm_json(config, "start", "bare"))[0]["started_by"] is None  # already running
        assert (await vm_json(config, "stop", "--all", "--timeout", "0.5"))[0]["how"] == "not running"
    finally:
        other.kill()
        other.wait()

    code, out, err = await qemu_bmc(config, "start", "nosuch")
    assert code == 1 and "no VM 'nosuch'" in err and "guest, bare" in err


async def test_start_and_stop_through_the_machine_service(nc, services, short_dir: Path, images: GuestImages):
    config = write_config(short_dir, f"[vm.n1]\ncmd = {toml_list(images.qemu_args(nic=False))}\n")
    await services("machine", config, "--stop-vms-on-exit")
    nats = ("--nats", nc.connected_url.geturl())
    started = (await vm_json(config, "start", *nats, "n1"))[0]
    assert started["started_by"] == "machine service" and started["state"] == "running"
    serial = Path(started["runtime"]["serial_log"])
    await wait_for(lambda: "MARKER-HDD" in serial.read_text(errors="replace"), timeout=60, message="booted")
    stopped = (await vm_json(config, "stop", *nats, "n1"))[0]
    assert stopped["how"] == "graceful" and stopped["pid"] is None and "POWER-BUTTON" in serial.read_text()
    assert not is_qemu(started["pid"], started["runtime"]["qmp"])


async def test_port_clash_and_config_lookup(short_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    clash = write_config(short_dir, f"[vm.a]\ncmd = {toml_list(BARE)}\n[vm.a.ssh]\nport = 2222\n"
                                    f"[vm.b]\ncmd = {toml_list(BARE)}\n[vm.b.ssh]\nport = 2222\n")
    code, _, err = await qemu_bmc(clash, "list")
    assert code == 2 and f"{clash}: vm.b.ssh.port: TCP port 2222 is already taken by vm.a.ssh.port" in err, err

    # no -c: ./qemu-bmc.toml, then ~/.config/qemu-bmc/config.toml
    home = tmp_path / "home"
    (home / ".config" / "qemu-bmc").mkdir(parents=True)
    (home / ".config" / "qemu-bmc" / "config.toml").write_text(f"[vm.from_home]\ncmd = {toml_list(BARE)}\n")
    (tmp_path / "work").mkdir()
    environment = {**os.environ, "HOME": str(home)}
    environment.pop("XDG_CONFIG_HOME", None)
    environment.pop("QEMU_BMC_CONFIG", None)

    async def names(cwd: Path) -> list[str]:
        process = await asyncio.create_subprocess_exec(*QEMU_BMC, "vm", "list", "--json", cwd=cwd, env=environment,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, err
        return [vm["name"] for vm in json.loads(out)]

    assert await names(tmp_path / "work") == ["from_home"]
    (tmp_path / "work" / "qemu-bmc.toml").write_text(f"[vm.from_cwd]\ncmd = {toml_list(BARE)}\n")
    assert await names(tmp_path / "work") == ["from_cwd"]


@pytest.fixture
def sshd(tmp_path: Path) -> Any:
    """A real sshd on a loopback port that lets this user in with a fresh key."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    port = free_tcp_port()
    settings = {"Port": port, "ListenAddress": "127.0.0.1", "HostKey": keys / "host",
                "AuthorizedKeysFile": keys / "authorized_keys", "PidFile": keys / "sshd.pid",
                "PermitRootLogin": "prohibit-password", "PasswordAuthentication": "no", "UsePAM": "no",
                "StrictModes": "no", "Subsystem": "sftp internal-sftp"}
    (keys / "sshd_config").write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while subprocess.run(["ssh-keyscan", "-p", str(port), "127.0.0.1"], capture_output=True).returncode != 0:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.1)
    yield port, keys / "client"
    process.terminate()
    process.wait(10)


async def test_ssh_put_get_with_generated_config(sshd: Any, short_dir: Path, tmp_path: Path,
                                                 stop_at_end: list[Path]):
    port, key = sshd
    config = write_config(short_dir, f'[ssh]\nUser = "{getpass.getuser()}"\nIdentityFile = "{key}"\n'
                                     'StrictHostKeyChecking = "no"\nUserKnownHostsFile = "/dev/null"\n'
                                     'LogLevel = "ERROR"\nServerAliveInterval = 300\n'
                                     f"[vm.s]\ncmd = {toml_list(BARE)}\n"
                                     f"[vm.s.ssh]\nport = {port}\nServerAliveInterval = 60\nConnectTimeout = 5\n")
    stop_at_end.append(config)
    code, _, err = await qemu_bmc(config, "ssh", "s", "true")
    assert code == 1 and "s is not running" in err, err
    await vm_json(config, "start", "s")
    code, out, err = await qemu_bmc(config, "ssh", "s", "echo", "hello-from-$((6*7))")
    assert code == 0 and out.strip() == "hello-from-42", (out, err)
    code, out, _ = await qemu_bmc(config, "ssh", "s", "--", "sh", "-c", "'echo out; echo err >&2; exit 3'",
                                  options=("--json",))
    result = json.loads(out)  # the remote command's exit status is the command's
    assert (code, result["exit_code"], result["stdout"], result["stderr"]) == (3, 3, "out\n", "err\n")

    generated = Path((await vm_json(config, "status", "s"))["runtime"]["ssh_config"]).read_text().splitlines()
    assert generated[1:] == ["Host s", "    HostName 127.0.0.1", f"    Port {port}",
                             f"    User {getpass.getuser()}", f"    IdentityFile {key}",
                             "    StrictHostKeyChecking no", "    UserKnownHostsFile /dev/null",
                             "    LogLevel ERROR", "    ServerAliveInterval 60", "    ConnectTimeout 5"]

    local, remote = tmp_path / "local.txt", tmp_path / "remote" / "copied.txt"
    local.write_bytes(b"qemu-bmc put\n" * 1000)
    remote.parent.mkdir()
    code, out, err = await qemu_bmc(config, "put", "s", str(local), str(remote))
    assert code == 0 and remote.read_bytes() == local.read_bytes(), (out, err)
    back = tmp_path / "back.txt"
    result = await vm_json(config, "get", "s", str(remote), str(back))
    assert result["exit_code"] == 0 and back.read_bytes() == local.read_bytes()
    code, out, err = await qemu_bmc(config, "get", "s", str(tmp_path / "nothing-here"), str(back))
    assert code != 0 and "nothing-here" in err


async def test_progress_on_a_terminal_and_none_with_json(short_dir: Path, stop_at_end: list[Path]):
    config = write_config(short_dir, "".join(f"[vm.p{index}]\ncmd = {toml_list(BARE)}\n" for index in range(3)))
    stop_at_end.append(config)

    async def on_a_terminal(*args: str) -> str:
        master, slave = os.openpty()
        process = await asyncio.create_subprocess_exec(*QEMU_BMC, "vm", *args, "-c", str(config), stdin=slave,
                                                       stdout=slave, stderr=slave)
        os.close(slave)
        output = bytearray()
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.run_in_executor(None, os.read, master, 65536)
            except OSError:  # the other side closed: the command ended
                break
            if not chunk:
                break
            output += chunk
        await process.wait()
        os.close(master)
        assert process.returncode == 0, output
        return output.decode(errors="replace")

    shown = await on_a_terminal("start", "--all")
    assert "starting p0, p1, p2" in shown and "3/3" in shown, shown  # rich's progress bar
    assert all(f"p{index}: running (pid " in shown for index in range(3)), shown
    quiet = await on_a_terminal("stop", "--all", "--timeout", "0", "--json")
    assert "stopping" not in quiet and [vm["how"] for vm in json.loads(quiet)] == ["forced"] * 3, quiet


async def test_a_qemu_that_does_not_start_is_reported(short_dir: Path):
    config = write_config(short_dir, '[vm.broken]\ncmd = ["-machine", "no-such-board"]\n')
    code, out, err = await qemu_bmc(config, "start", "broken")
    assert code == 1 and "broken: QEMU exited: qemu-system-x86_64: unsupported machine type" in err, (out, err)
    assert (await vm_json(config, "status", "broken"))["state"] == "stopped"
